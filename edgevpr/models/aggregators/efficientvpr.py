"""EfficientVPR's head: MsIA and OLE enhance the patch map, SGFS selects with the prompts, 3456-D out.

Choices where the paper notes are silent (docs/methods.md, "EfficientVPR"):

* MsIA: the map is down-sampled at scales 2 and 4 by strided 3x3 convolutions (padding 1), which gives
  ceil(H / s) x ceil(W / s) grids (19x19 at 266 px -> 10x10 and 5x5: the rounding rule is ceil); the
  scale-1 map is the map itself. Patch tokens f0 query the concatenated multi-scale tokens with multi-head
  attention (C / 64 heads), then a residual + LayerNorm and a 4C feed-forward + LayerNorm (a transformer
  decoder layer). Learned convolutions rather than average pooling, because they bring the trainable
  count to the paper's 7.7M (pooling would give 4.7M).
* OLE: 1x3 and 3x1 convolutions give f_h and f_v; f'_v = MLP(GeM(f_v)) (C -> C/4 -> C, ReLU); the
  horizontal features lose their component along f'_v, f'_h = f_h - <f_h, f'_v> / (||f'_v||^2 + eps) f'_v
  (a true orthogonal projection; the notes print ||.||_2, which would not remove the component); a 1x1
  convolution fuses [f'_h, f_v] back to C channels.
* SGFS: f'_g = LN(Z + MHSA(Z)) over the last block's prompt outputs Z [N_p, C]; f_out = LN(MHA(f'_g,
  f_l, f_l)) with f_l = [MsIA; OLE] (2N tokens); a Linear over the prompt axis N_p -> 8 (BoQ-style), the
  8 x C flattened, and the CLS token appended: 9 x 384 = 3456 for DINOv2-S (the notes' 3456 = 8 x 384 + 384);
  the two parts are L2-normalised apart before the final L2 (as SALAD treats its global token).
  Without prompts (adapter or full fine-tuning) ``queries: learned`` gives SGFS N_p learned queries.
* Ablation heads (``variant``): ``full`` (MsIA + OLE + SGFS), ``msia_ole_fc``, ``ms_ole_fc`` and ``ms_fc``,
  where MS is the multi-scale token set without the attention and fc is GeM over the tokens then a Linear to
  the same output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...tokens import Tokens
from .base import AGGREGATORS, Aggregator, HeadContext

VARIANTS = ("full", "msia_ole_fc", "ms_ole_fc", "ms_fc")


class MultiScale(nn.Module):
    """map [B, C, H, W] -> tokens at scales 1, 2, 4: [B, HW + ceil(H/2)ceil(W/2) + ceil(H/4)ceil(W/4), C]."""

    def __init__(self, dim: int, scales: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        self.scales = scales
        self.down = nn.ModuleList(nn.Identity() if s == 1 else nn.Conv2d(dim, dim, 3, stride=s, padding=1)
                                  for s in scales)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return torch.cat([d(fmap).flatten(2).transpose(1, 2) for d in self.down], 1)


class MsIA(nn.Module):
    """Multi-scale interaction attention: f0 [B, N, C] queries its multi-scale tokens -> [B, N, C]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ms = MultiScale(dim)
        self.attn = nn.MultiheadAttention(dim, max(1, dim // 64), batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, f0: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
        kv = self.ms(fmap)
        x = self.norm1(f0 + self.attn(f0, kv, kv, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


class OLE(nn.Module):
    """Orientation-aware local enhancer: map [B, C, H, W] -> tokens [B, HW, C]."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.h = nn.Conv2d(dim, dim, (1, 3), padding=(0, 1))
        self.v = nn.Conv2d(dim, dim, (3, 1), padding=(1, 0))
        self.mlp = nn.Sequential(nn.Linear(dim, dim // 4), nn.ReLU(), nn.Linear(dim // 4, dim))
        self.fuse = nn.Conv2d(2 * dim, dim, 1)
        self.p = nn.Parameter(torch.tensor(3.0))
        self.eps = eps

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        fh, fv = self.h(fmap), self.v(fmap)
        g = fv.clamp(min=self.eps).pow(self.p).mean((2, 3)).pow(1.0 / self.p)  # GeM over space [B, C]
        gv = self.mlp(g)[:, :, None, None]  # f'_v [B, C, 1, 1]
        s = (fh * gv).sum(1, keepdim=True)  # <f_h(x), f'_v> [B, 1, H, W]
        fh = fh - s / (gv.pow(2).sum(1, keepdim=True) + self.eps) * gv
        return self.fuse(torch.cat([fh, fv], 1)).flatten(2).transpose(1, 2)


class SGFS(nn.Module):
    """Prompt-guided selection: queries [B, N_p, C] over features [B, M, C] -> [B, rows, C]."""

    def __init__(self, dim: int, num_queries: int, rows: int) -> None:
        super().__init__()
        heads = max(1, dim // 64)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.compress = nn.Linear(num_queries, rows)

    def forward(self, z: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        g = self.norm1(z + self.self_attn(z, z, z, need_weights=False)[0])
        out = self.norm2(self.cross_attn(g, feats, feats, need_weights=False)[0])
        return self.compress(out.transpose(1, 2)).transpose(1, 2)


class EfficientVPRHead(Aggregator):
    """Tokens (full grid; prompts for SGFS) -> [B, out_dim] (3456 for DINOv2-S: 8 rows x 384 + CLS)."""

    needs_grid = True

    def __init__(self, in_dim: int, has_cls: bool, variant: str = "full", num_queries: int = 32, rows: int = 8,
                 queries: str = "prompts") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"efficientvpr variant '{variant}' is not one of {', '.join(VARIANTS)}")
        if queries not in ("prompts", "learned"):
            raise ValueError(f"efficientvpr queries '{queries}' is not 'prompts' or 'learned'")
        self.variant, self.queries, self.has_cls = variant, queries, has_cls
        self.out_dim = (rows + 1) * in_dim
        self.ms = MultiScale(in_dim) if variant in ("ms_fc", "ms_ole_fc") else None
        self.msia = MsIA(in_dim) if variant in ("full", "msia_ole_fc") else None
        self.ole = OLE(in_dim) if variant != "ms_fc" else None
        if variant == "full":
            self.sgfs = SGFS(in_dim, num_queries, rows)
            if queries == "learned":
                self.learned = nn.Parameter(torch.randn(1, num_queries, in_dim) * 0.02)
        else:
            self.p = nn.Parameter(torch.tensor(3.0))
            self.fc = nn.Linear(in_dim, self.out_dim)

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        fmap = tokens.as_map("EfficientVPR (MsIA/OLE convolve the patch map)")
        f0 = tokens.patches
        parts = []
        if self.ms is not None:
            parts.append(self.ms(fmap))
        if self.msia is not None:
            parts.append(self.msia(f0, fmap))
        if self.ole is not None:
            parts.append(self.ole(fmap))
        feats = torch.cat(parts, 1)
        if self.variant != "full":
            g = feats.clamp(min=1e-6).pow(self.p).mean(1).pow(1.0 / self.p)
            return self.fc(g)
        if self.queries == "learned":
            z = self.learned.expand(f0.shape[0], -1, -1)
        elif tokens.prompts is None:
            raise ValueError("EfficientVPR's SGFS queries the prompt tokens, but the backbone has no prompts: "
                             "add backbone.prompts {mode: scene} or set aggregator.queries: learned")
        else:
            z = tokens.prompts
        rows = self.sgfs(z, feats).flatten(1)
        glob = tokens.cls if tokens.cls is not None else f0.mean(1)
        return torch.cat([F.normalize(rows, dim=-1), F.normalize(glob, dim=-1)], 1)


@AGGREGATORS.register("efficientvpr")
def _build(ctx: HeadContext, **cfg) -> EfficientVPRHead:
    return EfficientVPRHead(ctx.in_dim, ctx.has_cls, **cfg)
