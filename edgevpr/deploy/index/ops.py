"""The operations on an index folder, written once against the backend interface: ``build`` (resumable, sharded),
``merge``, ``add``, ``remove``, ``tune``. Each holds the folder's writer lock, fills the row store, makes the search
structure through ``backends.create`` / ``open_backend`` and writes the manifest last."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...integrity import StampCache, sha256_file
from ...utils import atomic_write, write_json
from . import backends
from .backends import KINDS, Backend, storage_of
from .place_index import PlaceIndex
from .store import (
    _INSERT_IMAGE,
    DB_FILE,
    FORMAT_VERSION,
    KEPT_BY_WRITERS,
    MANIFEST_FILE,
    NEXT_DIR,
    _columns,
    _exclusive,
    _extract_into,
    _failed,
    _open_for_writing,
    _sessions_of,
    _stored_descriptors,
    _update_manifest,
    check_descriptors,
    check_files,
    check_model,
    commit_next,
    fault,
    model_record,
    put_local,
    read_manifest,
    read_rows,
    resolve_path,
    ro_connect,
    rows_digest,
    stage_next,
    stored_path,
    verify_for_writing,
)


def _write(root: Path, con: sqlite3.Connection, backend: Backend, kind: str, params: dict, record: dict,
           created: str | None, keep: dict | None = None, generation: int = 1) -> dict:
    """Make the search structure durable (``Backend.save``), then write the manifest over every file it and the row
    store hold, last and atomically (``keep``: fields carried over, e.g. a calibration; ``generation``: 1 for a new
    index, the previous one's + 1 for a changed one); closes ``backend``."""
    names = (*backend.save(root, con), DB_FILE)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    n_failed = con.execute("SELECT COUNT(*) FROM failed").fetchone()[0]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stamps, files = StampCache(root), {}
    for name in names:
        files[name] = {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
        stamps.record(root / name, files[name]["sha256"])
    count = backend.ntotal
    backend.close()
    manifest = {
        "format_version": FORMAT_VERSION, "model": record, "dim": record["dim"], "rows_sha256": rows_digest(con, count),
        "metric": "Hamming distance of sign bits (score 1 - 2 h / D)" if kind == "binary" else
        "inner product of L2-normalised descriptors (cosine similarity)", "kind": kind, "params": params,
        "count": count, "failed_images": n_failed, "created": created or now, "updated": now, "generation": generation,
        "files": files, **(keep or {}),
    }
    write_json(root / MANIFEST_FILE, manifest)
    stamps.save()
    return manifest


def _next_generation(manifest: dict) -> int:
    g = manifest.get("generation", 0)
    return (g if isinstance(g, int) and g >= 0 else 0) + 1


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
                           storage, root)
    keep |= image_root(con, root, None)
    fault("rows")
    t_extract = time.perf_counter() - t0
    desc = _stored_descriptors(con, record["dim"], 0, storage)
    if len(desc) == 0:
        con.close()
        raise ValueError(f"{source}: no image could be embedded ({counts['failed']} unreadable): nothing to index")
    t1 = time.perf_counter()
    backend, used = backends.create(root, kind, record["dim"], desc, params or {}, con)
    manifest = _write(root, con, backend, kind, used, record, None, keep)
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
    for name in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm"):
        (root / name).unlink(missing_ok=True)  # what a killed merge left
    backends.discard(root, kind, params or {})
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
                    con.executemany(_INSERT_IMAGE, ((next_id + r[0], stored_path(
                        root, resolve_path(p, r[1], man.get("image_root"))), *r[2:]) for r in rows))
                    next_id += man["count"]
                    con.executemany("INSERT OR REPLACE INTO failed VALUES (?, ?, ?, ?)",
                                    src.execute("SELECT path, reason, size, mtime_ns FROM failed"))
                finally:
                    src.close()
    except sqlite3.IntegrityError as e:
        con.close()
        raise ValueError(f"index merge: an image is in more than one part ({e})") from None
    fault("rows")
    desc = _stored_descriptors(con, record["dim"], 0, storage)
    check_descriptors(desc, f"index merge into {root}", storage)
    backend, used = backends.create(root, kind, record["dim"], desc, params or {}, con)
    manifest = _write(root, con, backend, kind, used, record, None,
                      {"merged_from": [{"path": str(p), "count": m["count"], **({"shard": m["shard"]}
                                        if m.get("shard") else {})} for p, m in loaded],
                       **image_root(con, root, None)})
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
    # the next generation is made in root/.next and swapped in at the end; readers keep the current one meanwhile
    stage = stage_next(root, manifest, backends.folders(manifest["kind"], manifest["params"]), resume=True)
    con = _open_for_writing(stage, record, storage)
    counts = _extract_into(con, model, read_rows(source), record["knobs"], batch_size, skip_bad, progress,
                           "index add", on_batch, storage, root)
    fault("rows")
    backend = backends.open_backend(stage, manifest, con, mmap=False)
    new = _stored_descriptors(con, record["dim"], backend.ntotal, storage)
    check_descriptors(new, str(root / DB_FILE), storage)
    backend.add(new)
    manifest = _write(stage, con, backend, manifest["kind"], manifest["params"], record, manifest["created"],
                      {**{k: manifest[k] for k in KEPT_BY_WRITERS if k in manifest},
                       **image_root(con, root, manifest.get("image_root"))}, _next_generation(manifest))
    con.close()
    commit_next(root)
    return {**counts, "appended_to_faiss": len(new), "count": manifest["count"], "failed_paths": _failed(root)}


@_exclusive("root")
def store_local_features(root: str | os.PathLike, kind: str, extract: Callable, max_mb: float = 4096.0,
                         progress: bool = True) -> dict:
    """Compute and keep every database image's local features for verification (``extract``: image -> ``Features``,
    e.g. ``learned.LearnedLocal.extract``; ``kind``: its settings, the key the verifier reads them by) in the row
    store (``store.put_local``), as a new generation like ``add``: a kill keeps the finished images (the same command
    resumes) and readers answer meanwhile. At most ``max_mb`` MB are kept; images past it are computed on first use
    instead -> {"stored", "skipped_over_budget", "unreadable", "mb"}."""
    from tqdm.auto import tqdm

    from ...data.images import load_image

    root = Path(root)
    manifest = read_manifest(root)
    verify_for_writing(root, manifest)
    if not max_mb > 0:
        raise ValueError(f"--max-mb {max_mb}: must be > 0")
    record, storage = {**manifest["model"]}, storage_of(manifest["kind"])
    stage = stage_next(root, manifest, backends.folders(manifest["kind"], manifest["params"]), resume=True)
    con = _open_for_writing(stage, record, storage)
    have = {p for (p,) in con.execute("SELECT path FROM local_features WHERE kind = ?", (kind,))}
    used = sum(n for (n,) in con.execute("SELECT LENGTH(xy) + LENGTH(descriptors) FROM local_features WHERE "
                                         "kind = ?", (kind,)))
    todo = [p for (p,) in con.execute("SELECT path FROM images WHERE id < ? ORDER BY id", (manifest["count"],))
            if p not in have]
    stored = skipped = unreadable = 0
    bar = tqdm(total=len(todo), desc=f"local features ({kind})", unit="img", disable=not progress,
               dynamic_ncols=True)
    for n, path in enumerate(todo):
        bar.update(1)
        if used > max_mb * 2**20:
            skipped += 1
            continue
        try:
            img = load_image(resolve_path(root, path, manifest.get("image_root")))
        except (OSError, ValueError):
            unreadable += 1
            continue
        f = extract(img)
        used += put_local(con, kind, path, f.xy, f.desc, f.size)
        stored += 1
        if n % 16 == 15:
            con.commit()  # a kill keeps what is done
    bar.close()
    con.commit()
    fault("rows")
    backend = backends.open_backend(stage, manifest, con, mmap=False)
    kept = {k: manifest[k] for k in KEPT_BY_WRITERS if k in manifest}
    total = con.execute("SELECT COUNT(*) FROM local_features WHERE kind = ?", (kind,)).fetchone()[0]
    kept["local_features"] = {**manifest.get("local_features", {}), kind: {"images": total, "bytes": used}}
    _write(stage, con, backend, manifest["kind"], manifest["params"], record, manifest["created"], kept,
           _next_generation(manifest))
    con.close()
    commit_next(root)
    return {"stored": stored, "skipped_over_budget": skipped, "unreadable": unreadable, "images": total,
            "mb": used / 2**20}


def image_root(con: sqlite3.Connection, root: Path, old: dict | None) -> dict:
    """The folder that holds every image stored by absolute path (outside the index folder), which
    ``index relocate`` can move -> {"image_root": {"stored", "now"}} ({} when every image is inside the index).
    Images added later outside it widen it (their common folder); a relocated root keeps its move."""
    outside = [p for (p,) in con.execute("SELECT path FROM images") if os.path.isabs(p)]
    if not outside:
        return {"image_root": old} if old else {}
    stored = os.path.commonpath([*outside, *([old["stored"]] if old else [])])
    if os.path.isfile(stored) or (len(outside) == 1 and not old):
        stored = os.path.dirname(stored)
    now = old["now"] if old and old.get("now") and old["stored"] == stored else None
    return {"image_root": {"stored": stored, "now": now}}



@_exclusive("root")
def remove(root: str | os.PathLike, sessions: list[str] = (), patterns: list[str] = ()) -> dict:
    """Remove from the index at ``root`` the images of the named ``sessions`` and those whose path (or file name)
    matches a glob of ``patterns``; the rows left keep their order and are numbered 0..n-1 again, and the search
    structure of the index's kind is rebuilt from their stored descriptors with the same settings (FAISS kinds;
    a Qdrant Edge shard is made anew; a server collection is refused: rebuild it). The manifest, its checksums and
    the calibrations are written as by ``add`` -> {"removed", "count", "sessions_removed"}."""
    import fnmatch

    root = Path(root)
    manifest = read_manifest(root)
    verify_for_writing(root, manifest)
    kind, count, record = manifest["kind"], int(manifest["count"]), {**manifest["model"]}
    if not backends.removable(kind, manifest["params"]):
        raise ValueError(f"{root}: images cannot be removed from a Qdrant server collection here; rebuild the index")
    if not sessions and not patterns:
        raise ValueError("index remove: give --session NAME or path globs")
    storage = storage_of(kind)
    con = ro_connect(root / DB_FILE)
    try:
        of = _sessions_of(con, count)
        paths = [p for (p,) in con.execute("SELECT path FROM images WHERE id < ? ORDER BY id", (count,))]
    finally:
        con.close()
    for name in sessions:
        if name not in set(of):
            raise ValueError(f"{root}: no session {name!r} (it has {', '.join(sorted(set(of)))})")
    want = set(sessions)
    where = [resolve_path(root, p, manifest.get("image_root")) for p in paths]
    gone = [i for i, (path, session) in enumerate(zip(where, of, strict=True))
            if session in want or any(fnmatch.fnmatch(path, g) or fnmatch.fnmatch(Path(path).name, g)
                                      for g in patterns)]
    if not gone:
        raise ValueError(f"{root}: no image matches {', '.join([*sessions, *patterns])}")
    if len(gone) == count:
        raise ValueError(f"{root}: that would remove all {count} images; delete the index folder instead")
    # the next generation is made in root/.next and swapped in at the end: a kill at any step leaves the old index
    # or the new one, and readers keep answering from the old one meanwhile
    stage = stage_next(root, manifest)  # the structure is made anew from the rows: nothing of it is copied
    con = _open_for_writing(stage, record, storage)
    with con:  # one transaction: a kill leaves the old rows, which the old manifest still describes
        con.execute("DELETE FROM images WHERE id >= ?", (count,))  # rows an interrupted add left (it redoes them)
        con.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in gone])
        left = [i for (i,) in con.execute("SELECT id FROM images ORDER BY id")]
        con.executemany("UPDATE images SET id = ? WHERE id = ?", [(new, old) for new, old in enumerate(left)
                                                                  if new != old])
        con.execute("DELETE FROM local_features WHERE path NOT IN (SELECT path FROM images)")
    fault("rows")
    desc = _stored_descriptors(con, record["dim"], 0, storage)
    check_descriptors(desc, str(root / DB_FILE), storage)
    backends.discard(stage, kind, manifest["params"])  # made anew from the renumbered rows
    backend, used = backends.create(stage, kind, record["dim"], desc, manifest["params"], con)
    new = _write(stage, con, backend, kind, used, record, manifest["created"],
                 {k: manifest[k] for k in KEPT_BY_WRITERS if k in manifest}, _next_generation(manifest))
    con.close()
    commit_next(root)
    # the frames the map owned (stored inside its folder: a recording's) go with their rows, and so does a
    # removed session's recording manifest; images outside the folder are the user's and stay
    owned = [root / paths[i] for i in gone if not os.path.isabs(paths[i])]
    owned += [root / "recordings" / f"{s}.csv" for s in want if (root / "recordings" / f"{s}.csv").is_file()]
    for f in owned:
        f.unlink(missing_ok=True)
    for folder in {f.parent for f in owned}:
        if folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return {"removed": len(gone), "count": new["count"], "sessions_removed": sorted(want),
            "files_deleted": len(owned)}


@_exclusive("root")
def relocate(root: str | os.PathLike, new_root: str | os.PathLike) -> dict:
    """Point the map's images stored outside its folder at ``new_root`` (their folder moved or the map is on
    another machine): every such image must be found there, else nothing changes and one line says how many are
    missing and which first. Frames inside the index folder need nothing (stored relative to it) ->
    {"images", "root"}."""
    root, new_root = Path(root), os.path.abspath(new_root)
    manifest = read_manifest(root)
    verify_for_writing(root, manifest)
    old = manifest.get("image_root")
    if not old:
        raise ValueError(f"{root}: every image of this map is inside its folder; nothing to relocate")
    con = ro_connect(root / DB_FILE)
    try:
        outside = [p for (p,) in con.execute("SELECT path FROM images WHERE id < ?", (manifest["count"],))
                   if os.path.isabs(p)]
    finally:
        con.close()
    moved = {**old, "now": new_root}
    missing = [q for p in outside if not os.path.isfile(q := resolve_path(root, p, moved))]
    if missing:
        raise ValueError(f"--root {new_root}: {len(missing)} of the map's {len(outside)} images are not there "
                         f"(first: {missing[0]}); the root replaces {old['stored']}")
    _update_manifest(root, image_root=moved)
    return {"images": len(outside), "root": new_root}



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
        pi.backend.configure(setting)
        t0 = time.perf_counter()
        _, found = pi.search_ids(queries, 2)
        ms = (time.perf_counter() - t0) * 1000 / len(ids)
        top = np.where(found[:, 0] == ids, found[:, 1], found[:, 0])
        return float(np.mean(top == truth)), ms

    nlist = int(pi.manifest["params"].get("nlist", 0))
    best, trials = search_settings(kind, nlist, pi.backend.can_rerank, measure, target, progress)
    pi.close()
    chosen = {k: v for k, v in best.items() if k not in ("agreement", "ms_per_query")}
    record = {"target": target, "reached": best["agreement"] >= target, "sample": len(ids), "seed": seed,
              "chosen": best, "trials": trials, "queries": source}
    _update_manifest(root, params={**manifest["params"], **chosen}, tuned=record)
    return record





# ---------------------------------------------------------------------------------------- fleet sync (Qdrant Edge)
#: the root file of an ``index snapshot`` archive that carries the index's model record and settings
SNAPSHOT_RECORD = "edgevpr-index.json"


def _edge_dir(root: Path, manifest: dict) -> Path:
    if manifest["kind"] != "qdrant" or manifest["params"].get("url"):
        raise ValueError(f"{root}: a {manifest['kind']} index has no Qdrant Edge shard; snapshots move maps built "
                         "with --kind qdrant (the device's engine)")
    from .backends.qdrant_edge import edge_dir

    return edge_dir(root, manifest["params"])


@_exclusive("root")
def snapshot(root: str | os.PathLike, out: str | os.PathLike, since: dict | None = None) -> dict:
    """Write the index's Qdrant Edge shard as a Qdrant shard snapshot at ``out`` (atomically): full, or partial
    against ``since`` (a device's ``snapshot_manifest``, from ``index snapshot --manifest``), with the index's model
    record at the archive's root so that ``pull`` can make a whole index of it -> what was written."""
    from .backends import qdrant_edge
    from .place_index import verify_index

    root = Path(root)
    manifest = read_manifest(root)
    shard = _edge_dir(root, manifest)
    # every file's bytes and every point against its row (what verify_for_writing checks, and more): a damaged
    # shard is never shipped to a fleet
    report = verify_index(root)
    if not report["verified"]:
        raise ValueError(f"{report['problems'][0]}; no snapshot was written")
    # the model record only: where the pulled index lives and which engine answers it are the puller's choice
    record = {k: manifest[k] for k in ("model", "dim", "metric") if k in manifest}
    extra = {SNAPSHOT_RECORD: json.dumps(record, indent=2).encode()}
    box: dict = {}
    atomic_write(out, lambda tmp: box.update(qdrant_edge.write_snapshot(shard, tmp, since, extra)))
    return {**box, "out": str(out), "count": manifest["count"]}


def check_snapshot_manifest(since) -> None:
    """ValueError naming the field when ``since`` is not a snapshot manifest (``index snapshot --since``)."""
    from .backends import qdrant_edge

    qdrant_edge.check_since(since)


def snapshot_manifest(root: str | os.PathLike) -> dict:
    """The Qdrant snapshot manifest of an index's Edge shard (what a device sends for a partial snapshot)."""
    from .backends import qdrant_edge

    root = Path(root)
    return qdrant_edge.shard_manifest(_edge_dir(root, read_manifest(root)))


def _fetch(source: str, folder: Path) -> str:
    """A local path as is; an http(s) URL (e.g. a Qdrant server's ``/collections/C/shards/0/snapshot``) downloaded
    into ``folder`` under ``netio``'s byte limit, stall timeout and deadline -> the path of the snapshot file. A
    failed download leaves nothing behind and names the URL."""
    if not source.startswith(("http://", "https://")):
        if not Path(source).is_file():
            raise FileNotFoundError(f"{source}: no such snapshot file")
        return source
    from ... import netio

    dest = folder / ".pulled.snapshot"
    try:
        netio.download(source, dest)
    except OSError as e:
        dest.unlink(missing_ok=True)
        raise ValueError(f"could not download the snapshot: {e}") from None
    return str(dest)


@_exclusive("root", create=True)
def pull(root: str | os.PathLike, source: str, record: dict | None = None) -> dict:
    """Bring the index at ``root`` to a Qdrant shard snapshot's state (a file or URL; full or partial) and make its
    row store and manifest from the shard's points (payloads hold every row column, vectors the descriptors).

    The model record comes from the index already at ``root``, else from an ``index snapshot`` archive, else from
    ``record`` (``--model``: a snapshot of a server collection carries no model); a snapshot of another model than
    the index's is refused before anything changes. Ids must be 0..N-1. -> {"count", "partial", "source"}."""
    root = Path(root)
    old = read_manifest(root) if (root / MANIFEST_FILE).is_file() else None
    # where the index lives and which engine answers it come from the local manifest or the defaults, never from the
    # snapshot (its ``params`` are ignored: a snapshot carries points and a model record, not instructions)
    if old is not None:
        shard = _edge_dir(root, old)
        params = old["params"]
    else:
        from .backends.qdrant_edge import EDGE_DEFAULTS, EDGE_DIR

        params = {"engine": "qdrant-edge", "edge_path": EDGE_DIR, **EDGE_DEFAULTS}
        shard = root / EDGE_DIR
    path = _fetch(source, root)
    try:
        return _pull_file(root, source, path, old, params, shard, record)
    except ValueError as e:
        if path != source:  # name the URL the user gave, not the temporary file
            raise ValueError(str(e).replace(path, source)) from None
        raise
    finally:
        if path != source:
            Path(path).unlink(missing_ok=True)


def _check_payload(source: str, i: int, cols: tuple) -> None:
    """A pulled point's row columns are data checked like built rows: a path, coordinates in range or absent."""
    if not isinstance(cols[0], str) or not cols[0]:
        raise ValueError(f"{source}: point {i} has no 'path' in its payload: not a map made by edgevpr (its points "
                         "need path, and optionally place_id, location, east, north)")
    lat, lon, east, north = cols[2:6]
    for name, v, lim in (("lat", lat, 90.0), ("lon", lon, 180.0), ("east", east, 1e8), ("north", north, 1e8)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and abs(v) <= lim):
            raise ValueError(f"{source}: point {i} payload field {name} is {str(v)[:40]!r} (a finite number within "
                             f"+-{lim:g} or absent)")
    for name, v, ok in (("place_id", cols[1], (str, int)), ("session", cols[6], str), ("time", cols[7], (int, float))):
        if v is not None and (not isinstance(v, ok) or isinstance(v, bool)
                              or (isinstance(v, float) and not math.isfinite(v))):
            raise ValueError(f"{source}: point {i} payload field {name} is {str(v)[:40]!r} (wrong type)")


def _pull_file(root: Path, source: str, path: str, old: dict | None, params: dict, shard: Path,
               record: dict | None) -> dict:
    """``pull`` once the snapshot is a local file ``path`` (``source``: what the user named)."""
    import shutil

    from .backends import qdrant_edge

    qdrant_edge.check_archive(path)
    carried = qdrant_edge.read_extra(path, SNAPSHOT_RECORD)
    try:
        carried = json.loads(carried) if carried else None
    except ValueError:
        raise ValueError(f"{source}: its {SNAPSHOT_RECORD} is not JSON") from None
    model = (carried or {}).get("model") if isinstance(carried, dict) else None
    if carried is not None and not (isinstance(model, dict) and isinstance(model.get("name"), str)
                                    and isinstance(model.get("fingerprint"), str)
                                    and isinstance(model.get("dim"), int)):
        raise ValueError(f"{source}: its {SNAPSHOT_RECORD} lacks model.name, model.fingerprint or model.dim")
    named = [m for m in ((old or {}).get("model"), (carried or {}).get("model"), record) if m]
    if not named:
        raise ValueError(f"{source}: the snapshot names no model (a server collection's): pass --model, the model "
                         "that made its vectors")
    rec = named[0]
    for other in named[1:]:
        check_model(rec, other["name"], other["fingerprint"], str(source))
    partial = qdrant_edge.is_partial(path)
    # the next generation is made in root/.next (a partial snapshot merges into a copy of the shard) and swapped in
    # only when the rows it gives are valid: a failed or killed pull leaves the index as it was
    stage = root / NEXT_DIR
    shutil.rmtree(stage, ignore_errors=True)  # an uncommitted stage a killed writer left
    stage.mkdir()
    staged = stage / shard.name
    try:
        if partial and shard.is_dir():
            shutil.copytree(shard, staged)
        qdrant_edge.apply_snapshot(staged, path)
        con = _open_for_writing(stage, rec, "float32")
        expect = 0
        try:
            with con:
                for i, cols, vec in qdrant_edge.scroll_rows(staged):
                    if i != expect:
                        raise ValueError(f"{source}: point ids are not 0..N-1 (found {i} where {expect} was due): "
                                         "not a map made by edgevpr; rebuild it with `index build --kind qdrant`")
                    _check_payload(source, i, cols)
                    if vec.shape != (rec["dim"],):
                        raise ValueError(f"{source}: {vec.shape[0]}-D vectors; the model {rec['name']} makes "
                                         f"{rec['dim']}-D descriptors")
                    con.execute(_INSERT_IMAGE, (i, cols[0], *cols[1:6], vec.tobytes(), *cols[6:]))
                    expect += 1
            if expect == 0:
                raise ValueError(f"{source}: the snapshot holds no points")
            fault("rows")
            backend = backends.open_backend(stage, {"kind": "qdrant", "params": params, "dim": rec["dim"]}, con)
            keep = {"pulled_from": {"source": str(source), "partial": partial,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
            manifest = _write(stage, con, backend, "qdrant", params, rec, (old or {}).get("created"), keep,
                              _next_generation(old or {}))
        finally:
            con.close()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    commit_next(root)
    return {"count": manifest["count"], "partial": partial, "source": str(source)}
