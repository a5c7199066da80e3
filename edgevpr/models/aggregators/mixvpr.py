"""MixVPR (Ali-bey et al., WACV 2023): feature mixing over the flattened map, needs a fixed grid."""

from __future__ import annotations

import torch
from torch import nn

from ...tokens import Tokens
from .base import AGGREGATORS, Aggregator, HeadContext


class FeatureMixer(nn.Module):
    """x + MLP(LN(x)) along the spatial axis; [B, C, HW] -> [B, C, HW]."""

    def __init__(self, hw: int, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        self.mix = nn.Sequential(
            nn.LayerNorm(hw), nn.Linear(hw, int(hw * mlp_ratio)), nn.ReLU(), nn.Linear(int(hw * mlp_ratio), hw)
        )
        for m in self.mix.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class MixVPR(Aggregator):
    """[B, C, H, W] map -> [B, out_channels * out_rows]."""

    needs_grid = True

    def __init__(self, in_dim: int, grid: tuple[int, int], out_channels: int = 512, mix_depth: int = 4,
                 mlp_ratio: float = 1.0, out_rows: int = 4) -> None:
        super().__init__()
        self.grid = tuple(grid)
        hw = grid[0] * grid[1]
        self.mixers = nn.Sequential(*[FeatureMixer(hw, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_dim, out_channels)
        self.row_proj = nn.Linear(hw, out_rows)
        self.out_dim = out_channels * out_rows

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        fmap = tokens.as_map("MixVPR")
        if tuple(fmap.shape[-2:]) != self.grid:
            raise ValueError(
                f"MixVPR was built for a {self.grid[0]}x{self.grid[1]} grid but got "
                f"{fmap.shape[-2]}x{fmap.shape[-1]}: run it at the image size it was built for"
            )
        x = self.mixers(fmap.flatten(2))  # [B, C, HW]
        x = self.channel_proj(x.transpose(1, 2))  # [B, HW, out_channels]
        x = self.row_proj(x.transpose(1, 2))  # [B, out_channels, out_rows]
        return x.flatten(1)


@AGGREGATORS.register("mixvpr")
def _build(ctx: HeadContext, **cfg) -> MixVPR:
    return MixVPR(ctx.in_dim, ctx.grid, **cfg)
