"""CLS: the backbone's global token as the descriptor (optionally linearly projected)."""

from __future__ import annotations

import torch
from torch import nn

from ...tokens import Tokens
from .base import AGGREGATORS, Aggregator, HeadContext


class CLSHead(Aggregator):
    """[B, C] CLS token -> [B, out_dim]."""

    def __init__(self, in_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim) if out_dim else nn.Identity()
        self.out_dim = out_dim or in_dim

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        if tokens.cls is None:
            raise ValueError("the 'cls' head needs a backbone with a CLS token (a ViT); this backbone has none")
        return self.proj(tokens.cls)


@AGGREGATORS.register("cls")
def _build(ctx: HeadContext, **cfg) -> CLSHead:
    if not ctx.has_cls:
        raise ValueError("the 'cls' head needs a backbone with a CLS token (a ViT); this backbone has none")
    return CLSHead(ctx.in_dim, **cfg)
