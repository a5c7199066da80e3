"""Token pruning inside a ViT after an early block: WeiToP and the general-vision baselines.

After block ``block`` (default 3 of 12) the CLS (and register) tokens stay and ceil(rho * N) patch tokens go on
through the remaining blocks; rho is the runtime knob ``keep_ratio`` (1.0: nothing happens, exactly the
unpruned model). ``method``:

* ``weitop``: a light scorer (LayerNorm, Linear C -> C/4, GELU, Linear -> 1) on the block's output tokens;
  the top-scored tokens stay. It learns from the aggregator's token importance by self-distillation
  (``edgevpr.train.losses.WeiToPDistill``); its logits of the last forward are kept in ``last_logits``.
* ``random``: a random subset, drawn from a generator seeded the same way at every call (deterministic).
* ``evit``: the top tokens by the CLS query's head-averaged attention inside the pruning block (EViT's
  criterion; EViT's fusion of the dropped tokens into one extra token is left out so every method keeps
  the same number of tokens).
* ``tome``: token merging (ToMe's bipartite soft matching on cosine similarity of the tokens, the sizes
  weighting the averages), repeated until ceil(rho * N) tokens remain; ToMe's proportional attention in
  later blocks is left out. A merged token keeps the grid position of the token it was merged into.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .prompts import cls_attention

METHODS = ("weitop", "random", "evit", "tome")


def keep_count(n: int, keep_ratio: float) -> int:
    """ceil(rho * N) tokens, at least 1."""
    return max(1, min(n, math.ceil(keep_ratio * n - 1e-9)))


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def tome_merge(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens [B, N, C] down to k by repeated bipartite soft matching -> (tokens [B, k, C], positions [B, k])."""
    b, n, c = x.shape
    pos = torch.arange(n, device=x.device).expand(b, -1)
    size = x.new_ones(b, n, 1)
    while n > k:
        r = min(n - k, n // 2)
        a, bb = x[:, ::2], x[:, 1::2]
        sim = F.normalize(a, dim=-1) @ F.normalize(bb, dim=-1).transpose(1, 2)  # [B, Na, Nb]
        best, dst = sim.max(-1)  # each A token's best B partner
        order = best.argsort(-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]  # A tokens merged away / A tokens kept
        sa, sb = size[:, ::2], size[:, 1::2]
        d = dst.gather(1, merged)
        wa = _gather(a * sa, merged)
        num = (bb * sb).scatter_add(1, d.unsqueeze(-1).expand(-1, -1, c), wa)
        den = sb.scatter_add(1, d.unsqueeze(-1), sa.gather(1, merged.unsqueeze(-1)))
        x = torch.cat([_gather(a, kept), num / den], 1)
        size = torch.cat([sa.gather(1, kept.unsqueeze(-1)), den], 1)
        pos = torch.cat([pos[:, ::2].gather(1, kept), pos[:, 1::2]], 1)
        n = x.shape[1]
    return x, pos


class TokenPruner(nn.Module):
    """Tokens [B, P + N, C] after the pruning block -> [B, P + K, C] and kept grid positions [B, K]."""

    knobs = ("keep_ratio",)

    def __init__(self, dim: int, block: int = 3, method: str = "weitop", seed: int = 0) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"pruning method '{method}' is not one of {', '.join(METHODS)}")
        self.block, self.method, self.seed = block, method, seed
        self.keep_ratio = 1.0
        if method == "weitop":
            self.scorer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim // 4), nn.GELU(), nn.Linear(dim // 4, 1))
        self.last_logits: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.keep_ratio < 1.0

    def __getstate__(self) -> dict:
        """Copies and pickles leave out ``last_logits``: a forward's output, not state, and after a forward with
        autograd (training, a FLOP count) a non-leaf tensor that ``copy.deepcopy`` refuses."""
        return {**super().__getstate__(), "last_logits": None}

    def scores(self, t: torch.Tensor, prefix: int, block: nn.Module, block_input: torch.Tensor | None) -> torch.Tensor:
        """Per-patch-token scores [B, N] (higher = keep)."""
        patches = t[:, prefix:]
        if self.method == "weitop":
            return self.scorer(patches).squeeze(-1)
        if self.method == "evit":
            assert block_input is not None
            return cls_attention(block, block_input, slice(prefix, None))
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.rand(patches.shape[:2], generator=g).to(patches.device)

    def forward(self, t: torch.Tensor, prefix: int, block: nn.Module,
                block_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.method == "weitop" and (self.training or self.active):
            self.last_logits = self.scores(t, prefix, block, block_input)
        if not self.active:
            return t, None
        n = t.shape[1] - prefix
        k = keep_count(n, self.keep_ratio)
        if self.method == "tome":
            merged, pos = tome_merge(t[:, prefix:], k)
            return torch.cat([t[:, :prefix], merged], 1), pos
        s = self.last_logits if self.method == "weitop" else self.scores(t, prefix, block, block_input)
        keep = s.topk(k, dim=-1).indices.sort(-1).values  # grid order kept
        return torch.cat([t[:, :prefix], _gather(t[:, prefix:], keep)], 1), keep
