"""The contract between every backbone and every aggregator."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


class PrunedTokensError(ValueError):
    """Raised by heads that need a full patch grid when they are given a pruned token set."""


@dataclass
class Tokens:
    """What every backbone returns.

    patches: [B, N, C] patch tokens (registers excluded).
    cls:     [B, C] global token (ViT CLS), or None for CNNs.
    grid:    (H, W) of the full patch grid the image produced.
    index:   [B, N] long positions (row-major in ``grid``) of the kept patches, or None when all
             H*W patches are present in grid order.
    prompts: [B, N_p, C] prompt tokens output by the last block of a prompted ViT, else None.
    """

    patches: torch.Tensor
    cls: torch.Tensor | None
    grid: tuple[int, int]
    index: torch.Tensor | None = None
    prompts: torch.Tensor | None = None

    def float(self) -> Tokens:
        """The same tokens in float32 (mixed-precision forwards give bf16/fp16 ones)."""
        def f(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.float()

        return replace(self, patches=self.patches.float(), cls=f(self.cls), prompts=f(self.prompts))

    @property
    def is_full_grid(self) -> bool:
        return self.index is None and self.patches.shape[1] == self.grid[0] * self.grid[1]

    @property
    def dim(self) -> int:
        return int(self.patches.shape[-1])

    def as_map(self, who: str = "this head") -> torch.Tensor:
        """The patches as a feature map [B, C, H, W]; refuses a pruned token set."""
        if not self.is_full_grid:
            raise PrunedTokensError(
                f"{who} needs the full {self.grid[0]}x{self.grid[1]} patch grid but got "
                f"{self.patches.shape[1]} pruned tokens; use a head that accepts any token set "
                "(gem, cls, netvlad, salad, weiad) or keep_ratio=1.0"
            )
        b, n, c = self.patches.shape
        return self.patches.transpose(1, 2).reshape(b, c, *self.grid)

    @classmethod
    def from_map(cls, fmap: torch.Tensor, cls_token: torch.Tensor | None = None) -> Tokens:
        """Build Tokens from a CNN map [B, C, H, W]."""
        b, c, h, w = fmap.shape
        return cls(patches=fmap.flatten(2).transpose(1, 2), cls=cls_token, grid=(h, w))

    def select(self, keep: torch.Tensor) -> Tokens:
        """Keep patches at positions ``keep`` [B, K] (indices into the current token list)."""
        idx = keep.unsqueeze(-1).expand(-1, -1, self.patches.shape[-1])
        current = self.index
        if current is None:
            current = torch.arange(self.patches.shape[1], device=keep.device).expand(keep.shape[0], -1)
        return replace(self, patches=self.patches.gather(1, idx), index=current.gather(1, keep))
