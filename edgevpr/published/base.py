"""The contract of a published-model family, and the strict key accounting every importer uses.

A family (one file each: salad.py, megaloc.py, boq.py, mixvpr.py, cosplace.py, tetra.py) is a function
``convert(ledger) -> Converted``: it reads the architecture from the tensor shapes, builds the edgevpr model
config, and moves every upstream tensor it uses into an edgevpr state dict through the ``Ledger``, which
records what was used and what was left out on purpose (with the reason). ``Ledger.close`` then refuses a
checkpoint with keys nobody accounted for, so a layout change upstream can never be imported silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..registry import Registry


class CheckpointError(ValueError):
    """A checkpoint that is not of the family asked for, or is damaged (one-line message)."""


class Ledger:
    """Upstream state dict with accounting: ``take`` (used), ``skip`` (left out on purpose, with a reason)."""

    def __init__(self, sd: dict[str, torch.Tensor], where: str, family: str) -> None:
        self.sd, self.where, self.family = sd, where, family
        self.used: set[str] = set()
        self.unused: dict[str, str] = {}

    def has(self, key: str) -> bool:
        return key in self.sd

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.need(key).shape)

    def need(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise CheckpointError(f"{self.where}: not a {self.family} checkpoint (no '{key}')")
        return self.sd[key]

    def take(self, key: str) -> torch.Tensor:
        t = self.need(key)
        self.used.add(key)
        return t.float() if t.is_floating_point() else t

    def skip(self, key: str, reason: str) -> None:
        if key in self.sd:
            self.unused[key] = reason

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.sd if k.startswith(prefix))

    def count(self, prefix: str) -> int:
        """Number of numbered children under ``prefix`` (``blocks.`` -> 12 for blocks.0 .. blocks.11)."""
        idx = {k[len(prefix):].split(".", 1)[0] for k in self.sd if k.startswith(prefix)}
        return len([i for i in idx if i.isdigit()])

    def move(self, src_prefix: str, dst_prefix: str, out: dict[str, torch.Tensor],
             rename: Callable[[str], str] = lambda k: k) -> None:
        """Take every key under ``src_prefix`` into ``out`` as ``dst_prefix + rename(rest)``."""
        for k in self.keys(src_prefix):
            if k not in self.unused:
                out[dst_prefix + rename(k[len(src_prefix):])] = self.take(k)

    def close(self) -> None:
        left = sorted(set(self.sd) - self.used - set(self.unused))
        if left:
            raise CheckpointError(f"{self.where}: {len(left)} key(s) of this {self.family} checkpoint are not "
                                  f"understood (first: {left[0]}): a different release or family?")


@dataclass
class Converted:
    """An edgevpr model config, its state dict (edgevpr keys) and the upstream keys left out on purpose."""

    config: dict
    state: dict[str, torch.Tensor]
    unused: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """A published model family: its converter and what is known about its upstream code."""

    name: str
    upstream: str
    licence: str
    convert: Callable[[Ledger], Converted]
    #: the binary descriptor option of the hub (TeTRA): bits = value > 0, packed MSB first
    binary: bool = False


FAMILIES: Registry[Family] = Registry("published model format")


def register(family: Family) -> Family:
    FAMILIES.register(family.name)(lambda: family)
    return family


def conv1x1_to_linear(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's weight [O, I, 1, 1] as a Linear weight [O, I]."""
    return w.reshape(w.shape[0], w.shape[1])
