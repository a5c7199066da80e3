"""SeqSLAM's front end as a model (``pixels-patchnorm``): grayscale, downsampled, patch-normalised pixels.

The image is resized to the model's small input size (32 x 64 by default, the Nordland thumbnails' shape) by the
preprocessing, turned to grayscale (ITU-R 601 luma), and every ``patch`` x ``patch`` block is normalised to zero mean
and unit standard deviation (SeqSLAM's patch normalisation: invariant to each block's brightness and contrast). The
descriptor is the normalised image flattened and L2-normalised (``flatten`` head). No weights: it costs nothing and,
on tiny frames with strong appearance change, is the baseline ImageNet CNNs have to beat.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tokens import Tokens
from .aggregators.base import AGGREGATORS, Aggregator, HeadContext
from .backbones import BACKBONES, Backbone, Preprocess

LUMA = (0.299, 0.587, 0.114)


class PatchNormPixels(Backbone):
    """images [B, 3, H, W] in [0, 1] -> Tokens: one 1-channel token per pixel on the (H, W) grid."""

    has_cls = False
    cacheable_prefix = False

    def __init__(self, patch: int = 8, eps: float = 1e-6, weights: str | None = None) -> None:
        super().__init__()
        self.patch, self.eps = patch, eps
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        self.out_dim, self.stride = 1, 1
        self.preprocess = Preprocess((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")

    def stages(self) -> list[nn.Module]:
        return []

    def stem(self) -> list[nn.Module]:
        return []

    def forward(self, x: torch.Tensor) -> Tokens:
        g = (x * self.luma).sum(1, keepdim=True)  # [B, 1, H, W]
        b, _, h, w = g.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"pixels-patchnorm: input {h}x{w} is not a multiple of the patch size {p}")
        blocks = g.reshape(b, 1, h // p, p, w // p, p)
        mean = blocks.mean((3, 5), keepdim=True)
        std = blocks.std((3, 5), keepdim=True, unbiased=False)
        g = ((blocks - mean) / (std + self.eps)).reshape(b, 1, h, w)
        return Tokens.from_map(g)


class Flatten(Aggregator):
    """Every token of the full grid, concatenated: [B, N, C] -> [B, N*C] (needs the full grid)."""

    needs_grid = True

    def __init__(self, in_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.out_dim = in_dim * grid[0] * grid[1]

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        return tokens.as_map("flatten").flatten(1)


@BACKBONES.register("pixels")
def _pixels(**cfg) -> Backbone:
    return PatchNormPixels(**cfg)


@AGGREGATORS.register("flatten")
def _flatten(ctx: HeadContext, **cfg) -> Flatten:
    return Flatten(ctx.in_dim, ctx.grid, **cfg)


__all__ = ["Flatten", "PatchNormPixels"]
