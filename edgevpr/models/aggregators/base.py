"""Aggregator base class and registry: Tokens in, L2-normalised descriptor [B, D] out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...registry import Registry
from ...tokens import Tokens


@dataclass(frozen=True)
class HeadContext:
    """What a head may need to know about its backbone when it is built.

    in_dim: channel width C of the tokens; has_cls: the backbone gives a global token;
    grid: (H, W) patch grid at the model's configured input size.
    """

    in_dim: int
    has_cls: bool
    grid: tuple[int, int]


class Aggregator(nn.Module):
    """Subclasses set ``out_dim`` and implement ``aggregate(tokens) -> [B, D]`` (unnormalised)."""

    #: True for heads that need the full patch grid (convolutions over the map, fixed-size mixers).
    needs_grid: bool = False
    out_dim: int

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """[B, N, C] tokens -> [B, out_dim] L2-normalised float descriptor."""
        return nn.functional.normalize(self.aggregate(tokens), dim=-1)


AGGREGATORS: Registry[Aggregator] = Registry("aggregator")
