"""What the two Qdrant engines share (``qdrant_edge.py``, ``qdrant_server.py``): one point per row, id = the row id,
the L2-normalised descriptor under cosine distance (so scores are the cosines FAISS gives), and the payload ``path``,
``place_id``, ``location`` ({lat, lon}: Qdrant's geo type, indexed for geo-radius filters), ``east``, ``north``;
points are uploaded from the rows the collection does not hold yet (ids >= its count), so a killed upload continues
where it stopped; ``check`` compares the points with the rows (a structure derived from them carries no checksum)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from .base import Backend

UPLOAD_BATCH = 256
#: points compared with their SQLite rows at every open (all of them with ``full=True``)
SPOT_CHECK = 16
INSTALL = "a qdrant index needs qdrant-edge-py (on the device) or qdrant-client (a server): " \
          "pip install 'edgevpr[qdrant]'"
REQUIRED_FILES: tuple[str, ...] = ()


def _payload(path: str, place: str | None, lat, lon, east, north, session=None, when=None) -> dict:
    """A point's payload: every column of its row but the descriptor (so a shard alone gives back the rows)."""
    out = {"path": path, "place_id": place, "east": east, "north": north, "session": session, "time": when}
    if lat is not None and lon is not None:
        out["location"] = {"lat": lat, "lon": lon}
    return out


def row_of(payload: dict) -> tuple:
    """The row columns (path, place_id, lat, lon, east, north, session, time) a payload holds."""
    loc = payload.get("location")
    loc = loc if isinstance(loc, dict) else {}
    return (payload.get("path"), payload.get("place_id"), loc.get("lat"), loc.get("lon"), payload.get("east"),
            payload.get("north"), payload.get("session"), payload.get("time"))


def refuse_fuller(store: QdrantBackend, n: int, choose: str) -> None:
    """A new index of ``n`` images cannot take over a collection that already holds more points than that."""
    if store.ntotal > n:
        raise ValueError(f"{store.where} already holds {store.ntotal} points, more than this index's images: "
                         f"choose another {choose}")


_ROWS = ("SELECT id, path, place_id, lat, lon, east, north, session, time, descriptor FROM images WHERE id >= ? "
         "ORDER BY id")


class QdrantBackend(Backend):
    """What both engines share: upload from SQLite, the spot check, the result arrays."""

    kind = "qdrant"

    root: Path
    dim: int

    @property
    def ntotal(self) -> int:
        raise NotImplementedError

    def _upsert(self, points: list[tuple[int, np.ndarray, dict]]) -> None:
        raise NotImplementedError

    def _query(self, vec: np.ndarray, k: int, ids: np.ndarray | None,
               geo: tuple[float, float, float] | None) -> list[tuple[int, float]]:
        raise NotImplementedError

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def sync(self, con: sqlite3.Connection) -> int:
        """Upload the rows with id >= the collection's count -> points uploaded."""
        self.create()
        start, done = self.ntotal, 0
        cur = con.execute(_ROWS, (start,))
        while batch := cur.fetchmany(UPLOAD_BATCH):
            self._upsert([(int(i), np.frombuffer(blob, np.float32), _payload(*cols))
                          for i, *cols, blob in batch])
            done += len(batch)
        self.flush()
        return done

    def create(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def check(self, con: sqlite3.Connection, full: bool = False) -> list[str]:
        """Problems (one line each) of the points against the SQLite rows: vectors of a seeded sample of
        ``SPOT_CHECK`` points (every point with ``full``) must equal the stored descriptors."""
        n = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        if n == 0:
            return []
        ids = list(range(n)) if full else sorted({int(i) for i in np.random.default_rng(0).integers(0, n, SPOT_CHECK)})
        for start in range(0, len(ids), 512):
            part = ids[start:start + 512]
            got = self.vectors(part)
            marks = ",".join("?" * len(part))
            for i, blob in con.execute(f"SELECT id, descriptor FROM images WHERE id IN ({marks})", part):
                want = np.frombuffer(blob, np.float32)
                v = got.get(int(i))
                if v is None or v.shape != want.shape or not np.allclose(v, want / max(np.linalg.norm(want), 1e-12),
                                                                        atol=1e-4):
                    return [f"{self.where}: point {i} differs from its row in places.sqlite (damaged search "
                            "structure: rebuild the index)"]
        return []

    def _search(self, desc: np.ndarray, k: int, ids: np.ndarray | None = None,
                geo: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Queries [Q, D] -> (scores [Q, k], ids [Q, k]; -1 pads), restricted to ``ids`` or to the native
        geo-radius filter ``geo`` = (lat, lon, radius_m)."""
        scores, found = np.full((len(desc), k), -np.inf, np.float32), np.full((len(desc), k), -1, np.int64)
        for q, vec in enumerate(desc):
            for r, (i, s) in enumerate(self._query(vec, k, ids, geo)[:k]):
                scores[q, r], found[q, r] = s, i
        return scores, found



    def add(self, desc: np.ndarray) -> None:
        """Nothing: points are uploaded from the rows at ``save``."""

    def save(self, root: Path, con: sqlite3.Connection) -> tuple[str, ...]:
        self.sync(con)
        return ()

    def search(self, desc, k, ids=None, geo=None):
        """One request per query; a geo prior uses Qdrant's native geo-radius filter instead of the ids."""
        return self._search(desc, k, None if geo is not None else ids, geo)

    def configure(self, params: dict) -> None:
        self.spec = {**self.spec, **params}
