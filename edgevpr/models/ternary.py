"""TAT-VPR compression: ternary weights {-1, 0, +1} x one fp32 scale per tensor, and runtime top-k activation
sparsity on the inputs of the ternary linears.

* Quantiser (Sparse-TeTRA model/layers.py): ``delta = mean|W| + eps`` (eps 1e-5), ``q = clamp(round(W / delta),
  -1, 1)``, the layer computes ``x @ (delta * q)^T + b`` with a full-precision bias; gradients reach the latent fp32
  weight unchanged (straight-through). A custom autograd function returns exactly ``delta * q`` in the forward
  pass, so a packed model that stores (q, delta) reproduces the weights bit for bit.
* Sparsity: the public code keeps the top-k |x| over the whole batch tensor, which makes a descriptor depend on
  its batch-mates. Here the top-k is taken per token (each row of the input keeps its ``ceil((1 - s) * C)``
  largest-magnitude channels): deterministic and batch-independent, as the paper's formula over X in R^{N x D}
  and the author's description ("per token") read. The mask is straight-through (identity gradient), as in
  the code. ``sparsity`` is a runtime knob of every ternary layer (``VPRModel.forward(x, sparsity=0.4)``).
* Which layers: by default the attention (qkv, proj) and FFN (fc1, fc2) linears of every transformer block,
  except the last block's FFN, which stays full precision (and dense), as in the published student; the
  patch embedding and the heads stay fp32.
* TeTRA's released models (OliverGrainge/TeTRA-VPR) compute in eval mode with ``delta = max(mean|W|, eps)``
  (``delta_mode: clamp``) and per-token absmax int8 activations, scale 127 / max(max|x|, 1e-5) (``act_int8``);
  both are options of a ternary config so an imported TeTRA model computes what its code computes.
* Packing: q stored at 2 bits per weight (4 per byte) + delta as fp32; ``unpack`` is exact.
* Fast CPU path (``Int8TernaryLinear``): q is an exact int8 matrix, so the layer runs as an int8 GEMM
  (``torch._int_mm``) on inputs quantised per token (symmetric, scale max|x| / 127) and rescaled in fp32.
  Per-token activation quantisation keeps it batch-independent; it is the one approximation of this path.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

#: Linear layers made ternary by default (regular expressions on qualified module names).
DEFAULT_PATTERNS = (r"\.attn\.qkv$", r"\.attn\.proj$", r"\.mlp\.fc1$", r"\.mlp\.fc2$")


def ternarize(w: torch.Tensor, eps: float = 1e-5, delta_mode: str = "add") -> tuple[torch.Tensor, torch.Tensor]:
    """fp weight [out, in] -> (q int8 in {-1, 0, 1} [out, in], delta fp32 scalar).

    delta_mode: ``add`` (mean|W| + eps, Sparse-TeTRA) or ``clamp`` (max(mean|W|, eps), TeTRA's released code).

    mean|W| is accumulated in float64: a float32 mean depends on the number of threads (summation order),
    which would change delta in its last bit, flip weights near +-delta/2, and break bit-exact reloads
    and fingerprints between a 1-thread and a 2-thread process.
    """
    mean = w.detach().double().abs().mean()
    delta = (mean.clamp(min=eps) if delta_mode == "clamp" else mean + eps).float()
    return (w.detach() / delta).round().clamp(-1, 1).to(torch.int8), delta


class _TernarySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, eps: float, delta_mode: str) -> torch.Tensor:
        q, delta = ternarize(w, eps, delta_mode)
        return delta * q.to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


#: per-token activation scales are clamped here from below (TeTRA: max|x| >= 1e-5)
ACT_EPS = 1e-5


def fake_quant_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 fake quantisation, scale 127 / max(max|x|, 1e-5); straight-through. [..., C]."""
    scale = 127.0 / x.detach().abs().amax(-1, keepdim=True).clamp(min=ACT_EPS)
    q = (x * scale).round().clamp(-128, 127) / scale
    return q if not x.requires_grad else x + (q - x).detach()


def topk_mask(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask [..., C] keeping each row's ceil((1 - sparsity) * C) largest |x| (ties kept by index order)."""
    c = x.shape[-1]
    k = max(1, math.ceil((1.0 - sparsity) * c))
    idx = x.detach().abs().topk(k, dim=-1, sorted=False).indices
    ones = torch.ones_like(idx, dtype=torch.bool)
    return torch.zeros_like(x, dtype=torch.bool).scatter(-1, idx, ones)  # out of place: ONNX-exportable


def sparsify(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero each token's smallest-|x| fraction ``sparsity`` of channels; straight-through gradient. [..., C]."""
    if sparsity <= 0:
        return x
    kept = x * topk_mask(x, sparsity)
    return kept if not x.requires_grad else x + (kept - x).detach()


class TernaryLinear(nn.Linear):
    """Fake-quantised ternary linear (training and reference inference): [..., in] -> [..., out].

    Runtime knob ``sparsity`` (fraction of each token's inputs dropped, 0 = dense). ``delta_mode`` and ``act_int8``:
    see the module notes (TeTRA's numerics).
    """

    knobs = ("sparsity",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-5,
                 delta_mode: str = "add", act_int8: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        if delta_mode not in ("add", "clamp"):
            raise ValueError(f"ternary delta_mode {delta_mode!r} is not 'add' or 'clamp'")
        self.eps, self.delta_mode, self.act_int8 = eps, delta_mode, act_int8
        self.sparsity = 0.0
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # (q, delta) of a packed model

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [out, in], delta fp32 scalar) that this layer computes with."""
        return self.fixed if self.fixed is not None else ternarize(self.weight, self.eps, self.delta_mode)

    def effective_weight(self) -> torch.Tensor:
        """delta * q [out, in], exactly the weight used in forward."""
        if self.fixed is not None:
            q, delta = self.fixed
            return delta * q.to(self.weight.dtype)
        return _TernarySTE.apply(self.weight, self.eps, self.delta_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = sparsify(x, self.sparsity)
        if not self.act_int8:
            return F.linear(x, self.effective_weight(), self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(fake_quant_int8(x), self.effective_weight(), self.bias)  # straight-through training
        # inference: TeTRA's eval order of operations (an integer-valued matmul, then the two scales divided out)
        q, delta = self.quantized()
        s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=ACT_EPS)
        y = F.linear((x * s).round().clamp(-128, 127), q.to(x.dtype)) / s / (1.0 / delta)
        return y if self.bias is None else y + self.bias

    def set_fixed(self, q: torch.Tensor, delta: torch.Tensor) -> None:
        """Use stored (q, delta) from now on (a reloaded packed model); the latent weight becomes delta * q."""
        self.fixed = (q.to(torch.int8), delta.float().reshape(()))
        with torch.no_grad():
            self.weight.copy_(self.effective_weight())
        self.weight.requires_grad_(False)


class Int8TernaryLinear(nn.Module):
    """Inference twin of a TernaryLinear running an int8 GEMM: [..., in] -> [..., out].

    x is sparsified (per token), quantised per token to int8 (scale max|x|/127), multiplied with the int8
    ternary matrix by ``torch._int_mm`` into int32, and rescaled by (x scale * delta) in fp32 plus the bias.
    """

    knobs = ("sparsity",)

    def __init__(self, layer: TernaryLinear) -> None:
        super().__init__()
        q, delta = layer.quantized()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("q", q.detach().clone())  # [out, in]; the GEMM reads its transpose view
        self.register_buffer("delta", delta.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.sparsity = layer.sparsity

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [out, in], delta fp32 scalar), as TernaryLinear.quantized."""
        return self.q, self.delta

    def effective_weight(self) -> torch.Tensor:
        """delta * q [out, in] in fp32: the weight the int8 GEMM represents."""
        return self.delta * self.q.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = sparsify(x.reshape(-1, shape[-1]).float(), self.sparsity)
        pad = max(0, 17 - x.shape[0])  # _int_mm needs more than 16 rows
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        scale = x.abs().amax(1, keepdim=True).clamp_(min=ACT_EPS).div_(127.0)
        xi = (x * scale.reciprocal()).round_().to(torch.int8)  # in-place ops: several times faster here
        y = torch._int_mm(xi, self.q.t()).float().mul_(scale * self.delta)
        if self.bias is not None:
            y.add_(self.bias)
        if pad:
            y = y[: y.shape[0] - pad]
        return y.reshape(*shape[:-1], self.out_features)


def target_layers(module: nn.Module, patterns: tuple[str, ...] = DEFAULT_PATTERNS,
                  full_precision_last_ffn: bool = True) -> list[str]:
    """Qualified names of the nn.Linear layers to make ternary."""
    regs = [re.compile(p) for p in patterns]
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and any(r.search(n) for r in regs)]
    if full_precision_last_ffn:
        ffn = [n for n in names if re.search(r"\.mlp\.fc[12]$", n)]
        if ffn:
            last_block = ffn[-1].rsplit(".mlp.", 1)[0]
            names = [n for n in names if not n.startswith(last_block + ".mlp.")]
    return names


def _swap(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)


def apply_ternary(module: nn.Module, patterns: tuple[str, ...] | list[str] = DEFAULT_PATTERNS,
                  full_precision_last_ffn: bool = True, eps: float = 1e-5, delta_mode: str = "add",
                  act_int8: bool = False) -> list[str]:
    """Replace the target nn.Linear layers of ``module`` in place by TernaryLinear (same latent weights).

    Returns the replaced names; raises when nothing matches (a config that silently compresses nothing).
    """
    names = target_layers(module, tuple(patterns), full_precision_last_ffn)
    if not names:
        raise ValueError(f"ternary: no nn.Linear of {type(module).__name__} matches {list(patterns)}")
    for name in names:
        old = module.get_submodule(name)
        new = TernaryLinear(old.in_features, old.out_features, old.bias is not None, eps, delta_mode, act_int8)
        new.load_state_dict(old.state_dict())
        new.to(old.weight.device)
        _swap(module, name, new)
    return names


def to_int8(module: nn.Module) -> nn.Module:
    """Replace every TernaryLinear of ``module`` in place by its Int8TernaryLinear twin (inference only)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, TernaryLinear):
            _swap(module, name, Int8TernaryLinear(m))
    return module


_CODE = torch.tensor([0, 1, 2], dtype=torch.uint8)  # q = 0, +1, -1 -> 2-bit codes 0, 1, 2


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 {-1, 0, 1} of any shape -> uint8 [ceil(n / 4)], four 2-bit codes per byte (first in the low bits)."""
    flat = q.reshape(-1).to(torch.int64)
    codes = torch.where(flat < 0, 2, flat).to(torch.uint8)
    codes = F.pad(codes, (0, (-codes.numel()) % 4)).reshape(-1, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack``: uint8 [ceil(n / 4)] -> int8 {-1, 0, 1} of ``shape``."""
    codes = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], 1).reshape(-1)[: math.prod(shape)]
    if bool((codes == 3).any()):
        raise ValueError("packed ternary weights hold the invalid 2-bit code 3 (corrupt file)")
    q = codes.to(torch.int8)
    return torch.where(q == 2, torch.tensor(-1, dtype=torch.int8), q).reshape(shape)
