"""Per-image feature caches that cannot exhaust memory: frozen-prefix outputs and teacher outputs.

A value computed once per training image (the frozen stem and first stages of the student when nothing is
augmented; a frozen teacher on its clean view) is kept off the accelerator, in one preallocated array per named
tensor: in host memory when ``images x bytes per image`` fits the host budget, else memory-mapped in a file under
the run folder when it fits the disk budget, else not at all (recomputed every step). The decision is made once,
when the first values reveal their size, and logged (what is cached, how much, where). Nothing grows on the
accelerator with the dataset, and host use is bounded by the budget.

Stored values are exact copies (same dtype), computed one image at a time (a value must not depend on the batch
it happened to be computed in), so a resumed run trains the same weights as an uninterrupted one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


class FeatureCache:
    """Slots for ``n_items`` images, each holding a fixed-shape tensor per name (e.g. desc, patches)."""

    def __init__(self, what: str, n_items: int, host_gb: float, disk_gb: float, folder: Path | None,
                 log: Callable[[str], None] | None = None) -> None:
        self.what, self.n = what, n_items
        self.host_budget, self.disk_budget = host_gb * 2**30, disk_gb * 2**30
        self.folder = folder
        self.log = log or (lambda m: print(f"edgevpr: {m}", file=sys.stderr, flush=True))
        self.store: dict[str, torch.Tensor] | None = None
        self.filled = torch.zeros(n_items, dtype=torch.bool)
        self.where: str | None = None  # "host", "disk" or "off", decided at the first fill

    def _allocate(self, sample: dict[str, torch.Tensor]) -> None:
        per_item = sum(t[0].numel() * t.element_size() for t in sample.values())
        total = per_item * self.n
        size = f"{self.n} images x {per_item / 2**20:.2f} MiB = {total / 2**30:.2f} GiB"
        if total <= self.host_budget:
            self.store = {k: torch.empty((self.n, *t.shape[1:]), dtype=t.dtype) for k, t in sample.items()}
            self.where = "host"
            self.log(f"caching {self.what} in host memory ({size})")
        elif self.folder is not None and total <= self.disk_budget:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.store = {}
            for k, t in sample.items():
                dtype = t.dtype if t.dtype != torch.bfloat16 else torch.int16  # numpy has no bf16: store the bits
                arr = np.lib.format.open_memmap(self.folder / f"{self.what.replace(' ', '_')}.{k}.npy", mode="w+",
                                                dtype=torch.empty(0, dtype=dtype).numpy().dtype,
                                                shape=(self.n, *t.shape[1:]))
                self.store[k] = torch.from_numpy(arr).view(t.dtype)
            self.where = "disk"
            self.log(f"caching {self.what} on disk, memory-mapped under {self.folder} ({size})")
        else:
            self.where = "off"
            self.log(f"not caching {self.what}: {size} exceeds the budgets (host {self.host_budget / 2**30:.1f} GiB, "
                     f"disk {self.disk_budget / 2**30:.1f} GiB; data.cache_host_gb / data.cache_disk_gb); "
                     "recomputed every step")

    def fetch(self, ids: list[int], device: torch.device,
              compute: Callable[[list[int]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Values for image ids [B] on ``device``: cached rows copied in, the others computed by
        ``compute(rows)`` (rows: positions in ``ids``) and stored when the cache is on."""
        todo = [j for j, k in enumerate(ids) if self.where == "off" or not self.filled[k]]
        parts = []
        if todo and self.where is None:  # the first value decides where the cache lives
            parts = [compute(todo[:1])]
            self._allocate(parts[0])
        if self.where == "off" or not todo:  # never stored: computed with its batch, every step alike
            fresh = compute(todo) if todo else {}
        else:  # a stored value must be a function of its image alone, not of the batch it was computed in (CPU
            # kernels pick other algorithms per batch size: rows differ in the last bits), so a resumed run, whose
            # batches meet the cache in another state, reads the same values as an uninterrupted one
            parts += [compute([j]) for j in todo[len(parts):]]
            fresh = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self.where in ("host", "disk") and todo:
            rows = torch.tensor([ids[j] for j in todo])
            for k, t in fresh.items():
                self.store[k][rows] = t.detach().to("cpu")
            self.filled[rows] = True
        if len(todo) == len(ids):
            return fresh
        index = torch.tensor(ids)
        out = {k: v[index].to(device) for k, v in self.store.items()}
        if todo:
            at = torch.tensor(todo, device=device)
            for k, t in fresh.items():
                out[k][at] = t
        return out
