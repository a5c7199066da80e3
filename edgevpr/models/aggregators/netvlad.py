"""NetVLAD (Arandjelovic et al.) over any token set, with k-means initialisation from data.

Initialisation follows gmberton's benchmark: faiss k-means (100 iterations) on sampled local
features; assignment weights = alpha * unit centroids, alpha = -log(0.01) / mean(top1 - top2 dot).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...tokens import Tokens
from .base import AGGREGATORS, Aggregator, HeadContext


class NetVLAD(Aggregator):
    """[B, N, C] -> [B, K*C] (K clusters, intra-normalised residual sums)."""

    def __init__(self, in_dim: int, num_clusters: int = 64, normalize_input: bool = True) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.normalize_input = normalize_input
        self.assign = nn.Linear(in_dim, num_clusters, bias=False)
        self.centroids = nn.Parameter(torch.randn(num_clusters, in_dim) * 0.1)
        self.out_dim = num_clusters * in_dim

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        x = tokens.patches
        if self.normalize_input:
            x = nn.functional.normalize(x, dim=-1)
        a = self.assign(x).softmax(-1)  # [B, N, K]
        vlad = torch.einsum("bnk,bnc->bkc", a, x) - a.sum(1).unsqueeze(-1) * self.centroids  # [B, K, C]
        return nn.functional.normalize(vlad, dim=-1).flatten(1)

    @torch.no_grad()
    def init_from_features(self, feats: np.ndarray, seed: int = 0, niter: int = 100, nredo: int = 1) -> None:
        """k-means on local features [M, C] (float32) sets centroids and assignment weights."""
        import faiss

        feats = np.array(feats, dtype=np.float32, order="C")  # a copy: the caller's array is left alone
        if self.normalize_input:
            feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12
        if len(feats) < self.num_clusters:
            raise ValueError(f"NetVLAD init needs at least {self.num_clusters} features, got {len(feats)}")
        km = faiss.Kmeans(feats.shape[1], self.num_clusters, niter=niter, nredo=nredo, seed=seed, verbose=False)
        km.train(feats)
        c = km.centroids / (np.linalg.norm(km.centroids, axis=1, keepdims=True) + 1e-12)
        dots = np.sort(feats @ c.T, axis=1)
        alpha = float(-np.log(0.01) / np.mean(dots[:, -1] - dots[:, -2]))
        self.centroids.copy_(torch.from_numpy(km.centroids))
        self.assign.weight.copy_(torch.from_numpy(alpha * c))


@AGGREGATORS.register("netvlad")
def _build(ctx: HeadContext, **cfg) -> NetVLAD:
    return NetVLAD(ctx.in_dim, **cfg)
