"""TeTRA's ternary ViT (OliverGrainge/TeTRA-VPR, the public code of the TAT-VPR authors) as an edgevpr backbone.

Not a DINOv2 layout: patches are flattened in (p1 p2 c) order and go through LayerNorm -> Linear -> LayerNorm; the
position embedding is fixed for one input size (322 px: 23 x 23 patches + CLS); each block is
``x + attn(x)`` then ``x + ffn(x)`` with attention LayerNorm -> qkv (no bias) -> softmax(q k^T / sqrt(64)) v ->
LayerNorm -> out projection, and FFN LayerNorm -> fc1 -> GELU -> LayerNorm -> fc2, except the last block, whose FFN
has no inner LayerNorm. The released model applies no final norm. Which linears are ternary (every block but the
last) and their eval-mode numerics are set by the model's ``ternary`` config (see ``tetra_ternary``), so the
weights run through edgevpr's ternary layers, packing, int8 CPU path and int8 ONNX export.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tokens import Tokens
from .backbones import BACKBONES, Backbone, Preprocess


class TeTRAAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.norm2 = nn.LayerNorm(inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]."""
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.norm2(out))


class TeTRAFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, inner_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.norm2 = nn.LayerNorm(hidden) if inner_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm2(self.act(self.fc1(self.norm1(x)))))


class TeTRABlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, hidden: int, inner_norm: bool) -> None:
        super().__init__()
        self.attn = TeTRAAttention(dim, heads, dim_head)
        self.ffn = TeTRAFFN(dim, hidden, inner_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ffn(x)


class TeTRAViT(Backbone):
    """images [B, 3, H, W] at the fixed input size -> Tokens (CLS + H/14 x W/14 patches)."""

    has_cls = True

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, dim_head: int = 64, mlp_dim: int = 3072,
                 patch_size: int = 14, image_size: int = 322, weights: str | None = None) -> None:
        super().__init__()
        if weights not in (None, "random"):
            raise ValueError("tetra_vit: weights come from `edgevpr import tetra FILE` (a saved edgevpr model)")
        self.patch, self.grid = patch_size, (image_size // patch_size, image_size // patch_size)
        patch_dim = 3 * patch_size * patch_size
        self.patch_norm1 = nn.LayerNorm(patch_dim)
        self.patch_proj = nn.Linear(patch_dim, dim)
        self.patch_norm2 = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([TeTRABlock(dim, heads, dim_head, mlp_dim, inner_norm=i < depth - 1)
                                     for i in range(depth)])
        self.out_dim, self.stride = dim, patch_size
        self.preprocess = Preprocess()

    def stages(self) -> list[nn.Module]:
        return list(self.blocks)

    def stem(self) -> list[nn.Module | nn.Parameter]:
        return [self.patch_norm1, self.patch_proj, self.patch_norm2, self.cls_token, self.pos_embed]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> tokens [B, 1 + N, C] (patch pixels flattened as (p1 p2 c), as TeTRA's Rearrange)."""
        b, c, h, w = x.shape
        if (h // self.patch, w // self.patch) != self.grid or h % self.patch or w % self.patch:
            raise ValueError(f"TeTRA's ViT has a fixed position embedding for {self.grid[0] * self.patch}x"
                             f"{self.grid[1] * self.patch} input, got {h}x{w}")
        p = self.patch
        t = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        t = self.patch_norm2(self.patch_proj(self.patch_norm1(t)))
        return torch.cat([self.cls_token.expand(b, -1, -1), t], 1) + self.pos_embed

    def forward_prefix(self, x: torch.Tensor, k: int) -> torch.Tensor:
        t = self.embed(x)
        for blk in self.blocks[:k]:
            t = blk(t)
        return t

    def forward_suffix(self, h: torch.Tensor, k: int, image_size: tuple[int, int]) -> Tokens:
        for blk in self.blocks[k:]:
            h = blk(h)
        return Tokens(patches=h[:, 1:], cls=h[:, 0], grid=self.grid)

    def forward(self, x: torch.Tensor) -> Tokens:
        return self.forward_suffix(self.embed(x), 0, tuple(x.shape[-2:]))


def tetra_ternary(depth: int) -> dict:
    """The model ``ternary`` config of a TeTRA ViT: every block's linears but the last block's, TeTRA's numerics."""
    blocks = "|".join(str(i) for i in range(depth - 1))
    return {"patterns": [rf"^blocks\.({blocks})\.(attn\.(qkv|proj)|ffn\.fc[12])$"], "full_precision_last_ffn": False,
            "delta_mode": "clamp", "act_int8": True}


@BACKBONES.register("tetra_vit")
def _tetra(**cfg) -> Backbone:
    return TeTRAViT(**cfg)
