"""WeiAD: SALAD's optimal-transport aggregation with weighted clusters ("Faster or Stronger", 2026).

Only the abstract is public; the choices (docs/methods.md, "WeiAD / WeiToP"):
* Each intra-normalised cluster vector V_k is multiplied by a positive weight w_k before the final L2
  normalisation (after it, a weight would cancel out). ``weighting``:
  - ``global``: w_k = 2 * sigmoid(theta_k), one learned scalar per cluster;
  - ``predicted``: w = 2 * sigmoid(MLP(global token)), per image (MLP C -> 256 -> m);
  both start at w = 1 (theta = 0; the MLP's last layer zero-initialised), i.e. exactly SALAD, and stay in
  (0, 2) so no cluster can take over the descriptor.
* Token importance (WeiToP's self-distillation target): a_i = sum_k w_k P_{k,i} over the Sinkhorn plan without
  the dustbin row, normalised over the tokens: how much token i feeds the weighted clusters.
"""

from __future__ import annotations

import torch
from torch import nn

from ...tokens import Tokens
from .base import AGGREGATORS, HeadContext
from .salad import OTAggregator


class WeiAD(OTAggregator):
    """[B, N, C] tokens (+ global token) -> [B, m*l + g], clusters weighted before the final L2.
    Same descriptor layout as SALAD (see salad.py), so at w = 1 it is exactly SALAD.
    """

    def __init__(self, in_dim: int, weighting: str = "global", **cfg) -> None:
        super().__init__(in_dim, **cfg)
        if weighting not in ("global", "predicted"):
            raise ValueError(f"weiad weighting '{weighting}' is not 'global' or 'predicted'")
        self.weighting = weighting
        if weighting == "global":
            self.theta = nn.Parameter(torch.zeros(self.num_clusters))
        else:
            self.weight_mlp = nn.Sequential(nn.Linear(in_dim, 256), nn.ReLU(), nn.Linear(256, self.num_clusters))
            nn.init.zeros_(self.weight_mlp[-1].weight)
            nn.init.zeros_(self.weight_mlp[-1].bias)

    def cluster_weights(self, tokens: Tokens) -> torch.Tensor:
        """w [B, m] in (0, 2)."""
        if self.weighting == "global":
            return (2 * torch.sigmoid(self.theta)).expand(tokens.patches.shape[0], -1)
        return 2 * torch.sigmoid(self.weight_mlp(self.global_token(tokens)))

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        g = nn.functional.normalize(self.token_features(self.global_token(tokens)), dim=-1)
        v = self.clusters(tokens, self.assignment(tokens)) * self.cluster_weights(tokens).unsqueeze(-1)
        return self.descriptor(g, v)


@AGGREGATORS.register("weiad")
def _build(ctx: HeadContext, **cfg) -> WeiAD:
    return WeiAD(ctx.in_dim, **cfg)
