"""`edgevpr compress`: candidates measured on this CPU and on the map's own held-out images, chosen under a budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevpr.cli import main
from edgevpr.compress.budget import accuracy, compress, split
from edgevpr.data.images import load_image
from edgevpr.eval.extract import extract
from edgevpr.models.model import load_model, save_model
from edgevpr.models.ternary import TernaryLinear
from tests.conftest import TINY_MODEL, shared_data


def test_agreement_is_r1_with_the_teacher_as_ground_truth_and_neighbours_are_left_out():
    rng = np.random.default_rng(0)
    teacher, student = rng.integers(0, 50, 200), rng.integers(0, 50, 200)
    assert accuracy(student, teacher) == accuracy(student, teacher, [np.array([t]) for t in teacher])
    assert accuracy(student, teacher, [np.array([t, s]) for t, s in zip(teacher, student, strict=True)]) == 1.0
    db, q, mask = split(30, 10, 2)
    assert q.tolist() == [5, 15, 25] and not set(q) & set(db) and len(db) == 27
    left_out = {int(qi): set(db[m].tolist()) for qi, m in zip(q, mask, strict=True)}
    assert left_out[15] == {13, 14, 16, 17}  # +-2 map positions, the query itself is not in the database


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    save_model(load_model(TINY_MODEL), path)
    return str(path)


def test_chosen_model_respects_the_budget_and_a_killed_run_resumes_to_the_same_result(teacher, tmp_path):
    images = str(shared_data() / "gardens_point" / "day_right")
    run = dict(sizes=(1.0, 0.5), dims=(0, 64), distil_steps=8, progress=False)
    whole = compress(teacher, images, 1e6, tmp_path / "whole", **run)

    class Killed(Exception):
        pass

    def kill(*args):
        raise Killed(args)

    with pytest.raises(Killed):  # killed after the first plain candidate
        compress(teacher, images, 1e6, tmp_path / "resumed", **run, on_candidate=kill)
    done = sorted((tmp_path / "resumed" / "candidates").glob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in done]
    with pytest.raises(Killed):  # killed again in the middle of distillation (after step 5 of 8, checkpoint at 4)
        compress(teacher, images, 1e6, tmp_path / "resumed", **run, on_step=lambda step, m: step == 5 and kill())
    assert not (tmp_path / "resumed" / "train" / "32x32-distilled" / "final").exists()
    resumed = compress(teacher, images, 1e6, tmp_path / "resumed", **run)
    assert len(done) == 2 and [f.stat().st_mtime_ns for f in done[:2]] == stamps  # finished work reused, not redone
    acc = [(c["name"], c["accuracy"], c["teacher_cos"]) for c in whole["candidates"]]
    assert acc == [(c["name"], c["accuracy"], c["teacher_cos"]) for c in resumed["candidates"]] and len(acc) == 14
    # the smaller CNN of the family (MobileNetV3 without its last two stages) at the largest size within budget
    small = load_model(str(tmp_path / "whole" / "train" / "smaller-start"))
    assert len(small.backbone.net.blocks) == 6 and small.config["backbone"]["crop"][:2] == ["blocks.4", "blocks.5"]
    assert {c["name"] for c in whole["candidates"] if c["kind"] == "blocks4"} == {  # 48 channels: no 64-D PCA
        "64x64-blocks4-fp32-48d", "64x64-blocks4-int8-48d"}
    # distillation moves the small student towards the teacher's descriptors of held-out images
    cos = {c["name"]: c["teacher_cos"] for c in whole["candidates"]}
    assert cos["32x32-distilled-fp32-576d"] > cos["32x32-fp32-576d"] + 0.05, cos
    ms = {c["name"]: c["ms"] for c in whole["candidates"]}  # the same graph as its plain twin: the twin's time
    assert ms["32x32-distilled-int8-64d"] == ms["32x32-int8-64d"] and ms["32x32-distilled-fp32-576d"] == \
        ms["32x32-fp32-576d"]
    assert whole["chosen"]["name"] == resumed["chosen"]["name"]
    assert whole["teacher"]["accuracy"] == 1.0 and whole["chosen"]["accuracy"] == 1.0  # all fit: the teacher's twin
    # the most accurate candidate made slow (its recorded time raised): a budget below it picks the best of the rest
    best = whole["chosen"]["name"].rsplit("-", 1)[0]
    rec = tmp_path / "whole" / "candidates" / f"{best}.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "ms": 1000.0}))
    r = compress(teacher, images, 500, tmp_path / "whole", **run)
    within = [c for c in r["candidates"] if c["ms"] <= 500]
    assert r["chosen"]["ms"] <= 500 and not r["chosen"]["name"].startswith(best)
    assert r["chosen"]["accuracy"] == max(c["accuracy"] for c in within) < 1.0
    assert (tmp_path / "whole" / "model.onnx").is_file() and (tmp_path / "whole" / "frontier.png").is_file()
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["chosen"] == r["chosen"] and report["not_tried"]
    # with ground truth, a label-free choice: the most agreement with the teacher (closest descriptors on ties)
    gt = dict(queries=images, aligned=0)
    by_r1 = compress(teacher, images, 500, tmp_path / "gt", **run, **gt)
    by_agreement = compress(teacher, images, 500, tmp_path / "gt", **run, **gt, choose_by="agreement")
    within = [c for c in by_agreement["candidates"] if c["ms"] <= 500]
    key = max((c["agreement"], c["teacher_cos"] or 0.0) for c in within)  # None: a narrower student's descriptor
    assert (by_agreement["chosen"]["agreement"], by_agreement["chosen"]["teacher_cos"] or 0.0) == key
    assert by_agreement["chosen_by"] == "top-1 agreement with the teacher" and by_r1["chosen_by"] == "R@1"


def test_an_unreachable_budget_is_one_line_naming_the_fastest_candidate(teacher, tmp_path, capsys):
    images = str(shared_data() / "gardens_point" / "day_right")
    argv = ["compress", "--teacher", teacher, "--images", images, "--budget-ms", "0.0001", "--out",
            str(tmp_path / "c"), "--sizes", "0.5", "--dims", "0", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgevpr: error: no candidate meets --budget-ms 0.0001: the fastest, 32x32-") and \
        "ms on this CPU" in err and "\n" not in err


def test_a_weitop_teacher_is_tried_at_keep_ratios_and_its_students_train_at_sampled_ones(tmp_path):
    """A model with a WeiToP scorer: every size is also exported with the keep ratio baked in (a pruned export
    computes other descriptors than the unpruned one), and the distilled student trains at keep ratios drawn
    from [min keep, 1]; with ``distil_sizes=1`` only the largest smaller size gets a student. ``ternary``: a TAT-VPR
    stage-1 candidate too."""
    torch.manual_seed(0)
    spec = {"backbone": {"name": "dinov2_vits14", "weights": None, "depth": 4, "init_values": 1.0,
                         "pruning": {"block": 2, "method": "weitop"}},
            "aggregator": {"name": "weiad", "num_clusters": 4, "cluster_dim": 8, "token_dim": 8},
            "image_size": [84, 84], "name": "tiny-weitop"}
    save_model(load_model(spec), tmp_path / "teacher")
    images = str(shared_data() / "gardens_point" / "day_right")
    r = compress(str(tmp_path / "teacher"), images, 1e6, tmp_path / "c", sizes=(1.0, 0.75, 0.5), dims=(0,),
                 keep_ratios=(0.5,), distil_steps=4, distil_sizes=1, progress=False, ternary=True)
    got = {c["name"].rsplit("-", 1)[0]: c for c in r["candidates"]}  # a student at the largest smaller size only
    assert set(got) == {f"{s}{d}-keep{k}-{t}" for s, d in (("84x84", ""), ("56x56", ""), ("42x42", ""),
                                                            ("56x56", "-distilled"))
                        for k in ("1", "0.5") for t in ("fp32", "int8")} | {"84x84-ternary-keep1-int8",
                                                                             "84x84-ternary-keep0.5-int8"}
    # TAT-VPR stage 1: the teacher's latent weights made ternary, token-distilled towards the teacher; int8 only, at
    # the largest size within budget, timed as its int8 twin
    assert got["84x84-ternary-keep0.5-int8"]["ms"] == got["84x84-keep0.5-int8"]["ms"]
    assert "ternary" not in " ".join(r["not_tried"]) and r["stages_s"]["ternary_s"] > 0
    conf = json.loads((tmp_path / "c" / "train" / "84x84-ternary" / "config.json").read_text())
    assert {"name": "token_distill"} in conf["loss"]["terms"] and conf["model"].endswith("ternary-start")
    start, trained = load_model(conf["model"]), load_model(str(tmp_path / "c" / "train" / "84x84-ternary" / "final"))
    tm = load_model(str(tmp_path / "teacher"))
    t_sd = tm.state_dict()
    assert all(torch.equal(v, t_sd[k]) for k, v in start.state_dict().items())
    layers = [m for m in trained.modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == 4 * 4 - 2 and all(set(m.quantized()[0].unique().tolist()) <= {-1, 0, 1} for m in layers)
    paths = sorted((shared_data() / "gardens_point" / "day_left").glob("*.jpg"))[:20]
    d_t, d_0, d_1 = (extract(m, paths, progress=False).descriptors for m in (tm, start, trained))
    assert (d_1 * d_t).sum(1).mean() > (d_0 * d_t).sum(1).mean() + 0.05  # measured 0.86 vs 0.74
    assert got["84x84-keep1-fp32"]["teacher_cos"] > 0.9999  # the teacher's own export
    assert got["84x84-keep0.5-fp32"]["teacher_cos"] < 0.999 and got["84x84-keep0.5-fp32"]["keep_ratio"] == 0.5
    conf = json.loads((tmp_path / "c" / "train" / "56x56-distilled" / "config.json").read_text())
    assert conf["knobs"] == {"keep_ratio": {"uniform": [0.5, 1.0]}}
    with pytest.raises(ValueError, match=r"--keep-ratios 0 0.5: each must be in \(0, 1\]"):
        compress(str(tmp_path / "teacher"), images, 1e6, tmp_path / "d", keep_ratios=(0, 0.5))


def test_a_teacher_without_a_scorer_gets_a_weitop_scorer_and_a_smaller_student(tmp_path):
    """A ViT + WeiAD teacher without token pruning: a WeiToP scorer is trained for it (only the scorer moves, by
    self-distillation towards the head's own token importance), and every candidate is then tried at keep ratios;
    at keep 1 the scored model is the teacher. A smaller ViT of its family (its first half of blocks, their
    weights) is distilled from it."""
    torch.manual_seed(0)
    spec = {"backbone": {"name": "dinov2_vits14", "weights": None, "depth": 4, "init_values": 1.0},
            "aggregator": {"name": "weiad", "num_clusters": 4, "cluster_dim": 8, "token_dim": 8},
            "image_size": [56, 56], "name": "tiny-weiad"}
    save_model(load_model(spec), tmp_path / "teacher")
    images = str(shared_data() / "gardens_point" / "day_right")
    r = compress(str(tmp_path / "teacher"), images, 1e6, tmp_path / "c", sizes=(1.0,), dims=(0,),
                 keep_ratios=(0.5,), distil_steps=12, progress=False)
    got = {c["name"].rsplit("-", 1)[0]: c for c in r["candidates"]}
    assert {"56x56-keep1-fp32", "56x56-keep0.5-fp32", "56x56-keep0.5-int8"} <= set(got)
    assert got["56x56-keep1-fp32"]["teacher_cos"] > 0.9999 and r["teacher"]["spec"] == str(tmp_path / "teacher")
    assert r["weitop_scorer"].endswith("scorer/final") and r["stages_s"]["scorer_s"] > 0
    teacher, start = load_model(str(tmp_path / "teacher")), load_model(str(tmp_path / "c" / "train" / "scorer-start"))
    scored = load_model(r["weitop_scorer"])
    t_sd, s_sd, start_sd = teacher.state_dict(), scored.state_dict(), start.state_dict()
    assert set(s_sd) - set(t_sd) and all(k.startswith("backbone.pruner.") for k in set(s_sd) - set(t_sd))
    assert all(torch.equal(s_sd[k], v) for k, v in t_sd.items())  # only the scorer trained
    assert any(not torch.equal(s_sd[k], start_sd[k]) for k in set(s_sd) - set(t_sd))
    # the scorer learned the head's token importance: its KL to it fell below the untrained scorer's
    to_input = scored.transform()
    x = torch.stack([to_input(load_image(p)) for p in sorted(Path(images).glob("*.jpg"))[:16]])

    def kl(model) -> float:
        with torch.no_grad():
            target = model.aggregator.eval().importance(model.forward_tokens(x))  # keep 1: every token
            with model.using(keep_ratio=0.5):
                model.forward_tokens(x)
            log_t = torch.log_softmax(target.clamp_min(1e-12).log(), -1)
            log_s = torch.log_softmax(model.backbone.pruner.last_logits, -1)
            return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())

    assert kl(scored) < 0.5 * kl(start), (kl(scored), kl(start))  # measured 0.0025 vs 0.0091
    # the smaller ViT of the family: the teacher's first half of blocks (2 of 4), distilled towards the teacher
    depth_start = load_model(str(tmp_path / "c" / "train" / "smaller-start"))
    assert len(depth_start.backbone.vit.blocks) == 2
    assert all(torch.equal(v, s_sd[k]) for k, v in depth_start.state_dict().items())
    small = {k: c for k, c in got.items() if "-depth2-" in k}
    assert set(small) == {f"56x56-depth2-keep{k}-{t}" for k in ("1", "0.5") for t in ("fp32", "int8")}, set(got)
    conf = json.loads((tmp_path / "c" / "train" / "56x56-depth2" / "config.json").read_text())
    assert conf["model"].endswith("smaller-start") and conf["teacher"]["model"] == r["weitop_scorer"]
    assert {"name": "token_distill"} in conf["loss"]["terms"] and {"name": "descriptor_distill"} in \
        conf["loss"]["terms"]
    trained = load_model(str(tmp_path / "c" / "train" / "56x56-depth2" / "final")).state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in depth_start.state_dict().items() if "blocks" in k)
