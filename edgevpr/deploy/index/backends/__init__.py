"""Where search happens: one interface, one file per engine.

Every engine holds a *search structure* over the rows of an index folder's row store (``store.py``: SQLite rows,
manifest, integrity); ids are the row ids 0..N-1. The operations (``ops.py``: build, add, merge, remove, tune) and
``PlaceIndex`` are written once against ``Backend``; nothing outside this package imports an engine's module
(``tests/test_layering.py``).

* ``faiss_kinds.py``: flat (exact, optionally PCA-whitened / float16 / int8), IVF-PQ (8-bit or 4-bit fast-scan codes,
  exact re-ranking on a float16 copy), HNSW, binary (sign bits, Hamming).
* ``qdrant_edge.py``: the Qdrant engine embedded in the process (qdrant-edge-py): HNSW, int8 scalar quantization
  with re-scoring, a geo payload index, Qdrant's own snapshot format.
* ``qdrant_server.py``: a Qdrant server or cluster through qdrant-client (``--qdrant-url``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

FAISS_KINDS = ("flat", "ivfpq", "hnsw", "binary")
KINDS = (*FAISS_KINDS, "qdrant")


class Backend:
    """A search structure over an index folder's rows (ids 0..N-1)."""

    kind: str
    #: names the structure in messages (a file, a shard folder, a server collection)
    where: str
    #: whether ``tune`` may vary an exact re-ranking depth
    can_rerank: bool = False

    @property
    def ntotal(self) -> int:
        """Vectors it holds."""
        raise NotImplementedError

    def add(self, desc: np.ndarray) -> None:
        """Append descriptors [M, D] as ids ntotal..ntotal+M-1 (engines that load from the rows at ``save`` ignore
        them)."""
        raise NotImplementedError

    def save(self, root: Path, con: sqlite3.Connection) -> tuple[str, ...]:
        """Make it durable in ``root`` (from the rows in ``con`` where the engine loads them itself) -> the names of
        the files the manifest should checksum."""
        raise NotImplementedError

    def search(self, desc: np.ndarray, k: int, ids: np.ndarray | None = None,
               geo: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Queries [Q, D] (L2-normalised) -> (scores [Q, k'], ids [Q, k']), best first, -1 pads; restricted to the
        row ids ``ids`` [M] (unique, sorted) or, where the engine has one, to the native geo-radius filter ``geo`` =
        (lat, lon, radius_m) that the ids came from."""
        raise NotImplementedError

    def configure(self, params: dict) -> None:
        """Apply search-time settings (nprobe, efSearch, re-rank depth, hnsw_ef...)."""

    def check(self, con: sqlite3.Connection, full: bool = False) -> list[str]:
        """Problems (one line each) of a structure derived from the rows that no manifest checksum covers."""
        return []

    def close(self) -> None:
        pass


def _module(kind: str, params: dict):
    if kind in FAISS_KINDS:
        from . import faiss_kinds as m
    elif kind == "qdrant" and params.get("url"):
        from . import qdrant_server as m
    elif kind == "qdrant":
        from . import qdrant_edge as m
    else:
        raise ValueError(f"unknown index kind {kind!r} (choose from {', '.join(KINDS)})")
    return m


def create(root: Path, kind: str, dim: int, desc: np.ndarray, params: dict,
           con: sqlite3.Connection) -> tuple[Backend, dict]:
    """A new search structure of ``kind`` over ``desc`` [N, D] (the rows of ``con``) -> (it, the settings used,
    recorded in the manifest's params)."""
    return _module(kind, params).create(root, kind, dim, desc, params, con)


def open_backend(root: Path, manifest: dict, con: sqlite3.Connection, mmap: bool = True) -> Backend:
    """The search structure of a finished index (its files already checked against the manifest), configured with
    the manifest's settings; ``mmap`` maps files instead of reading them."""
    return _module(manifest["kind"], manifest["params"]).load(root, manifest, con, mmap)


def discard(root: Path, kind: str, params: dict) -> None:
    """Delete the structure's files from ``root`` (before it is made anew from changed rows)."""
    _module(kind, params).discard(root, params)


def required_files(kind: str, params: dict) -> tuple[str, ...]:
    """Files the manifest of an index of ``kind`` must checksum besides the row store."""
    return _module(kind, params).REQUIRED_FILES


def folders(kind: str, params: dict) -> tuple[str, ...]:
    """Folders of the index that hold this engine's structure (copied into a writer's next generation)."""
    return getattr(_module(kind, params), "FOLDERS", ())


def storage_of(kind: str) -> str:
    """How the row store keeps descriptors for ``kind``: "bits" (binary) or "float32"."""
    return "bits" if kind == "binary" else "float32"


def removable(kind: str, params: dict) -> bool:
    """Whether ``index remove`` can rebuild this structure here (a server collection: no)."""
    return getattr(_module(kind, params), "REMOVABLE", True)
