"""GeM: generalised-mean pooling over any token set (Radenovic et al.; p learnable, init 3)."""

from __future__ import annotations

import torch
from torch import nn

from ...tokens import Tokens
from .base import AGGREGATORS, Aggregator, HeadContext


class GeM(Aggregator):
    """mean_i(clamp(x_i, eps)^p)^(1/p) over tokens; [B, N, C] -> [B, C] (or [B, out_dim] with a projection).

    proj_init: 'default' (PyTorch's Linear init) or 'identity' (out_dim == in_dim: weight I, bias 0), a
    learned whitening that starts as exactly the unprojected descriptor, so fine-tuning starts from the
    pretrained model's accuracy.
    l2_first: L2-normalise every token over its channels before pooling (CosPlace / EigenPlaces do).
    """

    def __init__(self, in_dim: int, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True,
                 out_dim: int | None = None, proj_init: str = "default", l2_first: bool = False) -> None:
        super().__init__()
        self.l2_first = l2_first
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)
        self.eps = eps
        self.proj = nn.Linear(in_dim, out_dim) if out_dim else nn.Identity()
        self.out_dim = out_dim or in_dim
        if proj_init == "identity":
            if out_dim != in_dim:
                raise ValueError(f"gem proj_init 'identity' needs out_dim == in_dim ({in_dim}), got {out_dim}")
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(in_dim))
                self.proj.bias.zero_()
        elif proj_init != "default":
            raise ValueError(f"gem proj_init '{proj_init}' is not 'default' or 'identity'")

    def aggregate(self, tokens: Tokens) -> torch.Tensor:
        x = nn.functional.normalize(tokens.patches, dim=-1) if self.l2_first else tokens.patches
        x = x.clamp(min=self.eps).pow(self.p).mean(1).pow(1.0 / self.p)
        return self.proj(x)


@AGGREGATORS.register("gem")
def _build(ctx: HeadContext, **cfg) -> GeM:
    return GeM(ctx.in_dim, **cfg)
