"""A Qdrant Edge shard (qdrant-edge-py: Qdrant's own Rust engine in the process, no server) in ``INDEX/qdrant-edge/``:
the on-device Qdrant backend (``index build --kind qdrant``).

It replaces qdrant-client's *local mode*, which stored its points with ``pickle`` and read them back with
``pickle.loads`` (code execution from an index folder) and searched by brute force in Python. Edge's segment files
are its own binary formats: nothing in them is executed. The shard is made without a write-ahead log, so several
processes can open it at once (``serve`` beside ``localize``; with a WAL the second one is refused: the log is
locked); every uploaded batch is flushed instead, and the shard is optimised (HNSW graph, int8 codes) after upload.

Integrity: the shard rewrites some of its own files (journals, its config) every time it is loaded, so its files
cannot carry a fixed checksum in the manifest. It is a structure *derived* from the SQLite rows, which the manifest
does checksum; ``check`` compares it with them instead: the point count always, the stored vectors of a seeded sample
of points at every open, and every vector with ``full=True`` (``index info --verify``). An index made by an earlier
edgevpr with local mode (``params.path``) is refused with the command that rebuilds it.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np

from ._qdrant import INSTALL, REQUIRED_FILES, QdrantBackend  # noqa: F401  (REQUIRED_FILES: the registry reads it)

EDGE_DIR = "qdrant-edge"

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


class EdgeStore(QdrantBackend):
    """A Qdrant Edge shard in ``INDEX/qdrant-edge/`` (qdrant-edge-py)."""

    def __init__(self, root: Path, spec: dict, dim: int, create: bool = False) -> None:
        try:
            import qdrant_edge as qe
        except ImportError:
            raise ValueError(INSTALL) from None
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



def create(root: Path, kind: str, dim: int, desc: np.ndarray, params: dict, con: sqlite3.Connection):
    """A new shard in ``root/qdrant-edge`` (filled from the rows at ``save``) -> (backend, settings)."""
    used = {"engine": "qdrant-edge", "edge_path": EDGE_DIR,
            **{k: type(v)(params[k]) if params.get(k) is not None else v for k, v in EDGE_DEFAULTS.items()}}
    store = EdgeStore(root, used, dim, create=True)
    if store.ntotal > len(desc):
        raise ValueError(f"{store.where} already holds {store.ntotal} points, more than this index's images: "
                         "choose another --out")
    return store, used


def load(root: Path, manifest: dict, con: sqlite3.Connection, mmap: bool = True) -> EdgeStore:
    if "path" in manifest["params"]:  # qdrant-client local mode (pickle storage) of edgevpr <= 0.1 index folders
        raise ValueError(f"{root}: built with qdrant-client's local mode, whose storage is read with pickle (code "
                         "from a data file); it is not opened. Rebuild it: `edgevpr index build --kind qdrant` into "
                         "a new folder (the Qdrant Edge engine)")
    return EdgeStore(root, manifest["params"], manifest["dim"])


def discard(root: Path, params: dict) -> None:
    shutil.rmtree(root / params.get("edge_path", EDGE_DIR), ignore_errors=True)
