"""A collection on a Qdrant server or cluster through qdrant-client (``index build --kind qdrant --qdrant-url``):
``shard_number`` and ``replication_factor`` go to the collection. No server is reachable where edgevpr is tested:
this engine is exercised only by hand against a running Qdrant."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from ._qdrant import INSTALL, REQUIRED_FILES, QdrantBackend, refuse_fuller  # noqa: F401  (REQUIRED_FILES: the registry reads it)

REMOVABLE = False


class ServerStore(QdrantBackend):
    """A collection on a Qdrant server or cluster (qdrant-client over HTTP)."""

    def __init__(self, root: Path, spec: dict, dim: int, create: bool = False) -> None:
        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise ValueError(INSTALL) from None
        self.root, self.spec, self.dim = root, spec, dim
        self.client = QdrantClient(url=spec["url"], api_key=spec.get("api_key"), timeout=60)
        self.collection = spec["collection"]
        self.where = f"{spec['url']} collection {self.collection}"

    def create(self) -> None:
        """Create the collection (cosine, ``dim``) and its geo index when it does not exist yet."""
        from qdrant_client import models

        if self.client.collection_exists(self.collection):
            return
        extra = {k: int(self.spec[k]) for k in ("shard_number", "replication_factor") if self.spec.get(k)}
        self.client.create_collection(self.collection, models.VectorParams(size=self.dim,
                                                                           distance=models.Distance.COSINE), **extra)
        self.client.create_payload_index(self.collection, "location", models.PayloadSchemaType.GEO)

    @property
    def ntotal(self) -> int:
        if not self.client.collection_exists(self.collection):
            return 0
        return int(self.client.count(self.collection, exact=True).count)

    def _upsert(self, points):
        from qdrant_client import models

        self.client.upsert(self.collection, [models.PointStruct(id=i, vector=v.tolist(), payload=p)
                                             for i, v, p in points], wait=True)

    def _query(self, vec, k, ids, geo):
        from qdrant_client import models

        flt = None
        if geo is not None:
            flt = models.Filter(must=[models.FieldCondition(key="location", geo_radius=models.GeoRadius(
                center=models.GeoPoint(lat=geo[0], lon=geo[1]), radius=geo[2]))])
        elif ids is not None:
            flt = models.Filter(must=[models.HasIdCondition(has_id=[int(i) for i in ids])])
        res = self.client.query_points(self.collection, query=vec.tolist(), limit=k, query_filter=flt,
                                       with_payload=False).points
        return [(int(p.id), float(p.score)) for p in res]

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        recs = self.client.retrieve(self.collection, ids, with_payload=False, with_vectors=True)
        return {int(r.id): np.asarray(r.vector, np.float32) for r in recs}

    def close(self) -> None:
        self.client.close()


def create(root: Path, kind: str, dim: int, desc: np.ndarray, params: dict, con: sqlite3.Connection):
    used = {"url": params["url"], "collection": params.get("collection") or f"edgevpr-{root.resolve().name}",
            **{k: int(params[k]) for k in ("shard_number", "replication_factor") if params.get(k)}}
    store = ServerStore(root, used, dim, create=True)
    refuse_fuller(store, len(desc), "--collection")
    return store, used


def load(root: Path, manifest: dict, con: sqlite3.Connection, mmap: bool = True) -> ServerStore:
    return ServerStore(root, manifest["params"], manifest["dim"])


def discard(root: Path, params: dict) -> None:
    raise ValueError(f"{root}: images cannot be removed from a Qdrant server collection here; rebuild the index")
