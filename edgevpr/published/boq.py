"""Bag-of-Queries (amaralibey/Bag-of-Queries): BoQ on DINOv2 (no final norm, CLS dropped) or on ResNet50
cropped after layer3. Upstream names ``proj_c``, ``norm_input``, ``boqs`` are edgevpr's ``proj``, ``norm_in``,
``blocks``; a BoQ block's own parameter names are the same on both sides.
"""

from __future__ import annotations

import torch

from .backbones import dinov2, resnet
from .base import CheckpointError, Converted, Family, Ledger, register

_RENAME = {"proj_c": "proj", "norm_input": "norm_in", "boqs": "blocks", "fc": "fc"}


def boq_head(led: Ledger, prefix: str, out: dict[str, torch.Tensor]) -> dict:
    """BoQ keys under ``prefix`` -> edgevpr ``aggregator.*``; returns the head config."""

    def rename(rest: str) -> str:
        head, _, tail = rest.partition(".")
        if head not in _RENAME:
            raise CheckpointError(f"{led.where}: {prefix}{rest} is not part of a BoQ head")
        return f"{_RENAME[head]}.{tail}"

    led.move(prefix, "aggregator.", out, rename)
    return {"name": "boq", "proj_dim": led.shape(f"{prefix}proj_c.weight")[0],
            "num_queries": led.shape(f"{prefix}boqs.0.queries")[1], "num_layers": led.count(f"{prefix}boqs."),
            "row_dim": led.shape(f"{prefix}fc.weight")[0]}


def _boq(led: Ledger) -> Converted:
    state: dict[str, torch.Tensor] = {}
    if led.has("backbone.dino.pos_embed"):
        backbone = dinov2(led, "backbone.dino.", False, state,
                          norm_reason="stored in the release but not applied: BoQ uses DINOv2's tokens before the "
                                      "final norm")
        # BoQ's README: Resize(322, 322) bicubic, antialiased; ImageNet mean/std
        size, interp = [322, 322], "bicubic"
    elif led.has("backbone.net.0.weight"):
        backbone = resnet(led, "backbone.net.", state, sequential=True)
        size, interp = [384, 384], "bicubic"
    else:
        raise CheckpointError(f"{led.where}: not a BoQ checkpoint (neither backbone.dino.* nor backbone.net.*)")

    head = boq_head(led, "aggregator.", state)
    cfg = {"backbone": backbone, "aggregator": head, "image_size": size, "interpolation": interp,
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return Converted(cfg, state, led.unused)


BOQ = register(Family("boq", "amaralibey/Bag-of-Queries", "MIT", _boq))
