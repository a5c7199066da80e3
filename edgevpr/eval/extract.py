"""Batched descriptor extraction with a resumable on-disk cache and bad-image handling.

Cache layout: ``<cache>/<model fingerprint>/<chunk key>.npz``. Images are processed in chunks of
``CHUNK`` files; a chunk's key hashes the image size, runtime knobs and, per file, its real path, size
and mtime. Each finished chunk is written atomically, so a killed run resumes at the first missing chunk
and a changed file is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.images import ImageLoadError, load_image
from ..models.model import VPRModel
from ..utils import atomic_write

CHUNK = 256


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEVPR_CACHE", Path.home() / ".cache" / "edgevpr")) / "descriptors"


class _Images(Dataset):
    """Loads images; returns (tensor [3,H,W] or None, index, error message or '')."""

    def __init__(self, paths: list[Path], transform, max_pixels: int | None) -> None:
        self.paths, self.transform, self.max_pixels = paths, transform, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_image(self.paths[i], self.max_pixels)), i, ""
        except ImageLoadError as e:
            return None, i, e.reason


def _collate(batch):
    ok = [(x, i) for x, i, err in batch if x is not None]
    bad = [(i, err) for x, i, err in batch if x is None]
    xs = torch.stack([x for x, _ in ok]) if ok else None
    return xs, [i for _, i in ok], bad


@dataclass
class Extraction:
    """descriptors [N, D] float32 (zeros where ``ok`` is False); failed: (path, reason) pairs."""

    descriptors: np.ndarray
    ok: np.ndarray
    failed: list[tuple[str, str]] = field(default_factory=list)
    from_cache: int = 0


def _file_key(p: Path) -> str:
    try:
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{p}|missing"


def _save_npz(path: str, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@torch.inference_mode()
def extract(model: VPRModel, paths: list[Path], batch_size: int = 32, cache_dir: str | os.PathLike | None = None,
            skip_bad: bool = False, num_workers: int = 0, device: str | torch.device = "cpu",
            image_size: tuple[int, int] | None = None, max_pixels: int | None = None,
            knobs: dict | None = None, desc: str = "extract", progress: bool = True) -> Extraction:
    """Descriptors for ``paths``. Without ``skip_bad`` the first unreadable image raises ImageLoadError."""
    model.eval()
    knobs = knobs or {}
    size = image_size or model.image_size
    transform = model.transform(size)
    fp = model.fingerprint()
    cache = Path(cache_dir) / fp if cache_dir else None
    n, dim = len(paths), model.out_dim
    out = np.zeros((n, dim), np.float32)
    ok = np.zeros(n, bool)
    reasons: dict[int, str] = {}
    from_cache = 0
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, n, CHUNK):
        chunk = list(range(start, min(n, start + CHUNK)))
        key_src = json.dumps([list(size), knobs, [_file_key(paths[i]) for i in chunk]], sort_keys=True)
        chunk_file = cache / f"{hashlib.sha256(key_src.encode()).hexdigest()[:24]}.npz" if cache else None
        if chunk_file is not None and chunk_file.exists():
            with np.load(chunk_file) as z:
                out[chunk], ok[chunk] = z["desc"].astype(np.float32), z["ok"]
                for i, r in zip(chunk, z["reasons"].tolist(), strict=True):
                    if r:
                        reasons[i] = r
            if not skip_bad and not ok[chunk].all():
                first = chunk[int(np.argmin(ok[chunk]))]
                raise ImageLoadError(paths[first], reasons.get(first, "unreadable"))
            from_cache += len(chunk)
            bar.update(len(chunk))
            continue
        loader = DataLoader(_Images([paths[i] for i in chunk], transform, max_pixels), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=_collate)
        for xs, idx, bad in loader:
            for j, err in bad:
                if not skip_bad:
                    raise ImageLoadError(paths[chunk[j]], err)
                reasons[chunk[j]] = err
            if xs is not None:
                d = model(xs.to(device), **knobs).float().cpu().numpy()
                rows = [chunk[j] for j in idx]
                out[rows], ok[rows] = d, True
            bar.update(len(idx) + len(bad))
        if chunk_file is not None:
            rs = np.array([reasons.get(i, "") for i in chunk])
            atomic_write(chunk_file, lambda tmp, c=chunk, r=rs: _save_npz(tmp, desc=out[c], ok=ok[c], reasons=r))
    bar.close()
    failed = [(str(paths[i]), reasons[i]) for i in sorted(reasons)]
    return Extraction(out, ok, failed, from_cache)
