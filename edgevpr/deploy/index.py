"""A place index: descriptors of geotagged database images in FAISS, their metadata in SQLite.

Folder layout::

    INDEX/places.sqlite   images(id, path, place_id, lat, lon, east, north, descriptor), failed(path, reason),
                          meta(key, value): the model and knobs that made the descriptors
    INDEX/index.faiss     flat (exact), IVF-PQ or HNSW over inner products of L2-normalised descriptors
                          (= cosine similarity); FAISS id == images.id (ids are 0..N-1 in insertion order);
                          or ``binary``: the sign bits of each descriptor (bit = value > 0, 8 per byte, most
                          significant first: TeTRA's hub format), searched exhaustively by Hamming distance, with
                          score 1 - 2 h / D; its SQLite rows then hold the D/8 packed bytes, not the floats
    INDEX/manifest.json   model name, fingerprint and knobs, descriptor dim, metric, kind and its settings,
                          counts and sha256 checksums of both files; written last, atomically
    INDEX/.verified.json  stat stamps of the files as they were when last fully checksummed (see below)

Integrity: ``PlaceIndex.open`` checks both files against the manifest before the first answer. A full sha256
read costs about a second per GB here, too much for every open of a multi-GB memory-mapped index, so a file is
fully checksummed only when its stat stamp (device, inode, size, mtime, ctime) differs from the one recorded
after its last full check (``edgevpr.integrity.StampCache``); ctime moves on every write and every ``utime``,
so any change made through the file system since then forces the full check. ``verify=True`` (``edgevpr index
info --verify``) always reads every byte, which also catches silent media corruption.

Resuming: descriptors go into SQLite one batch per transaction, so a killed build or add keeps every finished
batch; running the same command again skips the images already stored (or recorded as failed), in the same
order, then (re)writes the FAISS file and the manifest. Rows past the FAISS file's count are what an
interrupted ``add`` left: the next ``add`` appends them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.images import ImageLoadError, list_images
from ..integrity import StampCache, check_finite, sha256_file
from ..utils import atomic_write, parse_time, write_json
from .decision import Coordinates
from .embed import embed, image_batches

DB_FILE, FAISS_FILE, MANIFEST_FILE = "places.sqlite", "index.faiss", "manifest.json"
#: IVF-PQ's exact re-ranking: every descriptor as float16 in id order, a plain .npy memory-mapped at search.
VECTORS_FILE = "vectors.f16.npy"
#: IVF-PQ: candidates re-ranked exactly by default (``--rerank``; 0 turns re-ranking off).
DEFAULT_RERANK = 64
KINDS = ("flat", "ivfpq", "hnsw", "binary", "qdrant")
FORMAT_VERSION = 1
#: IVF-PQ: PQ codebooks have 256 centroids per sub-quantiser; FAISS needs at least that many training vectors.
MIN_IVFPQ_TRAIN = 256
#: IVF-PQ default inverted lists: 4 sqrt(N), at most N / 39 (FAISS's points-per-centroid floor) and 1024 (k-means
#: over more lists of 1280-D vectors takes many minutes on a 2-core CPU; pass --nlist for more).
MAX_NLIST = 1024
#: IVF-PQ trains on at most this many vectors (a uniform sample, seeded).
MAX_TRAIN = 65536
#: The most matches one query may ask for.
MAX_K = 1000
#: manifest fields a writer that changes the rows carries over (``add``, ``remove``)
KEPT_BY_WRITERS = ("calibration", "sequence_calibration", "tuned")


@dataclass
class Row:
    """One database image: path, optional place id, optional coordinates (lat/lon and/or UTM metres), its session
    (the visit it was captured in; default: the name of its folder) and capture time (Unix seconds, optional)."""

    path: str
    place_id: str | None = None
    lat: float | None = None
    lon: float | None = None
    east: float | None = None
    north: float | None = None
    session: str | None = None
    time: float | None = None

    def __post_init__(self) -> None:
        if self.session is None:
            self.session = Path(self.path).parent.name


#: columns of the images table, in order (``session`` and ``time`` were added in edgevpr 0.x: tables made before
#: gain them when opened for writing; readers check ``_columns``)
IMAGE_COLUMNS = ("id", "path", "place_id", "lat", "lon", "east", "north", "descriptor", "session", "time")
_INSERT_IMAGE = f"INSERT INTO images ({', '.join(IMAGE_COLUMNS)}) VALUES ({', '.join('?' * len(IMAGE_COLUMNS))})"


def _columns(con: sqlite3.Connection) -> set[str]:
    return {r[1] for r in con.execute("PRAGMA table_info(images)")}


def _sessions_of(con: sqlite3.Connection, count: int | None = None) -> list[str]:
    """Each row's session in id order (rows of indexes made before sessions, or without one: their folder's
    name, as ``Row`` defaults it)."""
    col = "session" if "session" in _columns(con) else "NULL"
    where = "" if count is None else f" WHERE id < {int(count)}"
    return [s if s is not None else Path(p).parent.name
            for s, p in con.execute(f"SELECT {col}, path FROM images{where} ORDER BY id")]


@dataclass
class Match:
    rank: int
    id: int
    score: float
    path: str
    place_id: str | None
    lat: float | None
    lon: float | None
    east: float | None
    north: float | None


def read_rows(source: str | os.PathLike) -> list[Row]:
    """Images of a folder (coordinates from '@utm_east@utm_north@' names when present) or a CSV manifest with
    ``path`` and optional ``place_id``, ``lat``/``lon``, ``utm_east``/``utm_north`` (lat/lon also get UTM),
    ``session`` and ``time`` (ISO 8601 or Unix seconds)."""
    from ..data.datasets import latlon_to_utm, parse_utm_name

    src = Path(source)
    if src.is_dir():
        rows = []
        for p in list_images(src):
            try:
                east, north = parse_utm_name(p)
                rows.append(Row(os.path.abspath(p), east=east, north=north))
            except ValueError:
                rows.append(Row(os.path.abspath(p)))
        if not rows:
            raise ValueError(f"{src}: no images in this folder")
        return rows
    if src.suffix.lower() != ".csv" or not src.is_file():
        raise FileNotFoundError(f"{src}: give an image folder or a CSV manifest")
    with open(src, newline="") as f:
        table = list(csv.DictReader(f))
    if not table or "path" not in table[0]:
        raise ValueError(f"{src}: a manifest needs a 'path' column and at least one row")

    def num(r: dict, col: str, line: int) -> float | None:
        v = (r.get(col) or "").strip()
        if not v:
            return None
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{src}: line {line}: column '{col}' is not a number ({v!r})") from None

    def when(r: dict, line: int) -> float | None:
        v = (r.get("time") or "").strip()
        return parse_time(v, f"{src}: line {line}: column 'time'") if v else None

    rows = []
    for line, r in enumerate(table, start=2):
        p = Path(r["path"])
        p = p if p.is_absolute() else src.parent / p
        row = Row(os.path.abspath(p), (r.get("place_id") or None), num(r, "lat", line), num(r, "lon", line),
                  num(r, "utm_east", line), num(r, "utm_north", line), (r.get("session") or "").strip() or None,
                  when(r, line))
        if row.lat is not None and row.lon is not None and (abs(row.lat) > 84 or abs(row.lon) > 180):
            raise ValueError(f"{src}: line {line}: lat/lon out of range ({row.lat}, {row.lon})")
        rows.append(row)
    geo = [i for i, row in enumerate(rows) if row.lat is not None and row.lon is not None and row.east is None]
    if geo:  # one UTM zone for the whole manifest (that of its first lat/lon row), as read_manifest does
        utm_xy = latlon_to_utm(np.array([rows[i].lat for i in geo]), np.array([rows[i].lon for i in geo]), str(src))
        for i, (east, north) in zip(geo, utm_xy.tolist(), strict=True):
            rows[i].east, rows[i].north = east, north
    return rows


def _connect(path: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(path)
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript("""
            CREATE TABLE IF NOT EXISTS images (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, place_id TEXT,
                lat REAL, lon REAL, east REAL, north REAL, descriptor BLOB NOT NULL, session TEXT, time REAL);
            CREATE TABLE IF NOT EXISTS failed (path TEXT PRIMARY KEY, reason TEXT NOT NULL, size INTEGER,
                mtime_ns INTEGER);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """)
        cols = {r[1] for r in con.execute("PRAGMA table_info(failed)")}
        for col in ("size", "mtime_ns"):  # indexes made before failed images were retried on change
            if col not in cols:
                con.execute(f"ALTER TABLE failed ADD COLUMN {col} INTEGER")
        cols = _columns(con)
        for col, sql in (("session", "TEXT"), ("time", "REAL")):  # indexes made before sessions
            if col not in cols:
                con.execute(f"ALTER TABLE images ADD COLUMN {col} {sql}")
    except sqlite3.Error as e:
        raise ValueError(f"{path}: not a usable SQLite database ({e})") from None
    return con


def _file_signature(path: str) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of an image file, (None, None) when it cannot be read."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None, None


def read_manifest(root: Path) -> dict:
    """The manifest of an index folder, checked for the fields edgevpr reads (one-line errors)."""
    man_file = root / MANIFEST_FILE
    if not man_file.is_file():
        hint = " (an interrupted build: run the same `edgevpr index build` again)" if (root / DB_FILE).exists() \
            else ""
        raise FileNotFoundError(f"{root}: not a finished place index, no {MANIFEST_FILE}{hint}")
    try:
        manifest = json.loads(man_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{man_file}: not valid JSON ({e})") from None
    need = {"model": dict, "dim": int, "kind": str, "params": dict, "count": int, "files": dict}
    for key, typ in need.items():
        if not isinstance(manifest, dict) or not isinstance(manifest.get(key), typ):
            raise ValueError(f"{man_file}: field '{key}' is missing or not a {typ.__name__}")
    for name in (DB_FILE,) if manifest["kind"] == "qdrant" else (FAISS_FILE, DB_FILE):
        meta = manifest["files"].get(name)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or \
                not isinstance(meta.get("bytes"), int):
            raise ValueError(f"{man_file}: files.{name} needs 'bytes' and 'sha256'")
    if not isinstance(manifest["model"].get("fingerprint"), str):
        raise ValueError(f"{man_file}: field 'model.fingerprint' is missing")
    return manifest


def check_files(root: Path, manifest: dict, full: bool = False,
                names: tuple[str, ...] | None = None) -> list[str]:
    """Problems (one line each) of the index files (default: every file the manifest lists) against the manifest:
    presence, size, sha256.

    full=False skips the sha256 of a file whose stat stamp shows it unchanged since its last full check.
    """
    stamps, problems, checked = StampCache(root), [], False
    for name in names or tuple(manifest["files"]):
        meta, f = manifest["files"][name], root / name
        if not f.is_file():
            problems.append(f"{f}: missing from the index folder")
        elif f.stat().st_size != meta["bytes"]:
            hint = "; or an interrupted `index add`: run it again to finish" if name == DB_FILE else ""
            problems.append(f"{f}: {f.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated or "
                            f"replaced{hint})")
        elif full or not stamps.fresh(f, meta["sha256"]):
            if sha256_file(f) != meta["sha256"]:
                hint = " or an interrupted `index add`: run it again to finish" if name == DB_FILE else ""
                problems.append(f"{f}: checksum differs from {MANIFEST_FILE} (file changed or corrupt{hint})")
            else:
                stamps.record(f, meta["sha256"])
                checked = True
    if checked:
        stamps.save()
    return problems


def verify_index(root: str | os.PathLike) -> dict:
    """Full check of an index folder -> {"verified": bool, "problems": [one line each]}; never raises."""
    root = Path(root)
    try:
        manifest = read_manifest(root)
        problems = check_files(root, manifest, full=True)
        if not problems:
            PlaceIndex.open(root, verify=True).close()  # the files parse, their counts agree, a search structure
            # derived from the rows (Qdrant) holds exactly them
    except (OSError, ValueError, RuntimeError) as e:
        problems = [str(e).splitlines()[0]]
    return {"verified": not problems, "problems": problems}


LOCK_FILE = ".lock"


def _exclusive(arg: str, create: bool = False):
    """Decorator for the writers: an exclusive lock on the index folder named by argument ``arg`` while it runs (a
    second writer is refused in one line instead of colliding on SQLite rows), and SQLite failures (disk full, a
    damaged database) as one line naming the file; finished batches stay, so the same command resumes."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            import fcntl

            root = Path(inspect.signature(fn).bind(*args, **kwargs).arguments[arg])
            if create:
                root.mkdir(parents=True, exist_ok=True)
            elif not root.is_dir():
                raise FileNotFoundError(f"{root}: no such index folder")
            with open(root / LOCK_FILE, "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ValueError(f"{root}: another edgevpr process is writing to this index; wait for it to "
                                     "finish (or stop it), then run the command again") from None
                try:
                    return fn(*args, **kwargs)
                except sqlite3.Error as e:
                    raise ValueError(f"{root / DB_FILE}: {str(e).splitlines()[0]} (free disk space or restore the "
                                     "file; finished batches are kept: run the same command again)") from None
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

        return run

    return wrap


def model_record(model, spec: str | None, knobs: dict | None) -> dict:
    """What an index remembers of the model that made its descriptors."""
    return {"name": model.name, "fingerprint": model.fingerprint(), "spec": spec, "knobs": dict(knobs or {}),
            "image_size": list(model.image_size), "dim": int(model.out_dim),
            "runtime": "onnxruntime" if hasattr(model, "session") else "torch"}


def check_model(record: dict, name: str, fingerprint: str, where: str) -> None:
    """Refuse a model whose fingerprint differs from the one recorded in an index (one-line error)."""
    if fingerprint != record["fingerprint"]:
        raise ValueError(f"{where}: built by model {record['name']} (fingerprint {record['fingerprint']}); "
                         f"model {name} has fingerprint {fingerprint}: its descriptors are not comparable "
                         "(use the index's model or build a new index)")


def pack_bits(desc: np.ndarray) -> np.ndarray:
    """descriptors [N, D] -> sign bits packed [N, D/8] uint8 (bit = value > 0, most significant bit first)."""
    return np.packbits(np.asarray(desc) > 0, axis=1)


def storage_of(kind: str) -> str:
    return "bits" if kind == "binary" else "float32"


def _read_faiss(path: Path, kind: str, flags: int = 0):
    import faiss

    return faiss.read_index_binary(str(path)) if kind == "binary" else faiss.read_index(str(path), flags)


def _open_search(root: Path, manifest: dict, flags: int = 0):
    """The search structure of a finished index: its FAISS file, or its Qdrant collection."""
    if manifest["kind"] == "qdrant":
        from .qdrant_store import open_store

        return open_store(root, manifest["params"], manifest["dim"])
    return _read_faiss(root / FAISS_FILE, manifest["kind"], flags)


def _index_all(root: Path, kind: str, dim: int, desc: np.ndarray, params: dict):
    """A new search structure of ``kind`` over ``desc`` [N, D] -> (it, the settings used). A Qdrant collection
    is filled from the SQLite rows by ``_write`` instead."""
    if kind == "qdrant":
        from .qdrant_store import EDGE_DIR, open_store

        used = {"url": params.get("url"), "collection": params.get("collection") or f"edgevpr-{root.resolve().name}",
                **{k: int(params[k]) for k in ("shard_number", "replication_factor") if params.get(k)}}
        if not used["url"]:
            used["engine"], used["edge_path"] = "qdrant-edge", EDGE_DIR
        store = open_store(root, used, dim, create=True)
        if store.ntotal > len(desc):
            raise ValueError(f"{store.where} already holds {store.ntotal} points, more than this index's images: "
                             "choose another --collection (or --out)")
        return store, used
    index, used = _make_faiss(kind, dim, len(desc), params)
    if not index.is_trained:
        index.train(training_sample(desc))
    index.add(desc)
    return index, used


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
    raise ValueError(f"unknown index kind {kind!r} (choose from {', '.join(KINDS)})")


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


class PlaceIndex:
    """An index folder opened for search (``open``) or built and extended (``build``, ``add``)."""

    def __init__(self, root: Path, manifest: dict, index, con: sqlite3.Connection) -> None:
        self.root, self.manifest, self.index, self.con = root, manifest, index, con
        self.vectors: np.ndarray | None = None  # [N, D] float16 for IVF-PQ re-ranking (memory-mapped)
        self._n = int(index.ntotal)  # counted once: a Qdrant count is a request

    # ----------------------------------------------------------------------------------------- open / info
    @classmethod
    def open(cls, root: str | os.PathLike, mmap: bool = True, verify: bool = False) -> PlaceIndex:
        """Open a finished index; ``mmap`` maps the FAISS file instead of reading it; ``verify`` checks sha256."""
        import faiss

        root = Path(root)
        manifest = read_manifest(root)
        problems = check_files(root, manifest, full=verify)
        if problems:
            raise ValueError(problems[0])
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = _open_search(root, manifest, flags)
        except RuntimeError as e:
            raise ValueError(f"{root / FAISS_FILE}: not a readable FAISS index ({str(e).splitlines()[0]})") from None
        _configure(index, manifest["kind"], manifest["params"])
        try:
            con = sqlite3.connect(f"file:{root / DB_FILE}?mode=ro", uri=True, check_same_thread=False)
            n = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.Error as e:
            raise ValueError(f"{root / DB_FILE}: not a readable SQLite database ({e})") from None
        if n != (total := index.ntotal):
            where = index.where if manifest["kind"] == "qdrant" else FAISS_FILE
            raise ValueError(f"{root}: {n} images in {DB_FILE} but {total} in {where} (an interrupted "
                             "`index add`: run it again to finish)")
        if manifest["kind"] == "qdrant" and (problems := index.check(con, full=verify)):
            raise ValueError(problems[0])
        out = cls(root, manifest, index, con)
        if VECTORS_FILE in manifest["files"]:
            out.vectors = np.load(root / VECTORS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
            if out.vectors.shape != (n, manifest["dim"]):
                raise ValueError(f"{root / VECTORS_FILE}: shape {out.vectors.shape}, expected ({n}, {manifest['dim']})")
        return out

    def close(self) -> None:
        self.con.close()
        if self.manifest["kind"] == "qdrant":
            self.index.close()

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def __len__(self) -> int:
        return self._n

    def search(self, desc: np.ndarray, k: int = 5, ids: np.ndarray | None = None) -> list[list[Match]]:
        """descriptors [Q, D] float32 (L2-normalised) -> per query its top-k matches (score = cosine); ``ids``
        (e.g. the images within a GNSS prior, ``GeoPrior.ids``) restricts the search to those database images."""
        return self.matches(*self.search_ids(desc, k, ids))

    def matches(self, scores: np.ndarray, found: np.ndarray) -> list[list[Match]]:
        """(scores [Q, k], ids [Q, k]; -1 pads) -> per query its Matches with their rows."""
        rows = self.rows(sorted({int(i) for i in found.ravel() if i >= 0}))
        return [[Match(r + 1, int(i), float(s), *rows[int(i)]) for r, (s, i) in enumerate(zip(sq, iq, strict=True))
                 if i >= 0] for sq, iq in zip(scores, found, strict=True)]

    def search_ids(self, desc: np.ndarray, k: int, ids: np.ndarray | None = None,
                   geo: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """descriptors [Q, D] -> (scores [Q, k'], ids [Q, k']), k' = min(k, candidates), best first; -1 pads.

        A restricted search uses FAISS's id selectors (exact within the selection for flat, binary and IVF-PQ);
        HNSW's graph walk cannot reach a small selection reliably, so there the selected images are scored
        exactly from their stored descriptors. A Qdrant index applies ``geo`` = (lat, lon, radius_m), the prior
        behind ``ids``, as its native geo-radius filter (other backends use ``ids``)."""
        import faiss

        desc = np.ascontiguousarray(desc, dtype=np.float32)
        if desc.ndim != 2 or desc.shape[1] != self.manifest["dim"]:
            raise ValueError(f"descriptors of shape {tuple(desc.shape)}; this index holds {self.manifest['dim']}-D")
        if not np.isfinite(desc).all():
            raise ValueError("a query descriptor holds NaN/Inf: the model's weights are probably damaged")
        if len(self) == 0:
            raise ValueError(f"{self.root}: the index holds no images")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k={k}: must be between 1 and {MAX_K}")
        kind, params = self.manifest["kind"], None
        if kind == "qdrant":
            n = len(self) if ids is None else len(ids)
            if n == 0:
                return np.zeros((len(desc), 0), np.float32), np.zeros((len(desc), 0), np.int64)
            return self.index.search(desc, min(k, n), None if geo is not None else ids, geo)
        if ids is not None:
            ids = np.unique(np.asarray(ids, np.int64))
            if len(ids) == 0:
                return np.zeros((len(desc), 0), np.float32), np.zeros((len(desc), 0), np.int64)
            if kind == "hnsw":
                sel = _stored_rows(self.con, ids, self.manifest["dim"])
                s = desc @ sel.T
                top = np.argsort(-s, axis=1, kind="stable")[:, :k]
                return np.take_along_axis(s, top, 1), ids[top]
            sel = faiss.IDSelectorBatch(ids)
            params = (faiss.SearchParametersIVF(sel=sel, nprobe=int(self.manifest["params"]["nprobe"]))
                      if kind == "ivfpq" else faiss.SearchParameters(sel=sel))
        k = min(k, len(self) if ids is None else len(ids))
        if kind == "binary":
            hamming, found = self.index.search(pack_bits(desc), k, params=params)
            return 1.0 - 2.0 * hamming / desc.shape[1], found
        depth = int(self.manifest["params"].get("rerank", 0)) if self.vectors is not None else 0
        return faiss_search(self.index, self.vectors, depth, desc, k, len(self) if ids is None else len(ids), params)

    def similarities(self, desc: np.ndarray, depth: int = MAX_K) -> np.ndarray:
        """descriptors [Q, D] -> similarity to every database image [Q, N] (for sequence matching): the top
        ``depth`` scores of each query as the index computes them, every other image at that query's lowest
        retrieved score (a floor: they are not among its best ``depth``)."""
        scores, found = self.search_ids(desc, min(depth, len(self)))
        out = np.repeat(np.where(found >= 0, scores, np.inf).min(1, keepdims=True), len(self), 1).astype(np.float32)
        for q in range(len(desc)):
            ok = found[q] >= 0
            out[q, found[q][ok]] = scores[q][ok]
        return out

    def coordinates(self) -> Coordinates:
        """Every image's coordinates in id order (NaN where missing), read once and kept."""
        if getattr(self, "_coords", None) is None:
            a = np.array(self.con.execute("SELECT lat, lon, east, north FROM images ORDER BY id").fetchall(),
                         dtype=np.float64).reshape(-1, 4)
            self._coords = Coordinates(*(a[:, i] for i in range(4)))
        return self._coords

    def segments(self) -> np.ndarray:
        """Database route segments [N] int (for sequence matching): a new segment starts where the image folder
        changes (another traversal) or where consecutive images are far apart (> max(50 m, 10x the median step)),
        e.g. a route indexed as several drives or a loop; database order is assumed to be capture order."""
        paths = [r[0] for r in self.con.execute("SELECT path FROM images ORDER BY id")]
        parents = [Path(p).parent for p in paths]
        cut = np.array([False] + [a != b for a, b in zip(parents[:-1], parents[1:], strict=True)])
        step = self.coordinates().steps()
        if np.isfinite(step).any():
            cut[1:] |= np.nan_to_num(step, nan=0.0) > max(50.0, 10 * float(np.nanmedian(step)))
        return np.cumsum(cut)

    def sessions(self) -> list[dict]:
        """Per session (visit), in order of first appearance: its name, images, images with coordinates, capture
        time span (Unix seconds; None without times) and route length in metres (None without coordinates)."""
        names = _sessions_of(self.con)
        times = [r[0] for r in self.con.execute("SELECT time FROM images ORDER BY id")] \
            if "time" in _columns(self.con) else [None] * len(names)
        coords = self.coordinates()
        out: dict[str, dict] = {}
        for i, (name, t) in enumerate(zip(names, times, strict=True)):
            s = out.setdefault(name, {"session": name, "images": 0, "with_coordinates": 0, "ids": []})
            s["images"] += 1
            s["ids"].append(i)
            s["with_coordinates"] += bool(np.isfinite(coords.east[i]) or np.isfinite(coords.lat[i]))
            if t is not None:
                s["first_time"], s["last_time"] = min(s.get("first_time", t), t), max(s.get("last_time", t), t)
        for s in out.values():
            ids = np.array(s.pop("ids"))
            steps = Coordinates(*(getattr(coords, a)[ids] for a in ("lat", "lon", "east", "north"))).steps()
            s["route_m"] = float(np.nansum(steps)) if np.isfinite(steps).any() else None
            s.setdefault("first_time", None)
            s.setdefault("last_time", None)
        return list(out.values())

    def session_ids(self, names: list[str]) -> np.ndarray:
        """Ids [M] int64 of the images of the named sessions; ValueError naming a session the index lacks."""
        have = _sessions_of(self.con)
        known = set(have)
        for n in names:
            if n not in known:
                raise ValueError(f"{self.root}: no session {n!r} (it has {', '.join(sorted(known))})")
        want = set(names)
        return np.array([i for i, h in enumerate(have) if h in want], np.int64)

    def rows(self, ids: list[int]) -> dict[int, tuple]:
        """id -> (path, place_id, lat, lon, east, north)."""
        out = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            marks = ",".join("?" * len(part))
            q = f"SELECT id, path, place_id, lat, lon, east, north FROM images WHERE id IN ({marks})"
            out.update({r[0]: r[1:] for r in self.con.execute(q, part)})
        return out

    def positions(self, limit: int = 5000) -> dict:
        """Up to ``limit`` evenly spaced database positions for a map: {ids, east, north} or {ids} alone, and each
        one's session as an index into ``sessions`` (names, in order of first appearance)."""
        n = len(self)
        step = max(1, math.ceil(n / limit))
        rows = self.con.execute("SELECT id, east, north FROM images WHERE id % ? = 0 ORDER BY id", (step,)).fetchall()
        has = bool(rows) and all(r[1] is not None for r in rows)
        of, names = _sessions_of(self.con), {}
        which = [names.setdefault(of[r[0]], len(names)) for r in rows]
        out = {"count": n, "ids": [r[0] for r in rows], "has_coordinates": has, "sessions": list(names),
               "session": which}
        if has:
            out["east"] = [r[1] for r in rows]
            out["north"] = [r[2] for r in rows]
        return out

    def descriptors(self) -> np.ndarray:
        """All stored descriptors in id order: [N, D] float32, or [N, D/8] uint8 sign bits for a binary index."""
        return _stored_descriptors(self.con, self.manifest["dim"], 0, storage_of(self.manifest["kind"]))


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


def rows_digest(con: sqlite3.Connection, count: int) -> str:
    """sha256 over the rows with id < ``count`` (every column, descriptor bytes included), in id order: what a
    finished index holds, independent of rows an interrupted ``add`` appended after them."""
    h = hashlib.sha256()
    extra = ", session, time" if "session" in _columns(con) else ""
    q = f"SELECT id, path, place_id, lat, lon, east, north, descriptor{extra} FROM images WHERE id < ? ORDER BY id"
    for r in con.execute(q, (count,)):
        # session and time join the digest where set (rows of indexes made before sessions digest as they did)
        h.update(json.dumps(list(r[:7]) + ([r[8], r[9]] if extra and (r[8] is not None or r[9] is not None)
                                           else [])).encode())
        h.update(r[7])
    return h.hexdigest()


def check_descriptors(desc: np.ndarray, where: str, storage: str = "float32") -> None:
    """Refuse stored descriptors [N, D] that no model produced (non-finite, or not unit length: damaged bytes that
    would otherwise win every query with a score of 1e36) before a writer builds on them."""
    if storage == "bits" or len(desc) == 0:
        return
    norms = np.linalg.norm(desc, axis=1)
    bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-2)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} stored descriptor(s) are not unit-length finite vectors (first: "
                         f"row {int(np.argmax(bad))}, norm {norms[int(np.argmax(bad))]:.4g}): damaged {DB_FILE}; "
                         "rebuild the index")


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


def _stored_descriptors(con: sqlite3.Connection, dim: int, start: int = 0, storage: str = "float32") -> np.ndarray:
    """Descriptors with id >= start, in id order: [N, D] float32 or [N, D/8] uint8 bits (filled row by row)."""
    n = con.execute("SELECT COUNT(*) FROM images WHERE id >= ?", (start,)).fetchone()[0]
    out = np.empty((n, dim // 8), np.uint8) if storage == "bits" else np.empty((n, dim), np.float32)
    for i, (blob,) in enumerate(con.execute("SELECT descriptor FROM images WHERE id >= ? ORDER BY id", (start,))):
        out[i] = np.frombuffer(blob, dtype=out.dtype)
    return out


def _extract_into(con: sqlite3.Connection, model, rows: list[Row], knobs: dict, batch_size: int, skip_bad: bool,
                  progress: bool, desc: str, on_batch: Callable[[int], None] | None,
                  storage: str = "float32") -> dict:
    """Embed the rows not yet stored (or failed while unchanged) and insert them batch by batch -> counts.

    An image recorded as failed is tried again when its size or mtime changed (the user fixed the file).
    """
    retry = [p for p, size, mtime in con.execute("SELECT path, size, mtime_ns FROM failed")
             if _file_signature(p) != (size, mtime) or size is None]
    with con:
        con.executemany("DELETE FROM failed WHERE path = ?", [(p,) for p in retry])
    done = {p for (p,) in con.execute("SELECT path FROM images UNION SELECT path FROM failed")}
    todo = [r for r in rows if r.path not in done]
    seen: set[str] = set()
    todo = [r for r in todo if not (r.path in seen or seen.add(r.path))]  # a path listed twice is stored once
    batches = image_batches([Path(r.path) for r in todo], model.transform(), batch_size)
    next_id = con.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM images").fetchone()[0]
    added = failed = 0
    from tqdm.auto import tqdm  # lazily: 60 ms of a cold start that shows no bar

    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for xs, idx, bad in batches:  # idx, bad: positions in todo
        if bad and not skip_bad:
            j, err = bad[0]
            raise ImageLoadError(todo[j].path, err + " (use --skip-bad to skip and report such images)")
        d = embed(model, xs, knobs) if xs is not None else np.zeros((0, 0), np.float32)
        check_finite(d, [todo[j].path for j in idx], model.name)
        if storage == "bits" and len(d):
            d = pack_bits(d)
        with con:  # one transaction per batch: a kill keeps whole batches only
            for j, vec in zip(idx, d, strict=True):
                r = todo[j]
                con.execute(_INSERT_IMAGE, (next_id, r.path, r.place_id, r.lat, r.lon, r.east, r.north,
                                            np.ascontiguousarray(vec).tobytes(), r.session, r.time))
                next_id += 1
            con.executemany("INSERT INTO failed VALUES (?, ?, ?, ?)",
                            [(todo[j].path, err, *_file_signature(todo[j].path)) for j, err in bad])
        added += len(idx)
        failed += len(bad)
        bar.update(len(idx) + len(bad))
        if on_batch is not None:
            on_batch(added)
    bar.close()
    return {"requested": len(rows), "already_stored": len(rows) - len(todo), "added": added, "failed": failed}


def _write(root: Path, con: sqlite3.Connection, index, kind: str, params: dict, record: dict,
           created: str | None, keep: dict | None = None) -> dict:
    """Write the FAISS file and then the manifest (``keep``: fields carried over, e.g. a calibration)."""
    import faiss

    names = (FAISS_FILE, DB_FILE)
    if kind == "qdrant":
        index.sync(con)
        names = (DB_FILE,)
    else:
        write = faiss.write_index_binary if kind == "binary" else faiss.write_index
        atomic_write(root / FAISS_FILE, lambda tmp: write(index, tmp))
    if kind == "ivfpq":  # every descriptor as float16 for exact re-ranking, written in chunks (no full float32 copy)
        names += (VECTORS_FILE,)

        def save(tmp: str) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(int(index.ntotal), record["dim"]))
            for i, (blob,) in enumerate(con.execute("SELECT descriptor FROM images ORDER BY id")):
                out[i] = np.frombuffer(blob, np.float32)
            out.flush()
            del out

        atomic_write(root / VECTORS_FILE, save)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    n_failed = con.execute("SELECT COUNT(*) FROM failed").fetchone()[0]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stamps, files = StampCache(root), {}
    for name in names:
        files[name] = {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
        stamps.record(root / name, files[name]["sha256"])
    count = int(index.ntotal)
    if kind == "qdrant":
        index.close()
    manifest = {
        "format_version": FORMAT_VERSION, "model": record, "dim": record["dim"], "rows_sha256": rows_digest(con, count),
        "metric": "Hamming distance of sign bits (score 1 - 2 h / D)" if kind == "binary" else
        "inner product of L2-normalised descriptors (cosine similarity)", "kind": kind, "params": params,
        "count": count, "failed_images": n_failed, "created": created or now, "updated": now,
        "files": files, **(keep or {}),
    }
    write_json(root / MANIFEST_FILE, manifest)
    stamps.save()
    return manifest


def _open_for_writing(root: Path, record: dict, storage: str) -> sqlite3.Connection:
    con = _connect(root / DB_FILE)
    stored = dict(con.execute("SELECT key, value FROM meta"))
    if stored.get("storage", "float32") != storage and "model" in stored:
        raise ValueError(f"{root}: its database stores {stored.get('storage', 'float32')} descriptors, this build "
                         f"{storage}: resume with the same --kind or choose another --out")
    if "model" not in stored:
        with con:
            con.execute("INSERT INTO meta VALUES ('model', ?)", (json.dumps(record, sort_keys=True),))
            con.execute("INSERT INTO meta VALUES ('storage', ?)", (storage,))
        return con
    old = json.loads(stored["model"])
    check_model(old, record["name"], record["fingerprint"], str(root))
    if old["knobs"] != record["knobs"]:
        raise ValueError(f"{root}: descriptors were made with knobs {old['knobs']}, not {record['knobs']}")
    return con


@_exclusive("out", create=True)
def build(model, source: str | os.PathLike, out: str | os.PathLike, kind: str = "flat", spec: str | None = None,
          knobs: dict | None = None, batch_size: int = 32, skip_bad: bool = False, params: dict | None = None,
          progress: bool = True, on_batch: Callable[[int], None] | None = None,
          shard: tuple[int, int] | None = None) -> dict:
    """Build an index of ``source`` (folder or CSV) in ``out``; resumes an interrupted build -> summary.

    ``shard=(i, n)`` indexes only part i of n of the image list (contiguous parts, so that ``merge`` of parts
    0..n-1 in order equals one build of the whole list); the part is a complete index of its own, built and
    resumed like any other, and its manifest records which part it is.
    ``on_batch(n_added)`` is called after each stored batch (progress hooks; tests interrupt builds with it).
    """
    root = Path(out)
    if (root / MANIFEST_FILE).exists():
        raise FileExistsError(f"{root}: an index is already there; use `edgevpr index add` to extend it")
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r} (choose from {', '.join(KINDS)})")
    rows = read_rows(source)
    keep = {}
    if shard is not None:
        i, n = shard
        if not 0 <= i < n:
            raise ValueError(f"--shard {i}/{n}: need 0 <= i < n")
        listing = hashlib.sha256("\n".join(r.path for r in rows).encode()).hexdigest()
        keep["shard"] = {"i": i, "n": n, "source_images": len(rows), "source": str(source), "source_sha256": listing}
        rows = rows[i * len(rows) // n:(i + 1) * len(rows) // n]
    root.mkdir(parents=True, exist_ok=True)
    record = model_record(model, spec, knobs)
    storage = storage_of(kind)
    con = _open_for_writing(root, record, storage)
    t0 = time.perf_counter()
    counts = _extract_into(con, model, rows, record["knobs"], batch_size, skip_bad, progress, "index build", on_batch,
                           storage)
    t_extract = time.perf_counter() - t0
    desc = _stored_descriptors(con, record["dim"], 0, storage)
    if len(desc) == 0:
        con.close()
        raise ValueError(f"{source}: no image could be embedded ({counts['failed']} unreadable): nothing to index")
    t1 = time.perf_counter()
    index, used = _index_all(root, kind, record["dim"], desc, params or {})
    manifest = _write(root, con, index, kind, used, record, None, keep)
    con.close()
    return {**counts, "count": manifest["count"], "extract_s": t_extract, "index_s": time.perf_counter() - t1,
            "failed_paths": _failed(root)}


@_exclusive("out", create=True)
def merge(parts: list[str | os.PathLike], out: str | os.PathLike, kind: str = "flat",
          params: dict | None = None) -> dict:
    """Join index parts (``build --shard i/n``, or any indexes of one model) into one new index at ``out``.

    Every part is checked (files against its manifest; the same model fingerprint, knobs and descriptor storage);
    parts that record shards must be exactly 0..n-1 of one n, and are joined in shard order whatever order they
    are given in. Rows are copied with new ids (an image in two parts is refused), then the FAISS index of
    ``kind`` is built over all descriptors as ``build`` builds it. A killed merge starts over when run again."""
    root = Path(out)
    if (root / MANIFEST_FILE).exists():
        raise FileExistsError(f"{root}: an index is already there")
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r} (choose from {', '.join(KINDS)})")
    if not parts:
        raise ValueError("index merge: give the parts to join")
    loaded = []
    for p in map(Path, parts):
        man = read_manifest(p)
        problems = check_files(p, man)
        if problems:
            raise ValueError(problems[0])
        loaded.append((p, man))
    shards = [m.get("shard") for _, m in loaded]
    if any(shards):
        if not all(shards) or sorted(s["i"] for s in shards) != list(range(shards[0]["n"])) or \
                len({s["n"] for s in shards}) != 1:
            got = ", ".join(f"{p}: {m['shard']['i']}/{m['shard']['n']}" if m.get("shard") else f"{p}: not a shard"
                            for p, m in loaded)
            raise ValueError(f"index merge: the parts must be shards 0..n-1 of one n, exactly once each ({got})")
        first = shards[0]
        for (p, _), sh in zip(loaded, shards, strict=True):
            for key in ("source_images", "source_sha256"):
                if sh.get(key) != first.get(key):
                    raise ValueError(f"index merge: {p} was cut from another image list than {loaded[0][0]} "
                                     f"({key} {sh.get(key)} vs {first.get(key)}): build every shard from one list")
        loaded.sort(key=lambda pm: pm[1]["shard"]["i"])
    record, storage = loaded[0][1]["model"], storage_of(loaded[0][1]["kind"])
    for p, man in loaded[1:]:
        check_model(record, man["model"]["name"], man["model"]["fingerprint"], str(p))
        if man["model"]["knobs"] != record["knobs"] or storage_of(man["kind"]) != storage:
            raise ValueError(f"{p}: made with knobs {man['model']['knobs']} and {storage_of(man['kind'])} storage, "
                             f"the first part with {record['knobs']} and {storage}")
    if storage != storage_of(kind):
        raise ValueError(f"--kind {kind}: the parts store {storage} descriptors; merge them into a "
                         f"{'binary' if storage == 'bits' else 'flat, ivfpq or hnsw'} index")
    root.mkdir(parents=True, exist_ok=True)
    for name in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm", FAISS_FILE, VECTORS_FILE):
        (root / name).unlink(missing_ok=True)  # what a killed merge left
    con = _open_for_writing(root, record, storage)
    next_id = 0
    try:
        with con:
            for p, man in loaded:
                src = sqlite3.connect(f"file:{p / DB_FILE}?mode=ro", uri=True)
                try:
                    extra = ", session, time" if "session" in _columns(src) else ", NULL, NULL"
                    rows = src.execute(f"SELECT id, path, place_id, lat, lon, east, north, descriptor{extra} "
                                       "FROM images WHERE id < ? ORDER BY id", (man["count"],))
                    con.executemany(_INSERT_IMAGE, ((next_id + r[0], *r[1:]) for r in rows))
                    next_id += man["count"]
                    con.executemany("INSERT OR REPLACE INTO failed VALUES (?, ?, ?, ?)",
                                    src.execute("SELECT path, reason, size, mtime_ns FROM failed"))
                finally:
                    src.close()
    except sqlite3.IntegrityError as e:
        con.close()
        raise ValueError(f"index merge: an image is in more than one part ({e})") from None
    desc = _stored_descriptors(con, record["dim"], 0, storage)
    check_descriptors(desc, f"index merge into {root}", storage)
    index, used = _index_all(root, kind, record["dim"], desc, params or {})
    manifest = _write(root, con, index, kind, used, record, None,
                      {"merged_from": [{"path": str(p), "count": m["count"], **({"shard": m["shard"]}
                                        if m.get("shard") else {})} for p, m in loaded]})
    con.close()
    return {"count": manifest["count"], "parts": len(loaded), "failed": manifest["failed_images"]}


@_exclusive("root")
def add(model, source: str | os.PathLike, root: str | os.PathLike, batch_size: int = 32, skip_bad: bool = False,
        progress: bool = True, on_batch: Callable[[int], None] | None = None) -> dict:
    """Append the images of ``source`` not yet in the index at ``root`` (same model and knobs required)."""

    root = Path(root)
    if not (root / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{root}: no finished index to add to (build it first with `edgevpr index build`)")
    manifest = read_manifest(root)
    check_model(manifest["model"], model.name, model.fingerprint(), str(root))
    verify_for_writing(root, manifest)
    record = {**manifest["model"]}
    storage = storage_of(manifest["kind"])
    con = _open_for_writing(root, record, storage)
    counts = _extract_into(con, model, read_rows(source), record["knobs"], batch_size, skip_bad, progress,
                           "index add", on_batch, storage)
    index = _open_search(root, manifest)
    new = _stored_descriptors(con, record["dim"], int(index.ntotal), storage)
    check_descriptors(new, str(root / DB_FILE), storage)
    if manifest["kind"] != "qdrant":  # a collection takes the new rows in _write
        index.add(new)
    manifest = _write(root, con, index, manifest["kind"], manifest["params"], record, manifest["created"],
                      {k: manifest[k] for k in KEPT_BY_WRITERS if k in manifest})
    con.close()
    return {**counts, "appended_to_faiss": len(new), "count": manifest["count"], "failed_paths": _failed(root)}


@_exclusive("root")
def remove(root: str | os.PathLike, sessions: list[str] = (), patterns: list[str] = ()) -> dict:
    """Remove from the index at ``root`` the images of the named ``sessions`` and those whose path (or file name)
    matches a glob of ``patterns``; the rows left keep their order and are numbered 0..n-1 again, and the search
    structure of the index's kind is rebuilt from their stored descriptors with the same settings (FAISS kinds;
    a Qdrant Edge shard is made anew; a server collection is refused: rebuild it). The manifest, its checksums and
    the calibrations are written as by ``add`` -> {"removed", "count", "sessions_removed"}."""
    import fnmatch
    import shutil

    root = Path(root)
    manifest = read_manifest(root)
    verify_for_writing(root, manifest)
    kind, count, record = manifest["kind"], int(manifest["count"]), {**manifest["model"]}
    if kind == "qdrant" and manifest["params"].get("url"):
        raise ValueError(f"{root}: images cannot be removed from a Qdrant server collection here; rebuild the index")
    if not sessions and not patterns:
        raise ValueError("index remove: give --session NAME or path globs")
    storage = storage_of(kind)
    con = _open_for_writing(root, record, storage)
    of = _sessions_of(con, count)
    for name in sessions:
        if name not in set(of):
            raise ValueError(f"{root}: no session {name!r} (it has {', '.join(sorted(set(of)))})")
    want = set(sessions)
    paths = [p for (p,) in con.execute("SELECT path FROM images WHERE id < ? ORDER BY id", (count,))]
    gone = [i for i, (path, session) in enumerate(zip(paths, of, strict=True))
            if session in want or any(fnmatch.fnmatch(path, g) or fnmatch.fnmatch(Path(path).name, g)
                                      for g in patterns)]
    if not gone:
        raise ValueError(f"{root}: no image matches {', '.join([*sessions, *patterns])}")
    if len(gone) == count:
        raise ValueError(f"{root}: that would remove all {count} images; delete the index folder instead")
    with con:  # one transaction: a kill leaves the old rows, which the old manifest still describes
        con.execute("DELETE FROM images WHERE id >= ?", (count,))  # rows an interrupted add left (it redoes them)
        con.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in gone])
        left = [i for (i,) in con.execute("SELECT id FROM images ORDER BY id")]
        con.executemany("UPDATE images SET id = ? WHERE id = ?", [(new, old) for new, old in enumerate(left)
                                                                  if new != old])
    desc = _stored_descriptors(con, record["dim"], 0, storage)
    check_descriptors(desc, str(root / DB_FILE), storage)
    if kind == "qdrant":
        from .qdrant_store import EDGE_DIR

        shutil.rmtree(root / EDGE_DIR, ignore_errors=True)
    index, used = _index_all(root, kind, record["dim"], desc, manifest["params"])
    new = _write(root, con, index, kind, used, record, manifest["created"],
                 {k: manifest[k] for k in KEPT_BY_WRITERS if k in manifest})
    con.close()
    return {"removed": len(gone), "count": new["count"], "sessions_removed": sorted(want)}


def verify_for_writing(root: Path, manifest: dict) -> None:
    """What a writer (``add``, ``merge``, ``tune``, ``calibrate``) checks before it writes a new manifest over an
    index, so that it never re-records damaged files as valid: every file against the manifest; the database may
    differ from its checksum only by rows an interrupted ``add`` appended, so then the rows the manifest covers
    must still give its ``rows_sha256``."""
    names = tuple(n for n in manifest["files"] if n != DB_FILE)
    problems = check_files(root, manifest, names=names)
    if not problems and check_files(root, manifest, names=(DB_FILE,)):
        recorded = manifest.get("rows_sha256")
        con = sqlite3.connect(f"file:{root / DB_FILE}?mode=ro", uri=True)
        try:
            same = recorded is not None and rows_digest(con, manifest["count"]) == recorded
        except sqlite3.Error as e:
            raise ValueError(f"{root / DB_FILE}: not a usable SQLite database ({e})") from None
        finally:
            con.close()
        if not same:
            problems = [f"{root / DB_FILE}: its first {manifest['count']} rows differ from the manifest's checksum "
                        "(damaged or modified)"]
    if problems:
        raise ValueError(problems[0] + "; rebuild the index, or restore the file")


def _update_manifest(root: str | os.PathLike, **fields) -> dict:
    """Set top-level manifest fields (a calibration, tuned search settings) and write it atomically, after
    checking the files it vouches for (``verify_for_writing``)."""
    root = Path(root)
    manifest = read_manifest(root)
    verify_for_writing(root, manifest)
    manifest = {**manifest, **fields}
    write_json(root / MANIFEST_FILE, manifest)
    return manifest


@_exclusive("root")
def update_manifest(root: str | os.PathLike, **fields) -> dict:
    """``_update_manifest`` under the index's writer lock."""
    return _update_manifest(root, **fields)


#: What ``tune`` tries: IVF-PQ lists probed and re-rank depths, HNSW search breadths.
TUNE_NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TUNE_RERANK = (0, 16, 32, 64, 128, 256)
TUNE_EF = (16, 32, 64, 128, 256, 512)


def search_settings(kind: str, nlist: int, can_rerank: bool, measure, target: float,
                    progress: bool = True) -> tuple[dict, list[dict]]:
    """The fastest setting whose top-1 agreement reaches ``target``: ``measure(setting)`` -> (agreement,
    ms/query). Settings are tried in order of cost (IVF-PQ: nprobe ascending, and within it re-rank depth
    ascending; HNSW: efSearch ascending), and a setting costlier than one that already reached the target is
    skipped (time grows with nprobe and depth). -> (best trial, every trial); when none reaches the target the
    most accurate one is returned."""
    if kind == "ivfpq":
        levels = [[{"nprobe": p, "rerank": r} for r in (TUNE_RERANK if can_rerank else (0,))]
                  for p in TUNE_NPROBE if p <= nlist]
    else:
        levels = [[{"ef_search": e}] for e in TUNE_EF]
    trials: list[dict] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(map(len, levels)), desc="index tune", disable=not progress)
    for level in levels:
        for setting in level:
            agreement, ms = measure(setting)
            trials.append({**setting, "agreement": agreement, "ms_per_query": ms})
            bar.update()
            if agreement >= target:
                break
        if trials[-1]["agreement"] >= target:
            break
    bar.close()
    ok = [t for t in trials if t["agreement"] >= target]
    best = min(ok, key=lambda t: t["ms_per_query"]) if ok else max(trials, key=lambda t: (t["agreement"],
                                                                                          -t["ms_per_query"]))
    return best, trials


@_exclusive("root")
def tune(root: str | os.PathLike, target: float = 0.95, sample: int = 200, seed: int = 0,
         progress: bool = True, queries: np.ndarray | None = None) -> dict:
    """Choose the fastest search settings whose top-1 agrees with exact search on >= ``target`` of a sample.

    Queries: ``queries`` [Q, D] when given (descriptors of held-out query photos, embedded by the index's
    model: the faithful choice, since real queries lie farther from the database than its own images and so
    need deeper search); otherwise ``sample`` database descriptors drawn at random (seeded), each searched for
    its nearest *other* image (itself excluded; optimistic). The exact answer is computed from the stored
    descriptors. IVF-PQ: nprobe x re-rank depth from TUNE_NPROBE x TUNE_RERANK (re-ranking needs the index's
    float16 vectors); HNSW: efSearch in TUNE_EF; settings costlier than the first that reaches the target are
    skipped (``search_settings``). Writes the chosen settings into the manifest's params and the measurements
    under ``tuned`` -> that record. When no setting reaches the target, the most accurate one is chosen and
    ``reached`` is false."""
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= 1):
        raise ValueError(f"index tune: target {target}: must be a number in (0, 1]")
    root = Path(root)
    manifest = read_manifest(root)
    if manifest["kind"] not in ("ivfpq", "hnsw"):
        raise ValueError(f"{root}: a {manifest['kind']} index has no search settings to tune (ivfpq and hnsw have)")
    if manifest["count"] < 2:
        raise ValueError(f"{root}: tuning needs at least 2 images")
    pi = PlaceIndex.open(root)
    kind, n = pi.manifest["kind"], len(pi)
    db = pi.descriptors()
    if queries is not None:
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != db.shape[1]:
            raise ValueError(f"{root}: tuning queries have shape {tuple(queries.shape)}; the index holds "
                             f"{db.shape[1]}-D descriptors")
        ids = np.full(len(queries), -1)
        truth = np.concatenate([(queries[i:i + 256] @ db.T).argmax(1) for i in range(0, len(queries), 256)])
        source = f"{len(queries)} query photos (held out)"
    else:
        ids = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
        queries = db[ids]
        exact = queries @ db.T
        exact[np.arange(len(ids)), ids] = -np.inf
        truth = exact.argmax(1)
        source = "database descriptors, nearest other image (self excluded)"
        del exact
    del db

    def measure(setting: dict) -> tuple[float, float]:
        pi.manifest["params"].update(setting)
        _configure(pi.index, kind, pi.manifest["params"])
        t0 = time.perf_counter()
        _, found = pi.search_ids(queries, 2)
        ms = (time.perf_counter() - t0) * 1000 / len(ids)
        top = np.where(found[:, 0] == ids, found[:, 1], found[:, 0])
        return float(np.mean(top == truth)), ms

    nlist = int(pi.manifest["params"].get("nlist", 0))
    best, trials = search_settings(kind, nlist, pi.vectors is not None, measure, target, progress)
    pi.close()
    chosen = {k: v for k, v in best.items() if k not in ("agreement", "ms_per_query")}
    record = {"target": target, "reached": best["agreement"] >= target, "sample": len(ids), "seed": seed,
              "chosen": best, "trials": trials, "queries": source}
    _update_manifest(root, params={**manifest["params"], **chosen}, tuned=record)
    return record


def _failed(root: Path) -> list[tuple[str, str]]:
    con = sqlite3.connect(root / DB_FILE)
    try:
        return [tuple(r) for r in con.execute("SELECT path, reason FROM failed ORDER BY path")]
    finally:
        con.close()


def match_dicts(matches: list[Match]) -> list[dict]:
    return [asdict(m) for m in matches]
