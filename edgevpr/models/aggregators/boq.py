"""BoQ, Bag-of-Queries (Ali-bey et al., CVPR 2024): learned queries cross-attend the token map."""

from __future__ import annotations

import torch
from torch import nn

from ...tokens import Tokens
from .base import AGGREGATORS, Aggregator, HeadContext


class BoQBlock(nn.Module):
    """Self-attention over the input tokens, then learned queries cross-attend them.

    x [B, N, D] -> (x' [B, N, D], out [B, Q, D]).
    """

    def __init__(self, dim: int, num_queries: int, heads: int) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(x)
        q = self.queries.expand(x.shape[0], -1, -1)
        q = self.norm_q(q + self.self_attn(q, q, q, need_weights=False)[0])
        out = self.norm_out(self.cross_attn(q, x, x, need_weights=False)[0])
        return x, out


class BoQ(Aggregator):
    """[B, C, H, W] map -> 3x3 conv to D -> L BoQ blocks -> linear over queries to row_dim -> [B, D*row_dim]."""

    needs_grid = True

    def __init__(self, in_dim: int, proj_dim: int = 384, num_queries: int = 64, num_layers: int = 2,
                 row_dim: int = 32) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, proj_dim, 3, padding=1)
        self.norm_in = nn.LayerNorm(proj_dim)
        heads = max(1, proj_dim // 64)
        self.blocks = nn.ModuleList([BoQBlock(proj_dim, num_queries, heads) for _ in range(num_layers)])
        self.fc = nn.Linear(num_layers * num_queries, row_dim)
        self.out_dim = proj_dim * row_dim

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        x = self.norm_in(self.proj(tokens.as_map("BoQ")).flatten(2).transpose(1, 2))  # [B, HW, D]
        outs = []
        for block in self.blocks:
            x, out = block(x)
            outs.append(out)
        q = torch.cat(outs, 1)  # [B, L*Q, D]
        return self.fc(q.transpose(1, 2)).flatten(1)  # [B, D*row_dim]


@AGGREGATORS.register("boq")
def _build(ctx: HeadContext, **cfg) -> BoQ:
    return BoQ(ctx.in_dim, **cfg)
