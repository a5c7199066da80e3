"""DINOv2-SALAD (serizba/salad) and MegaLoc (gmberton/MegaLoc): a DINOv2 ViT with its final norm and a SALAD head.

SALAD's score and cluster MLPs are 1x1 convolutions upstream and per-token Linear layers here (same numbers);
MegaLoc adds a linear layer on the normalised SALAD descriptor. Dropout sits at index 1 of both MLPs upstream
and here, so the Sequential indices match.
"""

from __future__ import annotations

import torch

from .backbones import dinov2
from .base import Converted, Family, Ledger, conv1x1_to_linear, register

DINOV2_PREPROCESS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def salad_head(led: Ledger, prefix: str, dst: str, out: dict[str, torch.Tensor]) -> dict:
    """SALAD keys under ``prefix`` -> edgevpr aggregator keys under ``dst``; returns the head's settings."""
    for mlp in ("cluster_features", "score"):
        for i in (0, 3):
            out[f"{dst}{mlp}.{i}.weight"] = conv1x1_to_linear(led.take(f"{prefix}{mlp}.{i}.weight"))
            out[f"{dst}{mlp}.{i}.bias"] = led.take(f"{prefix}{mlp}.{i}.bias")
    for i in (0, 2):
        for p in ("weight", "bias"):
            out[f"{dst}token_features.{i}.{p}"] = led.take(f"{prefix}token_features.{i}.{p}")
    out[f"{dst}dust_bin"] = led.take(f"{prefix}dust_bin").reshape(())
    return {"num_clusters": led.shape(f"{prefix}score.3.weight")[0],
            "cluster_dim": led.shape(f"{prefix}cluster_features.3.weight")[0],
            "token_dim": led.shape(f"{prefix}token_features.2.weight")[0],
            "hidden": led.shape(f"{prefix}token_features.0.weight")[0]}


def _salad(led: Ledger) -> Converted:
    state: dict[str, torch.Tensor] = {}
    backbone = dinov2(led, "backbone.model.", True, state)
    head = salad_head(led, "aggregator.", "aggregator.", state)
    # salad's eval.py: Resize(322, 322) bilinear, ImageNet mean/std
    cfg = {"backbone": backbone, "aggregator": {"name": "salad", **head}, "image_size": [322, 322],
           "interpolation": "bilinear", **DINOV2_PREPROCESS}
    return Converted(cfg, state, led.unused)


def _megaloc(led: Ledger) -> Converted:
    state: dict[str, torch.Tensor] = {}
    backbone = dinov2(led, "backbone.", True, state)
    head = salad_head(led, "aggregator.agg.", "aggregator.", state)
    for p in ("weight", "bias"):
        state[f"aggregator.linear.{p}"] = led.take(f"aggregator.linear.{p}")
    # MegaLoc resizes any input to multiples of 14 (antialiased bilinear); 322 px is its usual evaluation size
    cfg = {"backbone": backbone, "aggregator": {"name": "megaloc", "out_dim": led.shape("aggregator.linear.weight")[0],
                                               **head},
           "image_size": [322, 322], "interpolation": "bilinear", **DINOV2_PREPROCESS}
    return Converted(cfg, state, led.unused)


SALAD = register(Family("salad", "serizba/salad", "GPL-3.0", _salad))
MEGALOC = register(Family("megaloc", "gmberton/MegaLoc", "MIT", _megaloc))
