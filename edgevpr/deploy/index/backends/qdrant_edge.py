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

from ._qdrant import INSTALL, REQUIRED_FILES, QdrantBackend, refuse_fuller, row_of  # noqa: F401  (REQUIRED_FILES: the registry reads it)

EDGE_DIR = "qdrant-edge"
#: the index folders this engine's structure lives in (``backends.folders``)
FOLDERS = (EDGE_DIR,)

#: Edge's build and search settings (``index build --kind qdrant --param``): HNSW graph degree and build depth,
#: int8 scalar quantization of the vectors (kept in RAM, 4x smaller than float32) and, at search, the HNSW beam
#: ``hnsw_ef`` with the quantized candidates re-scored on the float32 vectors (``oversampling`` x k of them).
EDGE_DEFAULTS = {"hnsw_m": 16, "ef_construct": 100, "quantization": "int8", "hnsw_ef": 128, "oversampling": 2.0}


def edge_dir(root: Path, params: dict) -> Path:
    """The shard's folder: always ``root/qdrant-edge``. A manifest's ``params.edge_path`` is data, never a place: one
    that names anything else (``/home/user/photos``, ``../x``) is refused, so no setting in a file chooses a folder
    that a writer renames or deletes."""
    named = params.get("edge_path", EDGE_DIR)
    if named != EDGE_DIR:
        raise ValueError(f"{root}: manifest field params.edge_path is {str(named)[:80]!r}; the shard of an index is "
                         f"always its {EDGE_DIR}/ folder (a path from a file is never followed)")
    return root / EDGE_DIR


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


class _Guarded:
    """A Qdrant Edge shard whose every call turns the engine's bare exceptions (a damaged segment found while
    counting, searching or reading, not only while loading) into one ValueError line naming the shard."""

    def __init__(self, shard, where: str) -> None:
        self._shard, self._where = shard, where

    def __getattr__(self, name: str):
        fn = getattr(self._shard, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ValueError:
                raise
            except Exception as e:  # noqa: BLE001  (the engine raises bare Exception)
                raise ValueError(f"{self._where}: not a readable Qdrant Edge shard ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0][:200]}); rebuild the index or pull a snapshot"
                                 ) from None

        return call


def load_shard(path: Path) -> _Guarded:
    """An existing shard, opened with its engine errors as one line (``_Guarded``)."""
    import qdrant_edge as qe

    try:
        return _Guarded(qe.EdgeShard.load(str(path)), str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable Qdrant Edge shard ({(str(e).splitlines() or [''])[0][:200]})"
                         ) from None


class EdgeStore(QdrantBackend):
    """A Qdrant Edge shard in ``INDEX/qdrant-edge/`` (qdrant-edge-py)."""

    def __init__(self, root: Path, spec: dict, dim: int, create: bool = False) -> None:
        try:
            import qdrant_edge as qe
        except ImportError:
            raise ValueError(INSTALL) from None
        self.qe, self.root, self.spec, self.dim = qe, root, spec, dim
        self.path = edge_dir(root, spec)
        self.where = str(self.path)
        self.collection = spec.get("collection")
        exists = (self.path / "edge_config.json").is_file()
        try:
            if exists:
                self.shard = load_shard(self.path)
            elif create:
                # no write-ahead log: with one, a second process (``serve`` beside ``localize``) cannot open the
                # shard (the WAL is locked); durability comes from flushing after every uploaded batch instead,
                # and the SQLite rows stay the authority a killed upload is resumed from
                self.shard = _Guarded(qe.EdgeShard.create(str(self.path), edge_config(qe, dim, spec)), self.where)
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
    refuse_fuller(store, len(desc), "--out")
    return store, used


def load(root: Path, manifest: dict, con: sqlite3.Connection, mmap: bool = True) -> EdgeStore:
    if "path" in manifest["params"]:  # qdrant-client local mode (pickle storage) of edgevpr <= 0.1 index folders
        raise ValueError(f"{root}: built with qdrant-client's local mode, whose storage is read with pickle (code "
                         "from a data file); it is not opened. Rebuild it: `edgevpr index build --kind qdrant` into "
                         "a new folder (the Qdrant Edge engine)")
    return EdgeStore(root, manifest["params"], manifest["dim"])


def discard(root: Path, params: dict) -> None:
    shutil.rmtree(edge_dir(root, params), ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- snapshots
#: the file a Qdrant segment manifest has inside a segment of a *partial* snapshot (Qdrant's name)
SEGMENT_MANIFEST = "segment_manifest.json"


def shard_manifest(shard_dir: Path) -> dict:
    """Qdrant's snapshot manifest of the shard in ``shard_dir``: {segment id: {segment_id, segment_version,
    file_versions: {file: version or None}}}: what a device sends to get a partial snapshot of what changed."""
    shard = load_shard(shard_dir)
    try:
        return shard.snapshot_manifest()
    finally:
        shard.close()


def check_since(since) -> None:
    """A device's snapshot manifest is data: {segment id: {"file_versions": {file: int or null}, ...}}; anything else
    is ValueError naming the field."""
    if not isinstance(since, dict):
        raise ValueError("the snapshot manifest is not a JSON object of segments")
    for seg_id, seg in since.items():
        if not isinstance(seg, dict):
            raise ValueError(f"segment {str(seg_id)[:60]!r} is a {type(seg).__name__}, not an object")
        versions = seg.get("file_versions", {})
        if not isinstance(versions, dict):
            raise ValueError(f"segment {str(seg_id)[:60]!r}: file_versions is not an object")
        for name, v in versions.items():
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"segment {str(seg_id)[:60]!r}: file_versions[{str(name)[:60]!r}] is "
                                 f"{str(v)[:20]!r}, not a whole number or null")


def write_snapshot(shard_dir: Path, out: str, since: dict | None = None, extra: dict[str, bytes] | None = None) -> dict:
    """Write the shard in ``shard_dir`` (closed) as a Qdrant shard snapshot to the path ``out`` (a tar, the layout a
    Qdrant server's ``/collections/C/shards/S/snapshot`` gives: the shard's own files, and per segment
    ``segments/<id>.tar`` holding ``snapshot/files/<its files>``), which ``EdgeShard.unpack_snapshot`` restores.

    ``since`` (a device's ``shard_manifest``) makes it *partial*, as Qdrant's partial snapshots are: every segment of
    this shard is listed with its manifest (``segment_manifest.json``; a segment the device has that is not listed is
    deleted there), but only the files the device lacks or holds at an older version are sent (files without a
    version, and files no manifest lists, always are). ``extra``: files added at the archive's root (Qdrant ignores
    them). -> {"segments", "files", "bytes", "partial"}."""
    import io
    import json
    import tarfile

    current = shard_manifest(shard_dir)
    if since is not None:
        check_since(since)
    sent = 0
    with tarfile.open(out, "w") as tar:
        for f in sorted(shard_dir.iterdir()):
            if f.is_file():
                tar.add(f, arcname=f.name)
        if since is not None and not (shard_dir / "wal").is_dir():  # Edge's merge replaces the shard's WAL folder
            # with the snapshot's: ours is made without a WAL, so an empty one stands in
            info = tarfile.TarInfo("wal")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for seg_id, seg in sorted(current.items()):
            seg_dir = shard_dir / "segments" / seg_id
            have = (since or {}).get(seg_id)
            versions = seg.get("file_versions", {})
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in sorted(p for p in seg_dir.rglob("*") if p.is_file()):
                    rel = f.relative_to(seg_dir).as_posix()
                    mine = versions.get(rel)
                    theirs = (have or {}).get("file_versions", {}).get(rel, -1) if have else -1
                    if since is None or rel not in versions or mine is None or theirs is None or mine > theirs:
                        inner.add(f, arcname=f"snapshot/files/{rel}")
                        sent += 1
                if since is not None:
                    data = json.dumps(seg).encode()
                    info = tarfile.TarInfo(f"snapshot/files/{SEGMENT_MANIFEST}")
                    info.size = len(data)
                    inner.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"segments/{seg_id}.tar")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"segments": len(current), "files": sent, "bytes": Path(out).stat().st_size, "partial": since is not None}


#: the largest root file ``read_extra`` reads (the model record an ``index snapshot`` carries)
MAX_EXTRA_BYTES = 1 << 20


#: the most tar entries a snapshot archive (and each segment archive in it) may hold: a shard has tens of files
MAX_SNAPSHOT_ENTRIES = 10_000


def check_archive(snapshot: str) -> None:
    """Bound the work before anything is extracted: the archive must be an uncompressed tar (Qdrant's format; no
    decompression bomb) of at most ``MAX_SNAPSHOT_ENTRIES`` entries, likewise each ``segments/*.tar`` in it, with
    declared sizes adding up to at most the download limit (``EDGEVPR_MAX_DOWNLOAD_GB``). Read as a stream, so a
    planted archive of millions of entries is refused after ``MAX_SNAPSHOT_ENTRIES`` headers. ValueError, one line."""
    import tarfile

    from ....netio import limit

    max_bytes = limit("bytes")

    def walk(tar: tarfile.TarFile, where: str) -> int:
        total = 0
        for n, m in enumerate(tar, 1):
            if n > MAX_SNAPSHOT_ENTRIES:
                raise ValueError(f"{where} holds more than {MAX_SNAPSHOT_ENTRIES} entries: not a Qdrant shard snapshot")
            total += m.size
            if total > max_bytes:
                raise ValueError(f"{where} declares over {max_bytes / 2**30:.3g} GiB (EDGEVPR_MAX_DOWNLOAD_GB raises "
                                 "the limit)")
            if m.isfile() and m.name.startswith("segments/") and m.name.endswith(".tar"):
                with tarfile.open(fileobj=tar.extractfile(m), mode="r|") as inner:
                    walk(inner, f"{where}: {m.name}")
        return total

    try:
        with tarfile.open(snapshot, mode="r|") as tar:
            walk(tar, snapshot)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{snapshot}: not a Qdrant snapshot archive (an uncompressed tar): {e}") from None


def read_extra(snapshot: str, name: str) -> bytes | None:
    """A root file ``name`` of a snapshot archive (what ``write_snapshot(extra=...)`` added), None when absent;
    ValueError naming the file when it is not a tar archive."""
    import tarfile

    try:
        with tarfile.open(snapshot) as tar:
            try:
                member = tar.getmember(name)
            except KeyError:
                return None
            if not member.isfile():
                return None
            if member.size > MAX_EXTRA_BYTES:  # a record is a few kB: refuse before reading a planted giant
                raise ValueError(f"{snapshot}: its {name} is {member.size} bytes (at most {MAX_EXTRA_BYTES})")
            return tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{snapshot}: not a Qdrant snapshot archive ({e})") from None


def is_partial(snapshot: str) -> bool:
    """Whether a snapshot archive is partial (its segments carry segment manifests)."""
    import tarfile

    with tarfile.open(snapshot) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".tar") and m.name.startswith("segments/"):
                with tarfile.open(fileobj=tar.extractfile(m)) as inner:
                    return any(n.endswith(SEGMENT_MANIFEST) for n in inner.getnames())
            if m.name.startswith("segments/") and m.name.endswith(SEGMENT_MANIFEST):
                return True
    return False


def apply_snapshot(shard_dir: Path, snapshot: str) -> None:
    """Bring the shard in ``shard_dir`` to a snapshot's state: a partial snapshot is merged into the existing shard
    (Edge's ``update_from_snapshot``); a full one is unpacked beside it and swapped in (a kill leaves the old shard
    or the new one, never half of each). Engine errors become one line naming the snapshot."""
    import shutil

    import qdrant_edge as qe

    try:
        if shard_dir.is_dir() and is_partial(snapshot):
            work = shard_dir.parent / ".pull-tmp"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            shard = qe.EdgeShard.load(str(shard_dir))
            try:
                shard.update_from_snapshot(str(snapshot), str(work))
            finally:
                shard.close()
                shutil.rmtree(work, ignore_errors=True)
            return
        if is_partial(snapshot):
            raise ValueError(f"{snapshot}: a partial snapshot needs the shard it was made against; pull a full one")
        tmp, old = shard_dir.with_name(shard_dir.name + ".new"), shard_dir.with_name(shard_dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        qe.EdgeShard.unpack_snapshot(str(snapshot), str(tmp))
        qe.EdgeShard.load(str(tmp)).close()  # it opens: the engine accepts what was unpacked
        if shard_dir.exists():
            shard_dir.rename(old)
        tmp.rename(shard_dir)
        shutil.rmtree(old, ignore_errors=True)
    except ValueError:
        raise
    except Exception as e:  # the engine's and tarfile's own errors
        raise ValueError(f"{snapshot}: not a usable Qdrant shard snapshot ({str(e).splitlines()[0][:200]})") from None


def scroll_rows(shard_dir: Path, batch: int = 1024):
    """Every point of the shard as (id, row columns, vector [D] float32), in id order (the rows a pulled shard
    gives back to the row store)."""
    import qdrant_edge as qe

    shard = load_shard(shard_dir)
    try:
        offset = None
        while True:
            recs, offset = shard.scroll(qe.ScrollRequest(offset=offset, limit=batch, with_payload=True,
                                                          with_vector=True))
            for r in sorted(recs, key=lambda r: int(r.id)):
                v = r.vector
                v = v.get("", next(iter(v.values()), None)) if isinstance(v, dict) else v
                yield int(r.id), row_of(r.payload or {}), np.asarray(v, np.float32)
            if offset is None:
                break
    finally:
        shard.close()
