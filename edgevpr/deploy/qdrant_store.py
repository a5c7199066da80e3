"""The search side of a place index in Qdrant (``index build --kind qdrant``): the Qdrant Edge engine embedded in the
process (default), or a Qdrant server or cluster through qdrant-client (``--qdrant-url``).

The index folder keeps what every index keeps (SQLite rows and descriptors, the manifest with the model's
fingerprint), so resuming, fingerprint checks and ``--skip-bad`` behave exactly as with FAISS; only the search
structure lives in Qdrant: one point per image, id = the image id, the L2-normalised descriptor under cosine
distance (so scores are the same cosines FAISS gives), and the payload ``path``, ``place_id``, ``location``
({lat, lon}: Qdrant's geo type, indexed for geo-radius filters), ``east``, ``north``.

Where:

* ``url`` None: a Qdrant Edge shard (``qdrant-edge-py``: Qdrant's own Rust engine in the process, no server) in
  ``INDEX/qdrant-edge/``. It replaces qdrant-client's *local mode*, which stored its points with ``pickle`` and
  read them back with ``pickle.loads`` (code execution from an index folder) and searched by brute force in Python.
  Edge's segment files are its own binary formats: nothing in them is executed.
* ``url`` a server: qdrant-client over HTTP; ``shard_number`` and ``replication_factor`` go to the collection.

An Edge shard is made without a write-ahead log, so several processes can open it at once (``serve`` beside
``localize``; with a WAL the second one is refused: the log is locked); every uploaded batch is flushed instead.

Integrity: an Edge shard rewrites some of its own files (journals, its config) every time it is loaded, so its
files cannot carry a fixed checksum in the manifest. It is a structure *derived* from the SQLite rows, which the
manifest does checksum; ``check`` compares it with them instead: the point count always, the stored vectors of a
seeded sample of points at every open, and every vector with ``full=True`` (``index info --verify``). Points are
uploaded from the SQLite rows the shard does not have yet (ids >= its count), so a killed upload continues where it
stopped. An index made by an earlier edgevpr with local mode (``params.path``) is refused with the command that
rebuilds it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

UPLOAD_BATCH = 256
EDGE_DIR = "qdrant-edge"
#: points compared with their SQLite rows at every open (all of them with ``full=True``)
SPOT_CHECK = 16
_INSTALL = "a qdrant index needs qdrant-edge-py (on the device) or qdrant-client (a server): " \
           "pip install 'edgevpr[qdrant]'"


def _payload(path: str, place: str | None, lat, lon, east, north) -> dict:
    out = {"path": path, "place_id": place, "east": east, "north": north}
    if lat is not None and lon is not None:
        out["location"] = {"lat": lat, "lon": lon}
    return out


_ROWS = "SELECT id, path, place_id, lat, lon, east, north, descriptor FROM images WHERE id >= ? ORDER BY id"


class _Store:
    """What both engines share: upload from SQLite, the spot check, the result arrays."""

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
            self._upsert([(int(i), np.frombuffer(blob, np.float32), _payload(path, place, lat, lon, east, north))
                          for i, path, place, lat, lon, east, north, blob in batch])
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

    def search(self, desc: np.ndarray, k: int, ids: np.ndarray | None = None,
               geo: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Queries [Q, D] -> (scores [Q, k], ids [Q, k]; -1 pads), restricted to ``ids`` or to the native
        geo-radius filter ``geo`` = (lat, lon, radius_m)."""
        scores, found = np.full((len(desc), k), -np.inf, np.float32), np.full((len(desc), k), -1, np.int64)
        for q, vec in enumerate(desc):
            for r, (i, s) in enumerate(self._query(vec, k, ids, geo)[:k]):
                scores[q, r], found[q, r] = s, i
        return scores, found


#: Edge's build and search settings (``index build --kind qdrant --param``): HNSW graph degree and build depth,
#: int8 scalar quantization of the vectors (kept in RAM, 4x smaller than float32) and, at search, the HNSW beam
#: ``hnsw_ef`` with the quantized candidates re-scored on the float32 vectors (``oversampling`` x k of them).
EDGE_DEFAULTS = {"hnsw_m": 16, "ef_construct": 100, "quantization": "int8", "hnsw_ef": 128, "oversampling": 2.0}


def edge_config(qe, dim: int, params: dict):
    """The EdgeConfig of a new shard: cosine vectors of ``dim``, no WAL, HNSW and quantization from ``params``."""
    p = {**EDGE_DEFAULTS, **params}
    quant = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, always_ram=True) if p["quantization"] == "int8" \
        else None
    return qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine, quantization_config=quant),
                         hnsw_config=qe.HnswIndexConfig(m=int(p["hnsw_m"]), ef_construct=int(p["ef_construct"]),
                                                        full_scan_threshold=10_000),
                         wal_enabled=False)


def search_params(qe, params: dict):
    """SearchParams of a query: the HNSW beam and re-scoring of the quantized candidates."""
    p = {**EDGE_DEFAULTS, **params}
    return qe.SearchParams(hnsw_ef=int(p["hnsw_ef"]), quantization=qe.QuantizationSearchParams(
        rescore=True, oversampling=float(p["oversampling"])))


class EdgeStore(_Store):
    """A Qdrant Edge shard in ``INDEX/qdrant-edge/`` (qdrant-edge-py)."""

    def __init__(self, root: Path, spec: dict, dim: int, create: bool = False) -> None:
        try:
            import qdrant_edge as qe
        except ImportError:
            raise ValueError(_INSTALL) from None
        self.qe, self.root, self.spec, self.dim = qe, root, spec, dim
        self.path = root / spec.get("edge_path", EDGE_DIR)
        self.where = str(self.path)
        self.collection = spec.get("collection")
        exists = (self.path / "edge_config.json").is_file()
        try:
            if exists:
                self.shard = qe.EdgeShard.load(str(self.path))
            elif create:
                # no write-ahead log: with one, a second process (``serve`` beside ``localize``) cannot open the
                # shard (the WAL is locked); durability comes from flushing after every uploaded batch instead,
                # and the SQLite rows stay the authority a killed upload is resumed from
                self.shard = qe.EdgeShard.create(str(self.path), edge_config(qe, dim, spec))
                self.shard.update(qe.UpdateOperation.create_field_index("location", qe.PayloadSchemaType.Geo))
            else:
                raise ValueError(f"{self.path}: the index's Qdrant Edge shard is missing (rebuild the index)")
        except ValueError:
            raise
        except Exception as e:  # the engine's own errors: a damaged or foreign shard
            raise ValueError(f"{self.path}: not a readable Qdrant Edge shard ({str(e).splitlines()[0][:200]})"
                             ) from None

    @property
    def ntotal(self) -> int:
        return int(self.shard.count(self.qe.CountRequest(exact=True)))

    def _upsert(self, points: list[tuple[int, np.ndarray, dict]]) -> None:
        qe = self.qe
        self.shard.update(qe.UpdateOperation.upsert_points(
            [qe.Point(id=i, vector=v.tolist(), payload=p) for i, v, p in points]))
        self.shard.flush()  # batch by batch: what a kill leaves is a prefix of the rows

    def flush(self) -> None:
        self.shard.flush()
        self.shard.optimize()  # builds the HNSW graph and quantized vectors of segments past the indexing threshold

    def _query(self, vec, k, ids, geo):
        qe = self.qe
        flt = None
        if geo is not None:
            flt = qe.Filter(must=[qe.FieldCondition(key="location", geo_radius=qe.GeoRadius(
                center=qe.GeoPoint(lat=geo[0], lon=geo[1]), radius=geo[2]))])
        elif ids is not None:
            flt = qe.Filter(must=[qe.HasIdCondition(point_ids={int(i) for i in ids})])
        res = self.shard.query(qe.QueryRequest(limit=k, query=qe.Query.Nearest(vec.tolist()), filter=flt,
                                               params=search_params(qe, self.spec), with_payload=False))
        return [(int(p.id), float(p.score)) for p in res]

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        recs = self.shard.retrieve(ids, with_payload=False, with_vector=True)
        out = {}
        for r in recs:
            v = r.vector
            v = v.get("", next(iter(v.values()), None)) if isinstance(v, dict) else v
            out[int(r.id)] = np.asarray(v, np.float32)
        return out

    def close(self) -> None:
        self.shard.close()


class ServerStore(_Store):
    """A collection on a Qdrant server or cluster (qdrant-client over HTTP)."""

    def __init__(self, root: Path, spec: dict, dim: int, create: bool = False) -> None:
        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise ValueError(_INSTALL) from None
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


def open_store(root: Path, spec: dict, dim: int, create: bool = False) -> _Store:
    """The Qdrant search structure an index's params describe (``url``: a server; otherwise an Edge shard)."""
    if spec.get("url"):
        return ServerStore(root, spec, dim, create)
    if "path" in spec:  # qdrant-client local mode (pickle storage) of edgevpr <= 0.1 index folders
        raise ValueError(f"{root}: built with qdrant-client's local mode, whose storage is read with pickle (code "
                         "from a data file); it is not opened. Rebuild it: `edgevpr index build --kind qdrant` into "
                         "a new folder (the Qdrant Edge engine)")
    return EdgeStore(root, spec, dim, create)
