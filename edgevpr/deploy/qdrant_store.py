"""The search side of a place index in a Qdrant collection (``index build --kind qdrant``), through qdrant-client.

The index folder keeps what every index keeps (SQLite rows and descriptors, the manifest with the model's
fingerprint), so resuming, fingerprint checks and ``--skip-bad`` behave exactly as with FAISS; only the search
structure lives in Qdrant: one point per image, id = the image id, the L2-normalised descriptor under cosine
distance (so scores are the same cosines FAISS gives), and the payload ``path``, ``place_id``, ``location``
({lat, lon}: Qdrant's geo type, indexed for geo-radius filters), ``east``, ``north``.

Where: ``url`` None is qdrant-client's local mode (an embedded store in ``INDEX/qdrant/``: tests and single
machines; its timings are not a server's); a URL is a Qdrant server or cluster, where ``shard_number`` and
``replication_factor`` are passed to the collection. Points are uploaded from the SQLite rows the collection does
not have yet (ids >= its count), so a killed upload continues where it stopped.
"""

from __future__ import annotations

import atexit
import sqlite3
import threading
from pathlib import Path

import numpy as np

UPLOAD_BATCH = 256
_LOCAL: dict[str, object] = {}  # one local-mode client per folder and process (local mode locks its folder)
_LOCK = threading.Lock()


def _client(root: Path, spec: dict):
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise ValueError("a qdrant index needs qdrant-client: pip install 'edgevpr[qdrant]'") from None
    if spec.get("url"):
        return QdrantClient(url=spec["url"], api_key=spec.get("api_key"), timeout=60)
    path = str((root / spec.get("path", "qdrant")).resolve())
    with _LOCK:
        if not _LOCAL:
            atexit.register(_close_local)
        if path not in _LOCAL:
            _LOCAL[path] = QdrantClient(path=path)
        return _LOCAL[path]


def _close_local() -> None:
    for c in _LOCAL.values():
        c.close()
    _LOCAL.clear()


class QdrantStore:
    """A Qdrant collection behind the FAISS-like calls the place index makes (``ntotal``, ``search``)."""

    def __init__(self, root: Path, spec: dict, dim: int) -> None:
        self.root, self.spec, self.dim = root, spec, dim
        self.client = _client(root, spec)
        self.collection = spec["collection"]

    def create(self) -> None:
        """Create the collection (cosine, ``dim``) and its geo index when it does not exist yet."""
        from qdrant_client import models

        if self.client.collection_exists(self.collection):
            return
        extra = {k: int(self.spec[k]) for k in ("shard_number", "replication_factor") if self.spec.get(k)}
        self.client.create_collection(self.collection, models.VectorParams(size=self.dim,
                                                                           distance=models.Distance.COSINE), **extra)
        if self.spec.get("url"):  # payload indexes are a server feature; local mode filters without them
            self.client.create_payload_index(self.collection, "location", models.PayloadSchemaType.GEO)

    @property
    def ntotal(self) -> int:
        if not self.client.collection_exists(self.collection):
            return 0
        return int(self.client.count(self.collection, exact=True).count)

    def sync(self, con: sqlite3.Connection) -> int:
        """Upload the rows with id >= the collection's count -> points uploaded."""
        from qdrant_client import models

        self.create()
        start, done = self.ntotal, 0
        q = "SELECT id, path, place_id, lat, lon, east, north, descriptor FROM images WHERE id >= ? ORDER BY id"
        cur = con.execute(q, (start,))
        while batch := cur.fetchmany(UPLOAD_BATCH):
            points = []
            for i, path, place, lat, lon, east, north, blob in batch:
                payload = {"path": path, "place_id": place, "east": east, "north": north}
                if lat is not None and lon is not None:
                    payload["location"] = {"lat": lat, "lon": lon}
                points.append(models.PointStruct(id=int(i), vector=np.frombuffer(blob, np.float32).tolist(),
                                                 payload=payload))
            self.client.upsert(self.collection, points, wait=True)
            done += len(points)
        return done

    def search(self, desc: np.ndarray, k: int, ids: np.ndarray | None = None,
               geo: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Queries [Q, D] -> (scores [Q, k], ids [Q, k]; -1 pads), restricted to ``ids`` or to the native
        geo-radius filter ``geo`` = (lat, lon, radius_m)."""
        from qdrant_client import models

        flt = None
        if geo is not None:
            flt = models.Filter(must=[models.FieldCondition(key="location", geo_radius=models.GeoRadius(
                center=models.GeoPoint(lat=geo[0], lon=geo[1]), radius=geo[2]))])
        elif ids is not None:
            flt = models.Filter(must=[models.HasIdCondition(has_id=[int(i) for i in ids])])
        scores, found = np.full((len(desc), k), -np.inf, np.float32), np.full((len(desc), k), -1, np.int64)
        for q, vec in enumerate(desc):
            res = self.client.query_points(self.collection, query=vec.tolist(), limit=k, query_filter=flt,
                                           with_payload=False).points
            for r, p in enumerate(res):
                scores[q, r], found[q, r] = p.score, int(p.id)
        return scores, found
