"""Training on places: batches, schedules, learning on real data, exact resume."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgevpr.api import EvalConf, evaluate_dataset
from edgevpr.data.datasets import aligned
from edgevpr.models.model import load_model
from edgevpr.train.loop import lr_factor, train
from edgevpr.train.losses import MultiSimilarity
from edgevpr.train.places import draw_batch, manifest_places
from tests.conftest import TINY_MODEL, make_image


def test_batches_are_a_function_of_seed_and_step_and_shard_by_rank():
    sizes = [2, 3, 4, 5] * 5
    a = draw_batch(20, 6, sizes, 2, seed=1, step=7)
    assert a == draw_batch(20, 6, sizes, 2, seed=1, step=7) and a != draw_batch(20, 6, sizes, 2, seed=1, step=8)
    assert len({p for p, _ in a}) == 6 and len(a) == 12
    shards = [draw_batch(20, 6, sizes, 2, seed=1, step=7, rank=r, world=2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(a) and not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError, match="exceeds the 20 training places"):
        draw_batch(20, 21, sizes, 2, seed=1, step=0)


def test_manifest_places_by_id_and_radius(tmp_path):
    for i in range(4):
        make_image(tmp_path / f"{i}.jpg", i)
    (tmp_path / "m.csv").write_text("path,utm_east,utm_north,place_id\n0.jpg,0,0,a\n1.jpg,10,0,a\n2.jpg,100,0,b\n"
                                    "3.jpg,105,0,c\n")
    assert [len(p) for p in manifest_places(tmp_path / "m.csv").places] == [2, 1, 1]
    assert [len(p) for p in manifest_places(tmp_path / "m.csv", radius=20).places] == [2, 2]


def test_schedules():
    cos = lr_factor({"name": "cosine", "warmup_steps": 10}, 110)
    assert cos(0) == pytest.approx(0.1) and cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.5)
    step = lr_factor({"name": "step", "every": 5, "gamma": 0.8}, 100)
    assert step(4) == 1.0 and step(5) == pytest.approx(0.8) and step(12) == pytest.approx(0.64)
    lin = lr_factor({"name": "linear", "end_factor": 0.2}, 100)
    assert lin(100) == pytest.approx(0.2)


def test_multi_similarity_vpr_settings():
    ms = MultiSimilarity()
    assert (ms.loss.alpha, ms.loss.beta, ms.loss.base, ms.miner.epsilon) == (1.0, 50.0, 0.0, 0.1)
    labels = torch.tensor([0, 0, 1, 1])
    perfect = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [0.01, 1]]), dim=-1)
    loss, bacc = ms(perfect, labels)
    assert float(loss) == 0.0 and bacc == 1.0  # nothing to mine: every positive beats every negative
    confused = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1], [1, 0.01], [0.01, 1]]), dim=-1)
    loss, bacc = ms(confused, labels)
    assert float(loss) > 0 and bacc == 0.0


def _nordland_conf(data_root, steps, model, size, every=4):
    n = data_root / "nordland_64x32"
    return {"seed": 0, "model": model,
            "data": {"places": [{"aligned": [str(n / "summer"), str(n / "winter")], "start": 0, "stop": 200,
                                 "drop_dark": 10}], "places_per_batch": 16, "images_per_place": 2,
                     "image_size": size},
            "trainable": {"mode": "tail", "stages": 3}, "optimizer": {"name": "adamw", "lr": 3e-4,
                                                                     "lr_mult": {"aggregator": 10}},
            "schedule": {"name": "cosine", "warmup_steps": 2}, "steps": steps, "checkpoint_every": every}


def test_training_learns_the_training_places(data_root, tmp_path):
    """Nordland places 0-199 (summer+winter): loss falls and winter->summer R@1 on them rises.

    Measured here (2026-11-23): R@1 0.076 before, 0.349 after 40 steps (about 8 s of training).
    """
    conf = _nordland_conf(data_root, 40, "effnet-lite0-gem", [64, 128], every=40)
    n = data_root / "nordland_64x32"
    ds = aligned(n / "summer", n / "winter", 1)
    ds = ds.subset(np.arange(ds.num_db) < 200, np.arange(ds.num_queries) < 200).drop_dark(10)
    ec = EvalConf(cache_dir=None, efficiency=False, progress=False, image_size=(64, 128))
    before = evaluate_dataset(load_model("effnet-lite0-gem"), ds, ec)[0]["recall"]["R@1"]
    train(conf, tmp_path / "run", progress=False)
    after = evaluate_dataset(load_model(tmp_path / "run" / "final"), ds, ec)[0]["recall"]["R@1"]
    losses = np.loadtxt(tmp_path / "run" / "metrics.csv", delimiter=",", skiprows=1, usecols=1)
    assert losses[-10:].mean() < losses[:10].mean()
    assert after > before + 0.05, (before, after)


def test_killed_run_resumes_bit_exact(data_root, tmp_path):
    conf = _nordland_conf(data_root, 10, TINY_MODEL, [64, 64])
    train(conf, tmp_path / "full", progress=False)
    stopped = train(conf, tmp_path / "killed", progress=False, stop_after=7)  # last checkpoint: step 4
    assert stopped["stopped"] and not (tmp_path / "killed" / "final").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train(conf, tmp_path / "killed", progress=False)
    train(conf, tmp_path / "killed", resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "killed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 11)]  # no replayed duplicates
    assert list((tmp_path / "killed" / "tensorboard").iterdir())


def test_cached_frozen_prefix_trains_the_same_weights(data_root, tmp_path):
    conf = _nordland_conf(data_root, 6, "effnet-lite0-gem", [64, 128], every=6)
    train(conf, tmp_path / "cached", progress=False)
    train({**conf, "data": {**conf["data"], "cache_frozen": False}}, tmp_path / "plain", progress=False)
    a = load_file(str(tmp_path / "cached" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    assert any(not torch.equal(a[k], load_model("effnet-lite0-gem").state_dict()[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
