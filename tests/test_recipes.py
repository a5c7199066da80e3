"""The published GPU recipes, run unchanged but for batch and image size (and bf16 in all but one) on a
GSV-Cities-shaped mini dataset (three "cities" from ../shared/data), on CPU for a few steps with flat memory;
GSV-Cities' in-city sampler; fp32 losses under mixed precision."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevpr.models.model import preset_config
from edgevpr.train.loop import BF16_EMULATED, DEFAULTS, TrainStep, build_places, cpu_has_bf16, load_config, merge, train
from edgevpr.train.losses import MultiSimilarity, StepContext
from edgevpr.train.places import PlaceBatches, epoch_batches, steps_per_epoch
from tests import gsv_mini
from tests.conftest import ROOT, TINY_MODEL, serve_folder

FIXTURES = ROOT.parent / "shared" / "fixtures" / "published"


@pytest.fixture(scope="module")
def gsv_root(tmp_path_factory) -> Path:
    from tests.conftest import shared_data

    return gsv_mini.build(shared_data(), tmp_path_factory.mktemp("gsv") / "gsv-cities")


def test_gsv_cities_sampler_is_in_city_and_shows_every_place_once_per_epoch(gsv_root):
    places = build_places([{"gsv_cities": str(gsv_root)}]).filter(4)
    assert len(places) == 40 + 40 + 37  # three Gardens places have 3 images: dropped by min_images = 4
    groups = places.groups
    for epoch in (0, 1):
        batches = epoch_batches(groups, 16, seed=0, epoch=epoch, in_city=True)
        assert len(batches) == steps_per_epoch(len(places), 16, "in-city") == 8
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(len(places)))  # every place exactly once
        mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
        assert len(mixed) <= 2  # only where a city ends inside a batch
    assert not np.array_equal(np.concatenate(epoch_batches(groups, 16, 0, 0, True)),
                              np.concatenate(epoch_batches(groups, 16, 0, 1, True)))  # reshuffled per epoch
    pb = PlaceBatches(places, 16, 4, None, seed=0, sampler="in-city")
    for step in range(pb.steps_per_epoch):
        pairs = pb.pairs(step)
        for p in {p for p, _ in pairs}:
            imgs = [i for q, i in pairs if q == p]
            assert len(imgs) == 4 and len(set(imgs)) == 4  # K images of a place, without replacement
    uniform = {p for s in range(8) for p, _ in PlaceBatches(places, 16, 4, None, 0, sampler="uniform").pairs(s)}
    assert len(uniform) < len(places)  # the old draw: an "epoch" of N/P steps misses places


def test_images_sampler_shows_every_image_once_per_epoch(gsv_root):
    places = build_places([{"gsv_cities": str(gsv_root)}]).filter(1)
    n = sum(len(p) for p in places.places)
    pb = PlaceBatches(places, 64, 1, None, seed=0, sampler="images")
    assert pb.steps_per_epoch == -(-n // 64)
    seen = [(p, i) for s in range(pb.steps_per_epoch) for p, i in pb.pairs(s)]
    assert len(seen) == n and len(set(seen)) == n  # every image of every place, once
    with pytest.raises(ValueError, match="images_per_place: 1"):
        PlaceBatches(places, 64, 4, None, seed=0, sampler="images")


def test_losses_run_in_fp32_under_mixed_precision():
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(8, 1, 64), dim=-1)
    desc = torch.nn.functional.normalize(base + 0.15 * torch.randn(8, 4, 64), dim=-1).reshape(32, 64)
    labels = torch.arange(8).repeat_interleave(4)
    from edgevpr.models.model import load_model
    from edgevpr.tokens import Tokens

    step = TrainStep(load_model(TINY_MODEL), torch.nn.ModuleDict(), {}, DEFAULTS["loss"]["ms"], 10, None, False)

    def grad(autocast: bool, direct: bool) -> torch.Tensor:
        d = desc.clone().requires_grad_(True)
        ctx = StepContext(0, 10, labels, d, Tokens(torch.zeros(32, 4, 8), None, (2, 2)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = MultiSimilarity()(d, labels)[0] if direct else step.losses(ctx)[0]
        loss.backward()
        return d.grad

    ref = grad(False, True)
    err = lambda g: float((g - ref).norm() / ref.norm())  # noqa: E731
    assert err(grad(True, False)) < 1e-6  # TrainStep's losses: fp32 whatever the autocast around them
    assert err(grad(True, True)) > 0.01  # the control: the same loss computed under bf16 autocast is off


@pytest.fixture(scope="module")
def release_mirror(tmp_path_factory):
    """The published teachers' release files (fixture-size) served on loopback: EDGEVPR_MIRROR points here. The
    fixtures are small instances, so the releases' promised descriptor sizes are set to theirs."""
    import dataclasses

    from safetensors.torch import load_file

    from edgevpr.published import releases as rel

    served = tmp_path_factory.mktemp("mirror")
    with pytest.MonkeyPatch.context() as mp:
        for folder, name, release in (("boq_dinov2", "dinov2_12288.pth", "dinov2-boq"),
                                      ("salad", "dino_salad.ckpt", "dinov2-salad")):
            (served / name).symlink_to(FIXTURES / folder / name)
            dim = load_file(str(FIXTURES / folder / "expected.safetensors"))["output"].shape[1]
            mp.setitem(rel.RELEASES, release, dataclasses.replace(rel.RELEASES[release], out_dim=dim))
        with serve_folder(served) as url:
            yield url


def _rss_mb() -> float:
    """Resident MB after handing freed heap pages back (malloc_trim): live memory, not allocator slack."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


RECIPES = ["configs/gsv-cities/salad.yaml", "configs/gsv-cities/boq-dinov2.yaml", "configs/gsv-cities/mixvpr.yaml",
           "configs/tat-vpr/stage1-gsv.yaml", "configs/tat-vpr/stage2-gsv-boq.yaml",
           "configs/tat-vpr/stage2-gsv-cls.yaml", "configs/tat-vpr/stage2-gsv-mixvpr.yaml",
           "configs/tat-vpr/stage2-gsv-salad.yaml", "configs/efficientvpr/gsv.yaml", "configs/tinyvpr/gsv.yaml"]
MEMORY: dict[str, tuple[float, float]] = {}
#: The one recipe run in its own bf16 mixed precision. CPUs without bf16 instructions (AVX2 only, like CI's) emulate
#: bf16 matrix products ~20x slower than fp32 (the SALAD recipe: 157 s in bf16), so the other recipes run in fp32:
#: autocast is one switch shared by every recipe, and its path is covered by this one.
BF16_RECIPE = "configs/tinyvpr/gsv.yaml"


def _small(conf: dict, stage1: Path | None, bf16: bool = False) -> dict:
    """The recipe with only batch and image size changed (random backbone weights: no hub here), in fp32 unless
    ``bf16``."""
    model = preset_config(conf["model"]) if isinstance(conf["model"], str) else dict(conf["model"])
    bb = dict(model["backbone"])
    patch = 16 if "patch16" in str(bb.get("timm_name", "")) else 14 if "vit" in bb["name"] or "dinov2" in bb["name"] \
        else 32
    side = 4 * patch
    if str(bb.get("weights", "")).startswith("runs/"):
        bb["weights"] = str(stage1)
    elif bb.get("weights") in ("hub", "timm", "offline"):
        bb["weights"] = None
    model.update(backbone=bb, image_size=[side, side])
    data = {**conf["data"], "places_per_batch": 4, "image_size": [side, side], "workers": 0}
    out = {**conf, "model": model, "data": data, "steps": 6, "epochs": None, "checkpoint_every": 3, "val": None}
    if not bf16:
        out["precision"] = "fp32"
    if conf.get("teacher"):
        out["teacher"] = {**conf["teacher"], "image_size": [56, 56]}
    return out


@pytest.fixture(scope="module")
def stage1_run(gsv_root, release_mirror, tmp_path_factory):
    return tmp_path_factory.mktemp("runs") / "stage1"


@pytest.mark.parametrize("recipe", RECIPES)
def test_published_recipe_runs_on_mini_gsv_cities_with_flat_memory(recipe, gsv_root, release_mirror, stage1_run,
                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("GSV_CITIES", str(gsv_root))
    monkeypatch.setenv("EDGEVPR_MIRROR", release_mirror)
    monkeypatch.setenv("EDGEVPR_CACHE", str(stage1_run.parent / "cache"))
    conf = _small(merge(DEFAULTS, load_config(ROOT / recipe)), stage1_run / "final", recipe == BF16_RECIPE)
    assert recipe != BF16_RECIPE or conf["precision"] == "bf16"
    if "stage2" in recipe and not (stage1_run / "final").is_dir():
        pytest.fail("run the stage-1 recipe first (test order)")
    rss: dict[int, float] = {}
    out = stage1_run if recipe.endswith("stage1-gsv.yaml") else tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(conf, out, progress=False, on_step=lambda s, m: rss.__setitem__(s, _rss_mb()))
    # bf16 on a CPU that emulates it says so (once), and fp32 says nothing
    emulated = conf["precision"] == "bf16" and not cpu_has_bf16()
    assert sum(str(w.message) == BF16_EMULATED for w in caught) == int(emulated)
    assert np.isfinite(result["loss"]) and (out / "final" / "model.safetensors").is_file()
    MEMORY[recipe] = (rss[2], max(rss.values()))
    print(f"{recipe}: live RSS {rss[2]:.0f} MB at step 2, at most {max(rss.values()):.0f} MB over steps 1-6")
    assert max(rss[s] for s in (3, 4, 5, 6)) - rss[2] < 32, f"{recipe}: RSS grew from step 2: {rss}"


@pytest.mark.parametrize("host_gb, disk_gb, where", [(1.0, 0.0, "host"), (0.0, 1.0, "disk"), (0.0, 0.0, "off")])
def test_feature_cache_stays_within_its_budgets(tmp_path, host_gb, disk_gb, where):
    from edgevpr.train.cache import FeatureCache

    logs: list[str] = []
    cache = FeatureCache("teacher outputs", 10, host_gb, disk_gb, tmp_path / "cache", logs.append)
    calls: list[int] = []

    def compute(rows):
        calls.append(len(rows))
        return {"x": torch.tensor([[float(ids[r])] * 3 for r in rows])}

    for ids in ([0, 1, 2], [2, 3, 1], [3, 0, 4]):
        got = cache.fetch(ids, torch.device("cpu"), compute)
        assert torch.equal(got["x"][:, 0], torch.tensor(ids, dtype=torch.float32))  # right rows, in order
    assert cache.where == where and len(logs) == 1 and where in ("host", "disk", "off")
    # cached images are not recomputed, and a cached value is computed one image at a time (never with its batch);
    # uncached values are computed with their batch every step (the first image once more, alone, to size the cache)
    assert calls == ([1, 1, 1, 1, 1] if where != "off" else [1, 3, 3, 3])
    assert (where == "disk") == any((tmp_path / "cache").glob("*.npy"))
    if where == "off":
        assert "not caching teacher outputs" in logs[0] and "exceeds the budgets" in logs[0]
