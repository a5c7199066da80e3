"""The interface every engine implements (``Backend``); the engines import it from here, the registry re-exports
it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np


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
