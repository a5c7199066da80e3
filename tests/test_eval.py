import numpy as np
import pytest
import torch

from edgevpr.api import EvalConf, evaluate
from edgevpr.data.datasets import aligned
from edgevpr.data.images import ImageLoadError
from edgevpr.eval import extract as extract_mod
from edgevpr.eval.recall import first_hit_rank, pr_curve, recall_at_n, search
from edgevpr.models.model import load_model
from tests.conftest import TINY_MODEL, make_image


def test_recall_and_ranks():
    db = np.eye(4, dtype=np.float32)
    q = np.array([[1, 0.1, 0, 0], [0, 0, 0.2, 1], [0, 1, 0, 0]], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores, idx = search(db, q, 3)
    assert idx[:, 0].tolist() == [0, 3, 1]
    ranks = first_hit_rank(idx, [np.array([0]), np.array([2]), np.array([], np.int64)])
    assert ranks.tolist() == [0, 1, -1]
    r = recall_at_n(ranks, np.array([True, True, False]), ns=(1, 2))
    assert r == {"R@1": 0.5, "R@2": 1.0}


def test_pr_curve_perfect_and_ordered():
    pr = pr_curve(np.array([0.9, 0.8, 0.7]), np.array([True, True, True]), np.ones(3, bool))
    assert pr["auc"] == pytest.approx(1.0) and pr["recall_at_100p"] == 1.0
    pr = pr_curve(np.array([0.9, 0.8, 0.7, 0.6]), np.array([False, True, True, False]), np.ones(4, bool))
    assert pr["precision"].tolist() == [0.0, 0.5, 2 / 3, 0.5]
    assert pr["recall_at_100p"] == 0.0 and 0 < pr["auc"] < 0.5


def _traversal(root, n, seed):
    return [make_image(root / f"{i:03d}.png", seed + i) for i in range(n)]


def test_cache_resumes_after_kill(tmp_path, monkeypatch):
    monkeypatch.setattr(extract_mod, "CHUNK", 4)
    paths = _traversal(tmp_path / "db", 10, 0)
    torch.manual_seed(0)
    model = load_model(TINY_MODEL)
    full = extract_mod.extract(model, paths, batch_size=2, progress=False).descriptors

    calls = {"n": 0}
    real_forward = model.forward

    def dying_forward(x):
        calls["n"] += 1
        if calls["n"] > 3:  # killed during the second chunk
            raise KeyboardInterrupt
        return real_forward(x)

    monkeypatch.setattr(model, "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        extract_mod.extract(model, paths, batch_size=2, cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1  # the finished chunk survived, nothing partial
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    calls["n"] = -100
    resumed = extract_mod.extract(model, paths, batch_size=2, cache_dir=tmp_path / "cache", progress=False)
    assert resumed.from_cache == 4 and calls["n"] == -100 + 3  # only the 6 missing images (3 batches) ran
    np.testing.assert_array_equal(resumed.descriptors, full)
    again = extract_mod.extract(model, paths, batch_size=2, cache_dir=tmp_path / "cache", progress=False)
    assert again.from_cache == 10
    paths[5].write_bytes(paths[6].read_bytes())  # a changed file is recomputed
    changed = extract_mod.extract(model, paths, batch_size=2, cache_dir=tmp_path / "cache", progress=False)
    assert changed.from_cache == 6  # its chunk of 4 (images 4-7) is recomputed, the others are reused
    np.testing.assert_array_equal(changed.descriptors[5], full[6])


def test_skip_bad_reports_and_continues(tmp_path):
    paths = _traversal(tmp_path / "db", 4, 0)
    paths[2].write_text("garbage")
    model = load_model(TINY_MODEL)
    with pytest.raises(ImageLoadError, match="002.png"):
        extract_mod.extract(model, paths, progress=False)
    ex = extract_mod.extract(model, paths, skip_bad=True, progress=False)
    assert ex.ok.tolist() == [True, True, False, True]
    assert ex.failed == [(str(paths[2]), "not an image file (cannot identify format)")]


def test_evaluate_writes_reports(tmp_path):
    _traversal(tmp_path / "db", 12, 0)
    _traversal(tmp_path / "q", 12, 0)  # identical images: every query finds itself
    torch.manual_seed(0)
    model = load_model(TINY_MODEL)
    ds = aligned(tmp_path / "db", tmp_path / "q", 0)
    conf = EvalConf(cache_dir=None, plot=True, show_failures=2, efficiency=True, progress=False, top_k=5)
    res = evaluate(model, [ds], conf, tmp_path / "out")
    r = res["datasets"][ds.name]
    assert r["recall"]["R@1"] == 1.0 and r["pr_auc"] == pytest.approx(1.0)
    eff = res["efficiency"]
    assert eff["params"] > 0 and eff["gflops"] > 0 and eff["ms_per_img_b1"] > 0 and eff["peak_rss_mb_b1"] > 0
    assert eff["model_bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for f in ("results.json", "results.md", "recall_at_n.png", "pr_curve.png", f"{ds.name}_matches.csv"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    lines = (tmp_path / "out" / f"{ds.name}_matches.csv").read_text().splitlines()
    assert len(lines) == 13 and lines[1].split(",")[1] == "1"


def test_gflops_counts_heads_with_fused_transformer_layers():
    """BoQ's nn.TransformerEncoderLayer takes a fused path under inference mode; counting must still work."""
    import torch

    from edgevpr.eval.efficiency import gflops
    from edgevpr.models.model import load_model

    m = load_model({"backbone": {"name": "dinov2_vits14", "weights": None, "final_norm": False, "depth": 2},
                    "aggregator": {"name": "boq"}, "image_size": [56, 56]})
    with torch.inference_mode():
        inside = gflops(m, (56, 56))
    assert inside == gflops(m, (56, 56)) > 0.1


def test_clearest_failures_are_the_largest_gaps_with_the_best_correct_rank():
    from edgevpr.eval.report import clearest_failures, y_range

    sim = np.array([[0.9, 0.1, 0.5, 0.3],  # wrong top-1 (0); its right image 1 ranks 4th, 0.8 behind
                    [0.2, 0.8, 0.1, 0.0],  # right: not a failure
                    [0.6, 0.55, 0.1, 0.58],  # wrong; the better of its right images (3) ranks 2nd, 0.02 behind
                    [0.9, 0.1, 0.1, 0.1]])  # no right image at all: not shown
    pos = [np.array([1]), np.array([1]), np.array([1, 3]), np.array([], dtype=int)]
    rows = clearest_failures(sim, pos, 5)
    assert [(r["query"], r["wrong"], r["right"], r["right_rank"]) for r in rows] == [(0, 0, 1, 4), (2, 0, 3, 2)]
    assert rows[0]["gap"] == pytest.approx(0.8) and len(clearest_failures(sim, pos, 1)) == 1
    lo, hi = y_range([np.array([0.80, 0.90, 0.95]), np.array([0.85, 0.97, 0.99])])
    assert 0.7 < lo < 0.8 and 0.99 < hi <= 1.005  # not 0..1: the differences between curves show


def test_efficiency_profile_of_a_parameter_free_model():
    """`eval --model pixels-patchnorm` measured its efficiency with next(model.parameters()) and crashed
    (StopIteration): a model without parameters runs on the CPU."""
    from edgevpr.eval.efficiency import profile
    from edgevpr.models.model import load_model

    model = load_model("pixels-patchnorm")
    out = profile(model, (32, 64), model.out_dim, batch_size=2, repeats=2)
    assert out["device"] == "cpu" and out["params"] == 0 and out["ms_per_img_b1"] > 0
