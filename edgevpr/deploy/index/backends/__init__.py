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

The interface is ``base.py``; this registry imports the engines lazily (by kind) and the engines import ``base``
alone, so no import runs in a circle (tests/test_layering.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from .base import Backend

FAISS_KINDS = ("flat", "ivfpq", "hnsw", "binary")
KINDS = (*FAISS_KINDS, "qdrant")


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
