"""TeTRA (OliverGrainge/TeTRA-VPR): its ternary ViT (``edgevpr.models.tetra_vit``) with a BoQ or SALAD head.

Upstream names -> edgevpr: ``to_patch_embedding.{1,2,3}`` -> ``patch_norm1``, ``patch_proj``, ``patch_norm2``;
``pos_embedding`` -> ``pos_embed``; ``transformer.layers.i.0`` (attention: ``lnorm1``, ``to_qkv``, ``lnorm2``,
``to_out.0``) -> ``blocks.i.attn`` (``norm1``, ``qkv``, ``norm2``, ``proj``); ``transformer.layers.i.1.net``
(``0`` LN, ``1`` fc1, ``4`` LN, ``5`` fc2; the last block ``0``, ``1``, ``4`` = fc2) -> ``blocks.i.ffn``. The
release stores fp32 latent weights; edgevpr ternarises them the way TeTRA's eval mode does.
"""

from __future__ import annotations

import math

import torch

from ..models.tetra_vit import tetra_ternary
from .backbones import HEAD_DIM
from .base import CheckpointError, Converted, Family, Ledger, register
from .boq import boq_head
from .salad import salad_head

_ATTN = {"lnorm1": "norm1", "to_qkv": "qkv", "lnorm2": "norm2", "to_out.0": "proj"}


def _backbone(led: Ledger, out: dict[str, torch.Tensor]) -> dict:
    p = "backbone."
    pos = led.shape(p + "pos_embedding")
    dim, n = pos[-1], pos[1] - 1
    side = math.isqrt(n)
    patch_dim = led.shape(p + "to_patch_embedding.2.weight")[1]
    patch = math.isqrt(patch_dim // 3)
    depth = led.count(p + "transformer.layers.")
    if side * side != n or 3 * patch * patch != patch_dim or depth < 2:
        raise CheckpointError(f"{led.where}: not a TeTRA ternary ViT (pos_embedding {pos}, patch dim {patch_dim})")
    for src, dst in (("1", "patch_norm1"), ("2", "patch_proj"), ("3", "patch_norm2")):
        for t in ("weight", "bias"):
            out[f"backbone.{dst}.{t}"] = led.take(f"{p}to_patch_embedding.{src}.{t}")
    out["backbone.pos_embed"] = led.take(p + "pos_embedding")
    out["backbone.cls_token"] = led.take(p + "cls_token")
    for t in ("weight", "bias"):
        led.skip(f"{p}transformer.norm.{t}", "TeTRA's final norm is defined but never applied")
    for i in range(depth):
        src, dst = f"{p}transformer.layers.{i}.", f"backbone.blocks.{i}."
        for a, b in _ATTN.items():
            for t in ("weight", "bias"):
                if led.has(f"{src}0.{a}.{t}"):
                    out[f"{dst}attn.{b}.{t}"] = led.take(f"{src}0.{a}.{t}")
        ffn = {"0": "norm1", "1": "fc1", "4": "norm2", "5": "fc2"} if i < depth - 1 else \
            {"0": "norm1", "1": "fc1", "4": "fc2"}
        for a, b in ffn.items():
            for t in ("weight", "bias"):
                out[f"{dst}ffn.{b}.{t}"] = led.take(f"{src}1.net.{a}.{t}")
    inner = led.shape(f"{p}transformer.layers.0.0.to_qkv.weight")[0] // 3
    return {"name": "tetra_vit", "dim": dim, "depth": depth, "heads": inner // HEAD_DIM, "dim_head": HEAD_DIM,
            "mlp_dim": led.shape(f"{p}transformer.layers.0.1.net.1.weight")[0], "patch_size": patch,
            "image_size": side * patch}


def _tetra(led: Ledger) -> Converted:
    state: dict[str, torch.Tensor] = {}
    backbone = _backbone(led, state)
    if led.has("aggregation.proj_c.weight"):
        head = boq_head(led, "aggregation.", state)
    elif led.has("aggregation.score.3.weight"):
        head = {"name": "salad", **salad_head(led, "aggregation.", "aggregator.", state)}
    else:
        raise CheckpointError(f"{led.where}: a TeTRA checkpoint with neither a BoQ nor a SALAD head")
    size = backbone["image_size"]
    # TeTRA's eval transforms: Resize(322, 322) bilinear (antialiased), ImageNet mean/std
    cfg = {"backbone": backbone, "aggregator": head, "image_size": [size, size], "interpolation": "bilinear",
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "ternary": tetra_ternary(backbone["depth"])}
    return Converted(cfg, state, led.unused)


TETRA = register(Family("tetra", "OliverGrainge/TeTRA-VPR", "MIT", _tetra, binary=True))
