"""Visual prompt tuning for ViT backbones: EfficientVPR's SceneVPT, VPT-deep, and a bottleneck adapter.

Prompts are N_p learnable tokens per block, inserted after the CLS (and register) tokens with no position
embedding (VPT convention). The sequence through block i is [CLS, (registers), prompts, patches].

* ``deep`` (VPT-deep): block i gets fresh prompts P_i; the previous block's prompt outputs are discarded.
* ``scene`` (SceneVPT): for block i >= 1, s_j is the CLS query's attention to prompt j inside block i-1
  (softmax over all keys per head, averaged over heads), s'_j = s_j / sum_k s_k over the prompts,
  alpha_j = sigmoid(s'_j - gamma_i) with a learnable threshold gamma_i per block, and the prompts entering
  block i are alpha * Z^P_{i-1} + (1 - alpha) * P_i (Z^P: the prompt outputs of block i-1). Block 0 gets P_0.
  The attention weights are computed explicitly from block i-1's input (its norm1 and the K/Q part of its
  qkv projection), since fused attention never returns them; tests check them against the block's own
  non-fused attention. gamma starts at 1 / N_p (the mean of s'), so alpha starts near 0.5 for every prompt.
* ``adapter``: no prompts; a bottleneck adapter (Linear C->r, GELU, Linear r->C, zero-initialised up
  projection so the model starts as the pretrained one) added in parallel to every block's MLP
  (AdaptFormer-style), the EfficientVPR ablation's adapter baseline.

The prompt outputs of the last block are returned as ``Tokens.prompts`` [B, N_p, C] (SGFS queries them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cls_attention(block: nn.Module, x: torch.Tensor, cols: slice) -> torch.Tensor:
    """Head-averaged attention of the CLS query (token 0) to the keys in ``cols``, inside ``block`` on its
    input ``x`` [B, T, C]: softmax over all T keys per head, then mean over heads -> [B, len(cols)].

    q and k come from the block's own qkv layer (its forward), so whatever that layer applies (a ternary
    layer's activation sparsity, int8 activations, the int8 GEMM twin) shapes these scores as it shapes the
    block's attention."""
    attn = block.attn
    h = block.norm1(x)
    c = h.shape[-1]
    qkv = attn.qkv(h)  # [B, T, 3C]
    q, k = qkv[:, :1, :c], qkv[:, :, c: 2 * c]
    nh = attn.num_heads
    q = attn.q_norm(q.reshape(q.shape[0], 1, nh, -1).transpose(1, 2))
    k = attn.k_norm(k.reshape(k.shape[0], k.shape[1], nh, -1).transpose(1, 2))
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # [B, heads, 1, T]
    return logits.softmax(-1)[:, :, 0, cols].mean(1)


class Adapter(nn.Module):
    """x [.., C] -> up(gelu(down(x))) * scale; added to the block's MLP output."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1) -> None:
        super().__init__()
        self.down, self.up, self.scale = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim), scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x))) * self.scale


class _MLPWithAdapter(nn.Module):
    def __init__(self, mlp: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.mlp, self.adapter = mlp, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.adapter(x)


class Prompts(nn.Module):
    """Prompt state for one ViT: P [depth, N_p, C] (+ gamma [depth] for SceneVPT)."""

    def __init__(self, mode: str, depth: int, dim: int, num: int = 32, bottleneck: int = 64) -> None:
        super().__init__()
        if mode not in ("scene", "deep", "adapter"):
            raise ValueError(f"prompts.mode '{mode}' is not one of scene, deep, adapter")
        self.mode, self.num = mode, (0 if mode == "adapter" else num)
        if mode == "adapter":
            self.adapters = nn.ModuleList(Adapter(dim, bottleneck) for _ in range(depth))
            return
        # VPT init: uniform in +-sqrt(6 / (patch_dim + C)) ~ +-sqrt(6 / 2C) for a square-patch ViT
        bound = (6.0 / (2 * dim)) ** 0.5
        self.prompts = nn.Parameter(torch.empty(depth, num, dim).uniform_(-bound, bound))
        if mode == "scene":
            self.gamma = nn.Parameter(torch.full((depth,), 1.0 / num))
        self.last_alpha: torch.Tensor | None = None  # [B, N_p] of the last block, for inspection

    def attach(self, blocks: nn.Sequential) -> None:
        """Adapter mode: wrap every block's MLP with its adapter (done once, at build time)."""
        if self.mode == "adapter":
            for blk, ad in zip(blocks, self.adapters, strict=True):
                blk.mlp = _MLPWithAdapter(blk.mlp, ad)

    def run(self, blocks: nn.Sequential, t: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens [B, prefix + N, C] (no prompts yet) through ``blocks`` -> ([B, prefix + N_p + N, C], alphas).

        alphas: [B, depth - 1, N_p] SceneVPT weights (None in other modes).
        """
        if self.mode == "adapter":
            for blk in blocks:
                t = blk(t)
            return t, None
        b, n = t.shape[0], self.num
        cols = slice(prefix, prefix + n)
        t = torch.cat([t[:, :prefix], self.prompts[0].expand(b, -1, -1), t[:, prefix:]], 1)
        alphas = []
        s_prev: torch.Tensor | None = None  # CLS-to-prompt attention inside the previous block [B, N_p]
        for i, blk in enumerate(blocks):
            if i > 0:
                fresh = self.prompts[i].expand(b, -1, -1)
                if s_prev is not None:
                    s = s_prev / s_prev.sum(-1, keepdim=True).clamp_min(1e-12)
                    alpha = torch.sigmoid(s - self.gamma[i]).unsqueeze(-1)  # [B, N_p, 1]
                    alphas.append(alpha.squeeze(-1))
                    fresh = alpha * t[:, cols] + (1 - alpha) * fresh
                t = torch.cat([t[:, :prefix], fresh, t[:, prefix + n:]], 1)
            if self.mode == "scene" and i + 1 < len(blocks):
                s_prev = cls_attention(blk, t, cols)
            t = blk(t)
        if alphas:
            self.last_alpha = alphas[-1].detach()
        return t, (torch.stack(alphas, 1) if alphas else None)
