"""Batched descriptor extraction with a resumable on-disk cache and bad-image handling.

Cache layout: ``<cache>/<model fingerprint>/<chunk key>.npz``. Images are processed in chunks of
``CHUNK`` files; a chunk's key hashes the image size, runtime knobs and, per file, its real path, size
and mtime. Each finished chunk is written atomically, so a killed run resumes at the first missing chunk
and a changed file is recomputed. A chunk also stores ``sha256(key | descriptors | ok | reasons)``: a chunk
that is damaged, truncated, or replaced by another (well-formed) chunk fails that check, is reported by name
in a one-line warning, and is recomputed. Chunks are read with ``allow_pickle=False``.
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
from ..integrity import check_finite, warn
from ..models.model import VPRModel
from ..utils import atomic_write, default_cache_dir  # noqa: F401  (re-exported)

CHUNK = 256


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


def _chunk_digest(key_src: str, desc: np.ndarray, ok: np.ndarray, reasons: np.ndarray) -> str:
    h = hashlib.sha256(key_src.encode())
    for a in (np.ascontiguousarray(desc, np.float32), np.ascontiguousarray(ok, bool)):
        h.update(a.tobytes())
    h.update("\x00".join(str(r) for r in reasons.tolist()).encode())
    return h.hexdigest()


def _save_chunk(path: str, key_src: str, desc: np.ndarray, ok: np.ndarray, reasons: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, desc=desc, ok=ok, reasons=reasons, sha256=np.array(_chunk_digest(key_src, desc, ok, reasons)))


def _load_chunk(path: Path, key_src: str, n: int) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """(desc [n, D], ok [n], reasons) of a cached chunk, or None (with a warning) when it does not verify."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "sha256" not in z.files:  # written before chunks carried a checksum: recompute quietly
                return None
            desc, ok, reasons, sha = z["desc"], z["ok"], z["reasons"], str(z["sha256"])
        if len(desc) != n or len(ok) != n or len(reasons) != n:
            raise ValueError(f"{len(desc)} rows, expected {n}")
        if sha != _chunk_digest(key_src, desc, ok, reasons):
            raise ValueError("checksum mismatch")
        if not np.isfinite(desc[ok]).all():
            raise ValueError("non-finite descriptors")
    except Exception as e:  # zip, npy and key errors all mean the same thing: this chunk cannot be trusted
        warn(f"descriptor cache chunk {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
             "): recomputing it")
        path.unlink(missing_ok=True)
        return None
    return desc.astype(np.float32), ok.astype(bool), [str(r) for r in reasons.tolist()]


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
        cached = _load_chunk(chunk_file, key_src, len(chunk)) if chunk_file is not None and chunk_file.exists() \
            else None
        if cached is not None:
            out[chunk], ok[chunk] = cached[0], cached[1]
            for i, r in zip(chunk, cached[2], strict=True):
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
                check_finite(d, [str(paths[i]) for i in rows], model.name)
                out[rows], ok[rows] = d, True
            bar.update(len(idx) + len(bad))
        if chunk_file is not None:
            rs = np.array([reasons.get(i, "") for i in chunk])
            atomic_write(chunk_file, lambda tmp, c=chunk, r=rs, k=key_src: _save_chunk(tmp, k, out[c], ok[c], r))
    bar.close()
    failed = [(str(paths[i]), reasons[i]) for i in sorted(reasons)]
    return Extraction(out, ok, failed, from_cache)
