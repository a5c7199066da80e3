"""The row store of a place index: its images in SQLite, the manifest that vouches for every file, integrity and
the writer lock. The search structure beside it is a backend's (``backends/``).

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
import os
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...data.images import ImageLoadError, list_images
from ...integrity import StampCache, check_finite, sha256_file
from ...utils import parse_time, write_json
from ..embed import embed, image_batches
from .rows import pack_bits

DB_FILE, MANIFEST_FILE = "places.sqlite", "manifest.json"

FORMAT_VERSION = 1




#: manifest fields a writer that changes the rows carries over (``add``, ``remove``)
KEPT_BY_WRITERS = ("calibration", "sequence_calibration", "tuned", "calibration_sha256", "image_root",
                   "local_features")

#: manifest fields whose content the manifest seals (``calibration_sha256``): the decision's fitted records
SEALED = ("calibration", "sequence_calibration")


def seal(manifest: dict) -> str:
    """sha256 of the canonical JSON of the manifest's ``SEALED`` records (what ``calibration_sha256`` holds)."""
    body = json.dumps({k: manifest.get(k) for k in SEALED}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


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
    inliers: int | None = None  # geometric verification's inliers with the query (verified candidates only)


def read_rows(source: str | os.PathLike) -> list[Row]:
    """Images of a folder (coordinates from '@utm_east@utm_north@' names when present) or a CSV manifest with
    ``path`` and optional ``place_id``, ``lat``/``lon``, ``utm_east``/``utm_north`` (lat/lon also get UTM),
    ``session`` and ``time`` (ISO 8601 or Unix seconds)."""
    from ...data.datasets import latlon_to_utm, parse_utm_name

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
    if geo and utm_zone_spread([rows[i].lon for i in geo]) <= 1:
        # one UTM zone for the whole manifest (that of its first lat/lon row), as read_manifest does; a neighbouring
        # zone's points are still accurate to a fraction of a metre per km in it
        utm_xy = latlon_to_utm(np.array([rows[i].lat for i in geo]), np.array([rows[i].lon for i in geo]), str(src))
        for i, (east, north) in zip(geo, utm_xy.tolist(), strict=True):
            rows[i].east, rows[i].north = east, north
    elif geo:  # across distant zones one frame distorts thousands of km: distances come from lat/lon (haversine)
        from ...integrity import warn

        warn(f"{src}: its positions span {utm_zone_spread([rows[i].lon for i in geo]) + 1} UTM zones; distances are "
             "great-circle distances from lat/lon (no UTM)")
    return rows


def utm_zone_spread(lons: list[float]) -> int:
    """How many UTM zones (6 degrees of longitude each) apart the farthest two longitudes are, the short way round."""
    zones = sorted({int((lon + 180) // 6) % 60 for lon in lons})
    if len(zones) < 2:
        return 0
    gaps = [b - a for a, b in zip(zones, zones[1:], strict=False)] + [zones[0] + 60 - zones[-1]]
    return 60 - max(gaps)


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
            CREATE TABLE IF NOT EXISTS local_features (path TEXT NOT NULL, kind TEXT NOT NULL, width INTEGER,
                height INTEGER, xy BLOB NOT NULL, descriptors BLOB NOT NULL, PRIMARY KEY (path, kind));
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
    recover(root)
    man_file = root / MANIFEST_FILE
    if not man_file.is_file():
        hint = " (an interrupted build: run the same `edgevpr index build` again)" if (root / DB_FILE).exists() \
            else ""
        raise FileNotFoundError(f"{root}: not a finished place index, no {MANIFEST_FILE}{hint}")
    try:
        manifest = json.loads(man_file.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{man_file}: not valid JSON ({str(e)[:200] or 'nested too deeply'})") from None
    need = {"model": dict, "dim": int, "kind": str, "params": dict, "count": int, "files": dict}
    for key, typ in need.items():
        if not isinstance(manifest, dict) or not isinstance(manifest.get(key), typ):
            raise ValueError(f"{man_file}: field '{key}' is missing or not a {typ.__name__}")
    from .backends import required_files

    for name in (DB_FILE, *required_files(manifest["kind"], manifest["params"])):
        meta = manifest["files"].get(name)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or \
                not isinstance(meta.get("bytes"), int):
            raise ValueError(f"{man_file}: files.{name} needs 'bytes' and 'sha256'")
    if not isinstance(manifest["model"].get("fingerprint"), str):
        raise ValueError(f"{man_file}: field 'model.fingerprint' is missing")
    sealed = manifest.get("calibration_sha256")
    if (sealed is not None or any(manifest.get(k) for k in SEALED)) and sealed != seal(manifest):
        # an index calibrated by an edgevpr before the seal has records and no seal: those are validated on use
        if sealed is not None:
            raise ValueError(f"{man_file}: fields calibration / sequence_calibration differ from "
                             "calibration_sha256 (edited by hand?): run `edgevpr calibrate` again")
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


LOCK_FILE = ".lock"

# ------------------------------------------------------------------------------------------- generations and swaps
#: where a writer that changes a finished index (``add``, ``remove``, ``pull``) builds the next generation
NEXT_DIR = ".next"
#: written into NEXT_DIR once the next generation is complete: from then on it is rolled forward, never discarded
COMMIT_FILE = "COMMITTED"
SWAP_LOCK = ".swap.lock"
#: in a stage: which generation it was copied from
BASE_FILE = ".base.json"


def fault(point: str) -> None:
    """Fault injection for the kill tests: the process dies at once (``os._exit``, no cleanup) when
    ``EDGEVPR_FAULT_AT`` names ``point``. Points: ``rows`` (rows written), ``staged`` (next generation complete,
    before its commit mark), ``committed`` (mark written), ``moved:NAME`` (one file swapped in)."""
    if os.environ.get("EDGEVPR_FAULT_AT") == point:
        os._exit(137)


def ro_connect(path: Path) -> sqlite3.Connection:
    """A finished index's row store opened for reading: ``immutable=1``, so SQLite takes no lock and reads no
    journal or WAL file beside it (a stray ``places.sqlite-wal`` copied in is never applied; a committed database
    never changes in place, writers build the next generation beside it)."""
    from urllib.parse import quote

    return sqlite3.connect(f"file:{quote(str(path))}?immutable=1", uri=True, check_same_thread=False)


def stage_next(root: Path, manifest: dict, folders: tuple[str, ...] = (), resume: bool = False) -> Path:
    """A copy of the index's current generation in ``root/.next`` for a writer to change (rows through SQLite's
    backup API from the immutable file, the search files, and the engine's ``folders``, e.g. an Edge shard) -> that
    folder; ``resume`` keeps an uncommitted stage made from this same generation (an interrupted ``add``)."""
    import shutil

    stage = root / NEXT_DIR
    base = json.dumps({"updated": manifest.get("updated"), "rows_sha256": manifest.get("rows_sha256"),
                       "count": manifest["count"]})
    try:
        if resume and (stage / BASE_FILE).read_text() == base and (stage / DB_FILE).is_file():
            return stage  # what a killed writer of the same kind finished on this generation (``add`` resumes)
    except OSError:
        pass
    shutil.rmtree(stage, ignore_errors=True)  # an uncommitted stage a killed writer left (we hold the lock)
    stage.mkdir()
    src, dst = ro_connect(root / DB_FILE), sqlite3.connect(stage / DB_FILE)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    for name in manifest["files"]:
        if name != DB_FILE:
            shutil.copy2(root / name, stage / name)
    for name in folders:
        if (root / name).is_dir():
            shutil.copytree(root / name, stage / name)
    (stage / BASE_FILE).write_text(base)
    return stage


def commit_next(root: Path) -> None:
    """Swap the complete next generation in ``root/.next`` (its manifest written) in: the commit mark lists what
    moves, then every file and folder is moved over the old one and the manifest last, so a reader sees the old
    manifest with the old files or the new with the new; a kill after the mark is rolled forward by the next
    opener (``recover``)."""
    stage = root / NEXT_DIR
    names = sorted(p.name for p in stage.iterdir() if p.name not in (MANIFEST_FILE, COMMIT_FILE)
                   and not p.name.startswith((".", DB_FILE + "-")))
    fault("staged")
    write_json(stage / COMMIT_FILE, {"move": [*names, MANIFEST_FILE]})
    fault("committed")
    _roll_forward(root)


def _roll_forward(root: Path) -> None:
    import fcntl
    import re
    import shutil

    stage = root / NEXT_DIR
    with open(root / SWAP_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one mover at a time (a writer and a reader recovering)
        try:
            mark = stage / COMMIT_FILE
            if not mark.is_file():
                return  # another process finished it
            try:
                names = json.loads(mark.read_text())["move"]
            except (ValueError, KeyError, TypeError, RecursionError):
                raise ValueError(f"{mark}: not a commit mark edgevpr wrote; remove {stage} (the index as it was "
                                 "stays)") from None
            if not (isinstance(names, list) and names and names[-1] == MANIFEST_FILE and
                    all(isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", n) for n in names)):
                raise ValueError(f"{mark}: field 'move' must list plain file names ending with {MANIFEST_FILE}")
            for name in names:
                src, dst = stage / name, root / name
                if not src.exists():
                    continue  # moved before a kill
                if name == DB_FILE:
                    for j in (DB_FILE + "-wal", DB_FILE + "-shm"):
                        (root / j).unlink(missing_ok=True)
                if src.is_dir():
                    old = root / (name + ".old")
                    shutil.rmtree(old, ignore_errors=True)
                    if dst.exists():
                        dst.rename(old)
                    src.rename(dst)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(src, dst)
                fault(f"moved:{name}")
            shutil.rmtree(stage, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def recover(root: Path) -> None:
    """Finish a swap a killed writer committed (readers and writers call it before reading the manifest); an
    uncommitted stage is left for the next writer to discard (a running writer may be filling it)."""
    if (root / NEXT_DIR / COMMIT_FILE).is_file():
        try:
            _roll_forward(root)
        except OSError as e:
            raise ValueError(f"{root}: a swap of index files was interrupted and cannot be finished here ({e}); run "
                             "`edgevpr index info` where the folder is writable") from None


def _exclusive(arg: str, create: bool = False):
    """Decorator for the writers: an exclusive lock on the index folder named by argument ``arg`` while it runs (a
    second writer is refused in one line instead of colliding on SQLite rows), and SQLite failures (disk full, a
    damaged database) as one line naming the file; finished batches stay, so the same command resumes."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            import fcntl

            root = Path(inspect.signature(fn).bind(*args, **kwargs).arguments[arg])
            made = create and not root.exists()
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
                except BaseException:
                    if made and [p.name for p in root.iterdir()] == [LOCK_FILE]:  # a failure that wrote nothing
                        (root / LOCK_FILE).unlink()
                        root.rmdir()
                    raise
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


def _stored_descriptors(con: sqlite3.Connection, dim: int, start: int = 0, storage: str = "float32") -> np.ndarray:
    """Descriptors with id >= start, in id order: [N, D] float32 or [N, D/8] uint8 bits (filled row by row)."""
    n = con.execute("SELECT COUNT(*) FROM images WHERE id >= ?", (start,)).fetchone()[0]
    out = np.empty((n, dim // 8), np.uint8) if storage == "bits" else np.empty((n, dim), np.float32)
    for i, (blob,) in enumerate(con.execute("SELECT descriptor FROM images WHERE id >= ? ORDER BY id", (start,))):
        out[i] = np.frombuffer(blob, dtype=out.dtype)
    return out


def stored_path(root: Path, path: str) -> str:
    """How an image's path is stored: relative to the index folder ``root`` (POSIX separators) when the image is
    inside it (a recording's frames: the map carries them wherever it is copied), else absolute as given."""
    path, top = os.path.abspath(path), os.path.abspath(root)
    if os.path.commonpath([path, top]) == top:
        return Path(os.path.relpath(path, top)).as_posix()
    return path


def resolve_path(root: Path, stored: str, image_root: dict | None = None) -> str:
    """A stored path -> where the image is now: a relative one inside the index folder ``root``; an absolute one
    as stored, or moved by ``index relocate`` (``image_root`` {"stored": old prefix, "now": new prefix})."""
    if not os.path.isabs(stored):  # never outside the folder (a pulled payload is data, not a path to follow)
        return "" if ".." in Path(stored).parts else str(Path(root) / stored)
    if image_root and image_root.get("now") and _under(stored, image_root["stored"]):
        return os.path.join(image_root["now"], os.path.relpath(stored, image_root["stored"]))
    return stored


def _under(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == os.path.normpath(folder)


def _extract_into(con: sqlite3.Connection, model, rows: list[Row], knobs: dict, batch_size: int, skip_bad: bool,
                  progress: bool, desc: str, on_batch: Callable[[int], None] | None,
                  storage: str = "float32", root: Path | None = None) -> dict:
    """Embed the rows not yet stored (or failed while unchanged) and insert them batch by batch -> counts. Paths
    inside the index folder ``root`` are stored relative to it (``stored_path``).

    An image recorded as failed is tried again when its size or mtime changed (the user fixed the file).
    """
    retry = [p for p, size, mtime in con.execute("SELECT path, size, mtime_ns FROM failed")
             if _file_signature(p) != (size, mtime) or size is None]
    with con:
        con.executemany("DELETE FROM failed WHERE path = ?", [(p,) for p in retry])
    done = {p for (p,) in con.execute("SELECT path FROM images UNION SELECT path FROM failed")}
    key = {r.path: stored_path(root, r.path) if root is not None else r.path for r in rows}
    todo = [r for r in rows if key[r.path] not in done]
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
                con.execute(_INSERT_IMAGE, (next_id, key[r.path], r.place_id, r.lat, r.lon, r.east, r.north,
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


def verify_for_writing(root: Path, manifest: dict) -> None:
    """What a writer (``add``, ``merge``, ``tune``, ``calibrate``) checks before it writes a new manifest over an
    index, so that it never re-records damaged files as valid: every file against the manifest; the database may
    differ from its checksum only by rows an interrupted ``add`` appended, so then the rows the manifest covers
    must still give its ``rows_sha256``."""
    names = tuple(n for n in manifest["files"] if n != DB_FILE)
    problems = check_files(root, manifest, names=names)
    if not problems and check_files(root, manifest, names=(DB_FILE,)):
        recorded = manifest.get("rows_sha256")
        con = ro_connect(root / DB_FILE)
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
    manifest["calibration_sha256"] = seal(manifest)
    fault("staged")  # ``tune`` and ``calibrate`` change the manifest alone: its atomic rename is the swap
    write_json(root / MANIFEST_FILE, manifest)
    return manifest


@_exclusive("root")
def update_manifest(root: str | os.PathLike, **fields) -> dict:
    """``_update_manifest`` under the index's writer lock."""
    return _update_manifest(root, **fields)


def _failed(root: Path) -> list[tuple[str, str]]:
    con = ro_connect(root / DB_FILE)
    try:
        return [tuple(r) for r in con.execute("SELECT path, reason FROM failed ORDER BY path")]
    finally:
        con.close()


# ------------------------------------------------------------------------------- local features for verification
#: A database image's local features (``index features``, ``deploy.verify``) are rows of ``local_features`` in the
#: row store, keyed by the image's stored path and the extractor's settings (``kind``, e.g. "aliked-n16@640/1024"):
#: keypoints float32 [N, 2], descriptors float16 [N, C] (half the bytes; measured to change no re-ranking,
#: tests/test_learned.py). Inside ``places.sqlite`` they share its checksum in the manifest, travel with every
#: generation (``add`` copies the rows, ``remove`` drops those of removed images) and are read by a join on the
#: image's id.


def put_local(con: sqlite3.Connection, kind: str, path: str, xy: np.ndarray, desc: np.ndarray,
              size: tuple[int, int] | None) -> int:
    """Store one image's features (``path`` as stored in ``images``) -> bytes written."""
    xy, desc = np.ascontiguousarray(xy, np.float32), np.ascontiguousarray(desc, np.float16)
    w, h = size or (None, None)
    con.execute("INSERT OR REPLACE INTO local_features VALUES (?, ?, ?, ?, ?, ?)",
                (path, kind, w, h, xy.tobytes(), desc.tobytes()))
    return xy.nbytes + desc.nbytes


def get_local(con: sqlite3.Connection, kind: str, image_id: int) -> tuple | None:
    """The stored features of the image with ``image_id`` -> (xy [N, 2] float32, desc [N, C] float32, (w, h) or
    None), or None when not stored."""
    row = con.execute("SELECT l.width, l.height, l.xy, l.descriptors FROM images i JOIN local_features l ON "
                      "l.path = i.path AND l.kind = ? WHERE i.id = ?", (kind, int(image_id))).fetchone()
    if row is None:
        return None
    w, h, xy, desc = row
    n = len(xy) // 8
    if len(xy) % 8 or len(desc) % 2 or (n and len(desc) % (2 * n)) or (not n and desc):
        raise ValueError(f"{DB_FILE}: local features of image {image_id} ({kind}) have {len(xy)} keypoint bytes and "
                         f"{len(desc)} descriptor bytes, which no [N, 2] float32 + [N, C] float16 pair makes")
    xy = np.frombuffer(xy, np.float32).reshape(n, 2)
    desc = np.frombuffer(desc, np.float16).reshape(n, len(desc) // 2 // max(1, n)).astype(np.float32)
    return xy, desc, (None if w is None else (int(w), int(h)))


def match_dicts(matches: list[Match]) -> list[dict]:
    return [asdict(m) for m in matches]


