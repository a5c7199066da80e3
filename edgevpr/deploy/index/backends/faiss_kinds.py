"""The FAISS kinds of the place index: ``flat`` (exact; optionally PCA-whitened and/or float16 / int8 codes),
``ivfpq`` (IVF-PQ with 8-bit codes or 4-bit fast-scan codes, plus exact re-ranking of the top candidates on a float16
copy of every descriptor, ``vectors.f16.npy``, memory-mapped), ``hnsw`` and ``binary`` (sign bits, Hamming distance,
score 1 - 2 h / D). One file ``index.faiss``; FAISS id == row id; inner product of L2-normalised descriptors."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np

from ....utils import atomic_write
from ..rows import MAX_K, _stored_rows, pack_bits
from .base import Backend

FAISS_FILE = "index.faiss"
#: IVF-PQ's exact re-ranking: every descriptor as float16 in id order, a plain .npy memory-mapped at search.
VECTORS_FILE = "vectors.f16.npy"
REQUIRED_FILES = (FAISS_FILE,)
#: IVF-PQ: candidates re-ranked exactly by default (``--rerank``; 0 turns re-ranking off).
DEFAULT_RERANK = 64

#: IVF-PQ: PQ codebooks have 256 centroids per sub-quantiser; FAISS needs at least that many training vectors.
MIN_IVFPQ_TRAIN = 256


#: IVF-PQ default inverted lists: 4 sqrt(N), at most N / 39 (FAISS's points-per-centroid floor) and 1024 (k-means
#: over more lists of 1280-D vectors takes many minutes on a 2-core CPU; pass --nlist for more).
MAX_NLIST = 1024


#: IVF-PQ trains on at most this many vectors (a uniform sample, seeded).
MAX_TRAIN = 65536


def _read_faiss(path: Path, kind: str, flags: int = 0):
    import faiss

    return faiss.read_index_binary(str(path)) if kind == "binary" else faiss.read_index(str(path), flags)


def _make_faiss(kind: str, dim: int, n: int, params: dict):
    import faiss

    if kind == "binary":
        if dim % 8:
            raise ValueError(f"binary: the descriptor dimension {dim} is not a multiple of 8")
        return faiss.IndexBinaryFlat(dim), {}
    if kind == "flat":
        return _compact_flat(dim, n, params)
    if kind == "hnsw":
        m = int(params.get("hnsw_m", 32))
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.get("ef_construction", 80))
        return index, {"hnsw_m": m, "ef_construction": index.hnsw.efConstruction,
                       "ef_search": int(params.get("ef_search", 64))}
    if kind == "ivfpq":
        if n < MIN_IVFPQ_TRAIN:
            raise ValueError(f"ivfpq needs at least {MIN_IVFPQ_TRAIN} images to train its codebooks "
                             f"(have {n}); use --kind flat or hnsw")
        nlist = int(params.get("nlist") or max(1, min(int(4 * math.sqrt(n)), n // 39, MAX_NLIST)))
        nbits = int(params.get("nbits") or 8)
        if nbits not in (4, 8):
            raise ValueError(f"ivfpq: nbits={nbits} must be 8 (PQ codes of a byte) or 4 (fast-scan PQ)")
        # 4-bit codes: twice the sub-quantizers in the same bytes, scanned with SIMD lookup tables (FAISS's
        # IVFPQFastScan: several times faster per scanned code, which is where IVF-PQ spends its time)
        most = 128 * 8 // nbits
        m = int(params.get("pq_m") or max(d for d in range(2, min(dim, most) + 1, 2 if nbits == 4 else 1)
                                          if dim % d == 0))
        if dim % m or (nbits == 4 and m % 2):
            raise ValueError(f"ivfpq: pq_m={m} must divide the descriptor dimension {dim}"
                             + (" and be even (4-bit fast-scan)" if nbits == 4 else ""))
        make = faiss.IndexIVFPQFastScan if nbits == 4 else faiss.IndexIVFPQ
        index = make(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        rerank = int(params["rerank"]) if params.get("rerank") is not None else DEFAULT_RERANK
        if not 0 <= rerank <= MAX_K:
            raise ValueError(f"rerank={rerank}: must be between 0 and {MAX_K}")
        return index, {"nlist": nlist, "pq_m": m, "nbits": nbits, "nprobe": int(params.get("nprobe") or min(nlist, 16)),
                       "rerank": rerank}
    raise ValueError(f"unknown FAISS index kind {kind!r}")


#: Exhaustive-search storage of the ``flat`` kind: FAISS codes per descriptor.
STORAGE = {"float32": "Flat", "float16": "SQfp16", "int8": "SQ8"}


def _compact_flat(dim: int, n: int, params: dict):
    """Exact search over compact descriptors: optional PCA-whitening to ``pca_dim`` learned on the database (then
    L2-normalised again), stored as float32, float16 or int8 (per-dimension ranges learned on the database). FAISS
    applies the same transform to every query (IndexPreTransform), so queries need nothing else."""
    import faiss

    storage, pca = params.get("storage", "float32"), params.get("pca_dim")
    if storage not in STORAGE:
        raise ValueError(f"storage {storage!r} is not one of {', '.join(STORAGE)}")
    if pca is not None and not 1 <= int(pca) < dim:
        raise ValueError(f"--dim {pca}: must be between 1 and the descriptor dimension {dim} - 1")
    if pca is not None and n <= int(pca):
        raise ValueError(f"--dim {pca}: PCA-whitening needs more database images than dimensions (have {n})")
    if pca is None and storage == "float32":
        return faiss.IndexFlatIP(dim), {}
    spec = ",".join([*([f"PCAW{int(pca)}", "L2norm"] if pca is not None else []), STORAGE[storage]])
    used = {"storage": storage, **({"pca_dim": int(pca), "whitening": True} if pca is not None else {}),
            "bytes_per_vector": int(pca or dim) * {"float32": 4, "float16": 2, "int8": 1}[storage]}
    return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT), used


def pca_whitening(db: np.ndarray, dim: int):
    """PCA-whitening to ``dim`` fitted on ``db`` [N, D], then L2 normalisation: the transform ``index build --dim``
    puts before a flat index (FAISS's PCAW) -> a function [M, D] -> [M, dim]."""
    import faiss

    pca = faiss.PCAMatrix(db.shape[1], int(dim), -0.5)
    pca.train(np.ascontiguousarray(db, np.float32))

    def apply(x: np.ndarray) -> np.ndarray:
        y = pca.apply(np.ascontiguousarray(x, np.float32))
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)

    return apply


def training_sample(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """At most MAX_TRAIN rows of ``x`` [N, D], drawn uniformly (seeded)."""
    if len(x) <= MAX_TRAIN:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), MAX_TRAIN, replace=False))]


def _configure(index, kind: str, params: dict) -> None:
    import faiss

    if kind == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])
    elif kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


def faiss_search(index, vectors: np.ndarray | None, depth: int, desc: np.ndarray, k: int, n: int | None = None,
                 params=None) -> tuple[np.ndarray, np.ndarray]:
    """Search a FAISS index for queries [Q, D] -> (scores [Q, k], ids [Q, k]); with ``depth`` > 0 and the float16
    ``vectors`` [N, D], the top max(depth, k) candidates (at most ``n``, the searchable count) are re-ranked
    exactly."""
    if depth <= 0 or vectors is None:
        return index.search(desc, k, params=params)
    _, cand = index.search(desc, min(max(depth, k), n or index.ntotal), params=params)
    return rerank(vectors, desc, cand, k)


def rerank(vectors: np.ndarray, desc: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking: candidates [Q, R] (-1 pads) of queries [Q, D] scored against ``vectors`` [N, D] (float16,
    memory-mapped: only the candidates' rows are read) -> (scores [Q, k], ids [Q, k]), best first."""
    scores = np.full(cand.shape, -np.inf, np.float32)
    for q in range(len(desc)):
        ok = cand[q] >= 0
        rows = np.sort(cand[q][ok])  # ascending ids: sequential reads of the memory map
        s = np.asarray(vectors[rows], np.float32) @ desc[q]
        scores[q, ok] = s[np.searchsorted(rows, cand[q][ok])]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, 1)
    return top, np.where(np.isfinite(top), np.take_along_axis(cand, order, 1), -1)



class FaissBackend(Backend):
    """A FAISS index (``index.faiss``) and, for IVF-PQ with re-ranking, its float16 vectors."""

    def __init__(self, kind: str, index, params: dict, con: sqlite3.Connection, dim: int,
                 vectors: np.ndarray | None = None) -> None:
        self.kind, self.index, self.params, self.con, self.dim, self.vectors = kind, index, dict(params), con, dim, \
            vectors
        self.where = FAISS_FILE
        self.can_rerank = vectors is not None
        self.configure(self.params)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def configure(self, params: dict) -> None:
        self.params.update(params)
        _configure(self.index, self.kind, self.params)

    def add(self, desc: np.ndarray) -> None:
        self.index.add(pack_bits(desc) if self.kind == "binary" and desc.dtype != np.uint8 else desc)

    def save(self, root: Path, con: sqlite3.Connection) -> tuple[str, ...]:
        import faiss

        write = faiss.write_index_binary if self.kind == "binary" else faiss.write_index
        atomic_write(root / FAISS_FILE, lambda tmp: write(self.index, tmp))
        if self.kind != "ivfpq":
            return (FAISS_FILE,)
        n = self.ntotal

        def save(tmp: str) -> None:  # every descriptor as float16, written in chunks (no full float32 copy)
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, self.dim))
            for i, (blob,) in enumerate(con.execute("SELECT descriptor FROM images ORDER BY id")):
                out[i] = np.frombuffer(blob, np.float32)
            out.flush()
            del out

        atomic_write(root / VECTORS_FILE, save)
        return FAISS_FILE, VECTORS_FILE

    def search(self, desc, k, ids=None, geo=None):
        """FAISS's id selectors restrict the search (exact within the selection for flat, binary and IVF-PQ); HNSW's
        graph walk cannot reach a small selection reliably, so there the selected rows are scored exactly from their
        stored descriptors."""
        import faiss

        params = None
        if ids is not None:
            if self.kind == "hnsw":
                sel = _stored_rows(self.con, ids, self.dim)
                s = desc @ sel.T
                top = np.argsort(-s, axis=1, kind="stable")[:, :k]
                return np.take_along_axis(s, top, 1), ids[top]
            sel = faiss.IDSelectorBatch(ids)
            params = (faiss.SearchParametersIVF(sel=sel, nprobe=int(self.params["nprobe"]))
                      if self.kind == "ivfpq" else faiss.SearchParameters(sel=sel))
        if self.kind == "binary":
            hamming, found = self.index.search(pack_bits(desc), k, params=params)
            return 1.0 - 2.0 * hamming / desc.shape[1], found
        depth = int(self.params.get("rerank", 0)) if self.vectors is not None else 0
        return faiss_search(self.index, self.vectors, depth, desc, k, self.ntotal if ids is None else len(ids), params)


def create(root: Path, kind: str, dim: int, desc: np.ndarray, params: dict, con: sqlite3.Connection):
    """Train (IVF-PQ, PCA) and fill a new FAISS index of ``kind`` with ``desc`` [N, D] -> (backend, settings)."""
    index, used = _make_faiss(kind, dim, len(desc), params)
    if not index.is_trained:
        index.train(training_sample(desc))
    index.add(desc)
    return FaissBackend(kind, index, used, con, dim), used  # its float16 copy is written at save


def load(root: Path, manifest: dict, con: sqlite3.Connection, mmap: bool = True) -> FaissBackend:
    import faiss

    kind, dim = manifest["kind"], manifest["dim"]
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = _read_faiss(root / FAISS_FILE, kind, flags)
    except RuntimeError as e:
        raise ValueError(f"{root / FAISS_FILE}: not a readable FAISS index ({str(e).splitlines()[0]})") from None
    vectors = None
    if VECTORS_FILE in manifest["files"]:
        vectors = np.load(root / VECTORS_FILE, mmap_mode="r", allow_pickle=False)  # read rows only as needed
        if vectors.shape != (int(index.ntotal), dim):
            raise ValueError(f"{root / VECTORS_FILE}: shape {vectors.shape}, expected ({int(index.ntotal)}, {dim})")
    return FaissBackend(kind, index, manifest["params"], con, dim, vectors)


def discard(root: Path, params: dict) -> None:
    for name in (FAISS_FILE, VECTORS_FILE):
        (root / name).unlink(missing_ok=True)
