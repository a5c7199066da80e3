import json

import pytest
import torch

from edgevpr.models.model import load_model, preset_names, save_model
from tests.conftest import TINY_MODEL


def test_save_load_roundtrip_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = load_model(TINY_MODEL)
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["fingerprint"] == model.fingerprint() and cfg["aggregator"]["name"] == "gem"
    again = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert again.fingerprint() == model.fingerprint()


def test_fingerprint_tracks_weights_not_weight_source(tmp_path):
    torch.manual_seed(0)
    a = load_model(TINY_MODEL)
    b = load_model({**TINY_MODEL, "backbone": {**TINY_MODEL["backbone"], "weights": "random"}})
    b.load_state_dict(a.state_dict())
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.aggregator.p.add_(1e-3)
    assert a.fingerprint() != b.fingerprint()


def test_tampered_weights_refused(tmp_path):
    model = load_model(TINY_MODEL)
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["fingerprint"] = "0" * 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fingerprint"):
        load_model(tmp_path / "m")


def test_unknown_model_lists_presets():
    with pytest.raises(KeyError, match="effnet-lite0-gem"):
        load_model("no-such-model")
    assert "effnet-lite0-gem" in preset_names()


def test_backbone_weights_from_a_saved_model(tmp_path):
    torch.manual_seed(0)
    donor = load_model({"backbone": {"name": "vit", "timm_name": "vit_tiny_patch16_224"},
                        "aggregator": {"name": "cls"}, "image_size": [64, 64]})
    save_model(donor, tmp_path / "donor")
    torch.manual_seed(1)
    student = load_model({"backbone": {"name": "vit", "timm_name": "vit_tiny_patch16_224",
                                       "weights": str(tmp_path / "donor")},
                          "aggregator": {"name": "gem"}, "image_size": [64, 64]})
    for k, v in donor.backbone.state_dict().items():
        assert torch.equal(v, student.backbone.state_dict()[k])
