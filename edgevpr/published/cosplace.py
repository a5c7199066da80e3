"""CosPlace (gmberton/CosPlace) and EigenPlaces (gmberton/EigenPlaces), the same layout: a torchvision ResNet
without avgpool/fc as numbered children, then L2Norm -> GeM -> Flatten -> Linear -> L2Norm (``aggregation.1.p``
is GeM's p, ``aggregation.3`` the Linear). edgevpr's GeM with ``l2_first`` computes the same."""

from __future__ import annotations

import torch

from .backbones import resnet
from .base import Converted, Family, Ledger, register


def _cosplace(led: Ledger) -> Converted:
    state: dict[str, torch.Tensor] = {}
    backbone = resnet(led, "backbone.", state, sequential=True)
    state["aggregator.p"] = led.take("aggregation.1.p").reshape(())
    for p in ("weight", "bias"):
        state[f"aggregator.proj.{p}"] = led.take(f"aggregation.3.{p}")
    # CosPlace / EigenPlaces evaluate at the dataset's full resolution; edgevpr batches and exports at one fixed
    # size, chosen here as 480x640 (4:3, the shape of most VPR test photos): set another with --image-size.
    head = {"name": "gem", "p": 3.0, "out_dim": led.shape("aggregation.3.weight")[0], "l2_first": True}
    cfg = {"backbone": backbone, "aggregator": head, "image_size": [480, 640], "interpolation": "bilinear",
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return Converted(cfg, state, led.unused)


COSPLACE = register(Family("cosplace", "gmberton/CosPlace", "MIT", _cosplace))
EIGENPLACES = register(Family("eigenplaces", "gmberton/EigenPlaces", "MIT", _cosplace))
