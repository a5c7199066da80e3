"""Primitives of the row table that the row store (``store.py``) and the engines (``backends/``) share: they import
nothing of the index package, so the backends never import back from the store (tests/test_layering.py)."""

from __future__ import annotations

import sqlite3

import numpy as np

#: The most matches one query may ask for.
MAX_K = 1000


def pack_bits(desc: np.ndarray) -> np.ndarray:
    """descriptors [N, D] -> sign bits packed [N, D/8] uint8 (bit = value > 0, most significant bit first)."""
    return np.packbits(np.asarray(desc) > 0, axis=1)


def _stored_rows(con: sqlite3.Connection, ids: np.ndarray, dim: int) -> np.ndarray:
    """Stored float32 descriptors of ``ids`` [M] (in that order) -> [M, D]."""
    out = np.empty((len(ids), dim), np.float32)
    pos = {int(i): n for n, i in enumerate(ids)}
    for start in range(0, len(ids), 500):
        part = [int(i) for i in ids[start:start + 500]]
        for i, blob in con.execute(f"SELECT id, descriptor FROM images WHERE id IN ({','.join('?' * len(part))})",
                                   part):
            out[pos[i]] = np.frombuffer(blob, np.float32)
    return out
