"""SALAD (Izquierdo & Civera, CVPR 2024): optimal-transport assignment of tokens to clusters.

Differences from the reference code, all output-equivalent where the reference is defined:
* the 1x1 convolutions are per-token Linear layers, so any token set works (pruned tokens included);
* aggregation is an einsum instead of materialising a [B, l, m, n] tensor with ``repeat``;
* the dustbin marginal: the reference gives each of the m clusters mass 1 and the dustbin n - m
  (undefined for n <= m tokens). Here each cluster gets r = min(1, n / (m + 1)) and the dustbin
  n - m * r. For n > m this is exactly the reference; for n <= m both stay positive, the problem
  stays balanced, and the masses are continuous in n at n = m + 1.
* a backbone without a CLS token (a CNN) uses the mean patch token as SALAD's global token.

Descriptor layout: [global token (g) | cluster vectors flattened channel-major], i.e. the reference's
``[B, l, m].flatten(1)`` (element j * m + k is channel j of cluster k), so descriptors made by the original code and
by edgevpr can share a database. (Before this layout, edgevpr flattened [B, m, l]; ``fingerprint_tag`` marks
the change so descriptor caches and indexes of the older layout are not mixed with new ones.)

MegaLoc (Berton & Masone 2025) is SALAD with a linear layer on the normalised SALAD descriptor (``megaloc``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...tokens import Tokens
from .base import AGGREGATORS, Aggregator, HeadContext


def log_sinkhorn(scores: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, iters: int) -> torch.Tensor:
    """Log-space Sinkhorn; scores [B, M, N], log_a [B, M], log_b [B, N] -> log transport plan [B, M, N]."""
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iters):
        u = log_a - torch.logsumexp(scores + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(scores + u.unsqueeze(2), dim=1)
    return scores + u.unsqueeze(2) + v.unsqueeze(1)


def dustbin_marginals(m: int, n: int, batch: int, device: torch.device, dtype: torch.dtype):
    """Row (m clusters + dustbin) and column (n tokens) log-marginals, normalised by n + m."""
    r = min(1.0, n / (m + 1.0))
    norm = math.log(n + m)
    log_a = torch.full((batch, m + 1), math.log(r) - norm, device=device, dtype=dtype)
    log_a[:, -1] = math.log(n - m * r) - norm
    log_b = torch.full((batch, n), -norm, device=device, dtype=dtype)
    return log_a, log_b


class OTAggregator(Aggregator):
    """Shared machinery of SALAD and its weighted variants: tokens -> cluster assignment P [B, m, n]."""

    def __init__(self, in_dim: int, num_clusters: int = 64, cluster_dim: int = 128, token_dim: int = 256,
                 hidden: int = 512, dropout: float = 0.3, sinkhorn_iters: int = 3) -> None:
        super().__init__()
        self.num_clusters, self.cluster_dim, self.token_dim = num_clusters, cluster_dim, token_dim
        self.sinkhorn_iters = sinkhorn_iters
        self.token_features = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, token_dim))
        self.cluster_features = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, cluster_dim)
        )
        self.score = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, num_clusters)
        )
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        self.out_dim = num_clusters * cluster_dim + token_dim

    def global_token(self, tokens: Tokens) -> torch.Tensor:
        return tokens.cls if tokens.cls is not None else tokens.patches.mean(1)

    def assignment(self, tokens: Tokens) -> torch.Tensor:
        """Transport plan without the dustbin row: [B, m, n], each token's mass over clusters <= 1."""
        x = tokens.patches
        b, n, _ = x.shape
        s = self.score(x).transpose(1, 2)  # [B, m, n]
        s = torch.cat([s, self.dust_bin.to(s.dtype).expand(b, 1, n)], 1)
        log_a, log_b = dustbin_marginals(self.num_clusters, n, b, s.device, s.dtype)
        log_p = log_sinkhorn(s, log_a, log_b, self.sinkhorn_iters) + math.log(n + self.num_clusters)
        return log_p[:, :-1].exp()

    def cluster_weights(self, tokens: Tokens) -> torch.Tensor:
        """w [B, m]: every cluster counts the same in SALAD (WeiAD learns them)."""
        return tokens.patches.new_ones(tokens.patches.shape[0], self.num_clusters)

    def importance(self, tokens: Tokens) -> torch.Tensor:
        """Aggregation-induced token importance [B, N], summing to 1 over the tokens:
        a_i = sum_k w_k P_{k,i} (the transport plan without the dustbin row), normalised."""
        a = torch.einsum("bm,bmn->bn", self.cluster_weights(tokens), self.assignment(tokens))
        return a / a.sum(-1, keepdim=True).clamp_min(1e-12)

    def clusters(self, tokens: Tokens, p: torch.Tensor) -> torch.Tensor:
        """Intra-normalised cluster vectors [B, m, l] from assignment p [B, m, n]."""
        f = self.cluster_features(tokens.patches)  # [B, n, l]
        return nn.functional.normalize(torch.einsum("bmn,bnl->bml", p, f), dim=-1)

    #: mixed into the model fingerprint: the channel-major (published) descriptor layout
    fingerprint_tag = "salad-layout=channel-major"

    @staticmethod
    def descriptor(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """global token [B, g] and cluster vectors [B, m, l] -> [B, g + l*m], clusters channel-major."""
        return torch.cat([g, v.transpose(1, 2).flatten(1)], dim=-1)

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        g = nn.functional.normalize(self.token_features(self.global_token(tokens)), dim=-1)
        return self.descriptor(g, self.clusters(tokens, self.assignment(tokens)))


class SALAD(OTAggregator):
    """[B, N, C] tokens (+ global token) -> [B, m*l + g] (8448-D with the defaults)."""


class MegaLocHead(SALAD):
    """SALAD, its descriptor L2-normalised, then a linear layer to ``out_dim`` (MegaLoc: 16640 -> 8448)."""

    def __init__(self, in_dim: int, out_dim: int = 8448, **cfg) -> None:
        super().__init__(in_dim, **cfg)
        self.linear = nn.Linear(self.out_dim, out_dim)
        self.out_dim = out_dim

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        return self.linear(nn.functional.normalize(super().aggregate(tokens), dim=-1))


@AGGREGATORS.register("salad")
def _build(ctx: HeadContext, **cfg) -> SALAD:
    return SALAD(ctx.in_dim, **cfg)


@AGGREGATORS.register("megaloc")
def _build_megaloc(ctx: HeadContext, **cfg) -> MegaLocHead:
    return MegaLocHead(ctx.in_dim, **cfg)
