"""MixVPR (amaralibey/MixVPR): ResNet50 cropped after layer3 + feature mixers over the 20x20 map at 320 px.
Upstream ``mix.i.mix`` is edgevpr's ``mixers.i.mix`` (same Sequential indices)."""

from __future__ import annotations

import math

import torch

from .backbones import resnet
from .base import CheckpointError, Converted, Family, Ledger, register


def _mixvpr(led: Ledger) -> Converted:
    state: dict[str, torch.Tensor] = {}
    backbone = resnet(led, "backbone.model.", state, sequential=False)
    led.move("aggregator.mix.", "aggregator.mixers.", state)
    for name in ("channel_proj", "row_proj"):
        for p in ("weight", "bias"):
            state[f"aggregator.{name}.{p}"] = led.take(f"aggregator.{name}.{p}")
    hw = led.shape("aggregator.row_proj.weight")[1]
    side = math.isqrt(hw)
    if side * side != hw:
        raise CheckpointError(f"{led.where}: MixVPR over {hw} positions is not a square map")
    head = {"name": "mixvpr", "out_channels": led.shape("aggregator.channel_proj.weight")[0],
            "mix_depth": led.count("aggregator.mix."),
            "mlp_ratio": led.shape("aggregator.mix.0.mix.1.weight")[0] / hw,
            "out_rows": led.shape("aggregator.row_proj.weight")[0]}
    # MixVPR's README: Resize(320, 320) bilinear, ImageNet mean/std; the map is 1/16 of the input
    cfg = {"backbone": backbone, "aggregator": head, "image_size": [side * 16, side * 16],
           "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return Converted(cfg, state, led.unused)


MIXVPR = register(Family("mixvpr", "amaralibey/MixVPR", "MIT", _mixvpr))
