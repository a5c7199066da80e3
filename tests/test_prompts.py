"""Visual prompt tuning on DINOv2 ViTs: SceneVPT, VPT-deep, adapters."""

import pytest
import torch

from edgevpr.models.backbones import BACKBONES
from edgevpr.models.prompts import cls_attention


def _vit(mode: str, depth: int = 3):
    torch.manual_seed(0)
    return BACKBONES.get("dinov2_vits14")(weights=None, depth=depth, init_values=1.0,
                                          prompts={"mode": mode, "num": 8}).eval()


def test_prompt_parameter_count_of_dinov2_s_default():
    bb = BACKBONES.get("dinov2_vits14")(weights=None, prompts={"mode": "scene", "num": 32})
    n = sum(p.numel() for p in bb.prompts.parameters())
    print(f"SceneVPT parameters on DINOv2-S, 32 prompts x 12 blocks: {n}")  # 32*384*12 + 12 gammas
    assert n == 32 * 384 * 12 + 12 and abs(n - 0.15e6) < 0.01e6


@pytest.mark.parametrize("sparsity", [None, 0.5])
def test_cls_to_prompt_attention_equals_the_blocks_own_attention(sparsity):
    """Also on a ternary ViT at activation sparsity 0.5: the scores see what the block's qkv layer computes."""
    bb = _vit("scene")
    if sparsity is not None:
        from edgevpr.models.ternary import TernaryLinear, apply_ternary

        apply_ternary(bb)
        for m in bb.modules():
            if isinstance(m, TernaryLinear):
                m.sparsity = sparsity
    blk = bb.vit.blocks[1]
    x = torch.randn(2, 1 + 8 + 16, 384)
    got = cls_attention(blk, x, slice(1, 9))
    seen = {}
    blk.attn.fused_attn = False
    handle = blk.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("attn", o))
    with torch.no_grad():
        blk(x)
    handle.remove()
    want = seen["attn"][:, :, 0, 1:9].mean(1)  # [B, heads, T, T] -> CLS row, prompt keys, head mean
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_scene_prompts_adapt_to_the_image_and_come_out_as_tokens():
    bb = _vit("scene")
    x = torch.randn(2, 3, 56, 56)
    t, _ = bb.embed(x)
    out, alphas = bb.prompts.run(bb.vit.blocks, t, bb.num_prefix)
    assert alphas.shape == (2, 2, 8) and ((alphas > 0) & (alphas < 1)).all()
    assert not torch.allclose(alphas[0], alphas[1])  # two images, two prompt mixes
    tok = bb(x)
    assert tok.prompts.shape == (2, 8, 384) and tok.patches.shape == (2, 16, 384) and tok.grid == (4, 4)


def test_deep_prompts_and_adapters_and_no_prefix_cache():
    deep, adapter = _vit("deep"), _vit("adapter")
    x = torch.randn(1, 3, 56, 56)
    assert deep(x).prompts.shape == (1, 8, 384) and adapter(x).prompts is None
    plain = BACKBONES.get("dinov2_vits14")(weights=None, depth=3, init_values=1.0).eval()
    plain.load_state_dict({k.replace(".mlp.mlp.", ".mlp."): v for k, v in adapter.state_dict().items()
                           if "adapter" not in k})
    with torch.no_grad():
        assert torch.equal(plain(x).patches, adapter(x).patches)  # zero-initialised adapters start as identity
    assert not deep.cacheable_prefix
    with pytest.raises(ValueError, match="no frozen prefix"):
        deep.forward_prefix(x, 2)
