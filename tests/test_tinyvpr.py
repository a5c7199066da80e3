"""TinyVPR's loss terms: gradients, zero points, hard-negative mining, MS equivalence, nothing exported."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edgevpr.train.losses import ConfusionAwareMS, CrossAttentionAlign, MultiSimilarity, PosNegDistill, hard_negatives
from tests.conftest import TINY_MODEL

LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def _desc(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_gradients_are_correct():
    teacher = _desc(d=7, seed=1)
    pn = PosNegDistill(hard_k=2)
    ms = ConfusionAwareMS(beta=5.0, gamma=0.7, epsilon=0.5)
    x = _desc().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d: pn.loss(d, teacher, LABELS), (x,))
    assert torch.autograd.gradcheck(lambda d: ms.loss(d, LABELS, teacher), (x,))
    align = CrossAttentionAlign(3, 4).double()
    s = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: align.loss(a, t), (s,))


def test_distillation_is_zero_when_student_equals_teacher():
    d = _desc()
    assert float(PosNegDistill().loss(d, d, LABELS)) == 0.0
    assert float(PosNegDistill().loss(_desc(seed=3), d, LABELS)) > 0


def test_hard_negatives_are_the_teachers_most_similar_other_places():
    t = torch.tensor([[1.0, 0.9, 0.8, 0.1, 0.7, 0.0],
                      [0.9, 1.0, 0.2, 0.3, 0.1, 0.6]])
    sim = torch.eye(6)
    sim[:2] = t
    got = hard_negatives(sim, LABELS, 2)
    assert got[0].tolist() == [2, 4] and got[1].tolist() == [5, 3]  # never itself or its own place (0, 1)


def test_confusion_aware_ms_reduces_to_multi_similarity():
    d = _desc(d=8, seed=5).float()
    ref, _ = MultiSimilarity()(d, LABELS)
    assert float(ConfusionAwareMS(gamma=0.0).loss(d, LABELS)) == pytest.approx(float(ref), rel=1e-5)
    teacher = d.clone()
    assert float(ConfusionAwareMS(gamma=1.0).loss(d, LABELS, teacher)) >= float(ref)  # confusing negatives weigh more


def test_alignment_module_is_not_exported(data_root, tmp_path):
    from edgevpr.train.loop import train
    from tests.test_train import _nordland_conf

    conf = _nordland_conf(data_root, 2, TINY_MODEL, [64, 64], every=2)
    conf["teacher"] = {"model": "effnet-lite0-gem", "image_size": [96, 96]}
    conf["loss"] = {"ms": {"weight": 0.0}, "terms": [{"name": "confusion_ms"}, {"name": "posneg_distill"},
                                                     {"name": "xattn_align"}]}
    out = train(conf, tmp_path / "run", progress=False)
    assert {"loss/confusion_ms", "loss/posneg_distill", "loss/xattn_align"} <= set(out)
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000002" / "train_state.safetensors"))
    assert any(k.startswith("terms.xattn_align.") for k in state)  # trained and checkpointed...
    assert not any("xattn" in k or "align" in k or "proj" in k for k in saved)  # ...but not in the model


def test_alignment_cannot_be_satisfied_without_the_student(data_root):
    """Bias-only control: a projector that ignores the student (weight frozen at 0) must stay far from the full one.

    Measured on 16 Gardens Point images, 300 Adam steps (MobileNetV2 block-4 student tokens, EfficientNet-lite0
    teacher tokens): full 0.124, bias-only 0.586 (the earlier student-queries form: 0.135 vs 0.218).
    """
    from edgevpr.data.images import load_image
    from edgevpr.models.model import load_model

    student = load_model({"backbone": {"name": "mobilenetv2", "weights": "offline",
                                       "crop": ["blocks.5", "blocks.6", "conv_head", "bn2"]},
                          "aggregator": {"name": "gem"}, "image_size": [224, 224]})
    teacher = load_model("effnet-lite0-gem")
    imgs = [load_image(data_root / "gardens_point" / "day_right" / f"Image{i:03d}.jpg") for i in range(0, 64, 8)]
    with torch.no_grad():
        s = student.backbone(torch.stack([student.transform()(im) for im in imgs])).patches
        t = teacher.backbone(torch.stack([teacher.transform()(im) for im in imgs])).patches
    ends = {}
    for bias_only in (False, True):
        torch.manual_seed(0)
        align = CrossAttentionAlign(s.shape[-1], t.shape[-1])
        if bias_only:
            with torch.no_grad():
                align.proj.weight.zero_()
            align.proj.weight.requires_grad_(False)
        opt = torch.optim.Adam([p for p in align.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            align.loss(s, t).backward()
            opt.step()
        ends[bias_only] = float(align.loss(s, t).detach())
    assert ends[True] > 2.5 * ends[False], ends
