"""An index folder opened for search: ``PlaceIndex`` answers queries through its backend and reads rows, coordinates,
sessions and route segments from the row store."""

from __future__ import annotations

import math
import os
import sqlite3
from pathlib import Path

import numpy as np

from ..decision import Coordinates, Neighbourhood, hubness
from .backends import Backend, open_backend, storage_of
from .rows import MAX_K
from .store import (
    DB_FILE,
    MANIFEST_FILE,
    Match,
    _columns,
    _sessions_of,
    _stored_descriptors,
    check_files,
    get_local,
    read_manifest,
    resolve_path,
    ro_connect,
)


def _stamp(root: Path) -> tuple | None:
    try:
        st = os.stat(root / MANIFEST_FILE)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns


class PlaceIndex:
    """An index folder opened for search (``open``) or built and extended (``build``, ``add``)."""

    def __init__(self, root: Path, manifest: dict, backend: Backend, con: sqlite3.Connection,
                 stamp: tuple | None = None) -> None:
        self.root, self.manifest, self.backend, self.con = root, manifest, backend, con
        self._n = backend.ntotal  # counted once: a Qdrant count is a request
        self.stamp = stamp  # the manifest file's identity when this generation was opened (``changed``)
        self._hubs: dict = {}  # neighbourhood -> k-occurrence [N] (``hubs``)

    @property
    def generation(self) -> int:
        """The index generation this object answers from (+1 at every ``add``, ``remove``, ``pull``)."""
        return int(self.manifest.get("generation", 1))

    def changed(self) -> bool:
        """Whether a writer has swapped in another generation since this one was opened (a stat of the manifest:
        cheap enough for every request). The open object keeps answering from its own generation (its files stay
        open); the caller reopens (``Localizer.refresh``)."""
        return _stamp(self.root) != self.stamp

    # ----------------------------------------------------------------------------------------- open / info
    @classmethod
    def open(cls, root: str | os.PathLike, mmap: bool = True, verify: bool = False) -> PlaceIndex:
        """Open a finished index; ``mmap`` maps the search files instead of reading them; ``verify`` checks every
        byte (sha256) and every point of a structure derived from the rows."""
        root = Path(root)
        stamp = _stamp(root)  # before reading: a swap in between shows as a change at the next check
        manifest = read_manifest(root)
        problems = check_files(root, manifest, full=verify)
        if problems:
            raise ValueError(problems[0])
        try:
            con = ro_connect(root / DB_FILE)
            n = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.Error as e:
            raise ValueError(f"{root / DB_FILE}: not a readable SQLite database ({e})") from None
        backend = open_backend(root, manifest, con, mmap)
        if n != (total := backend.ntotal):
            backend.close()
            raise ValueError(f"{root}: {n} images in {DB_FILE} but {total} in {backend.where} (an interrupted "
                             "`index add`: run it again to finish)")
        if problems := backend.check(con, full=verify):
            backend.close()
            raise ValueError(problems[0])
        return cls(root, manifest, backend, con, stamp)

    def close(self) -> None:
        self.con.close()
        self.backend.close()

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

        The search itself is the backend's (``backends/``): a restriction to ``ids`` is exact within the selection
        for FAISS's flat, binary and IVF-PQ, scored from the stored rows for HNSW; a Qdrant index applies ``geo`` =
        (lat, lon, radius_m), the prior behind ``ids``, as its native geo-radius filter."""
        desc = np.ascontiguousarray(desc, dtype=np.float32)
        if desc.ndim != 2 or desc.shape[1] != self.manifest["dim"]:
            raise ValueError(f"descriptors of shape {tuple(desc.shape)}; this index holds {self.manifest['dim']}-D")
        if not np.isfinite(desc).all():
            raise ValueError("a query descriptor holds NaN/Inf: the model's weights are probably damaged")
        if len(self) == 0:
            raise ValueError(f"{self.root}: the index holds no images")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k={k}: must be between 1 and {MAX_K}")
        if ids is not None:
            ids = np.unique(np.asarray(ids, np.int64))
            if len(ids) == 0:
                return np.zeros((len(desc), 0), np.float32), np.zeros((len(desc), 0), np.int64)
        return self.backend.search(desc, min(k, len(self) if ids is None else len(ids)), ids, geo)

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
        """id -> (path where the image is now: ``resolve``, place_id, lat, lon, east, north)."""
        out = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            marks = ",".join("?" * len(part))
            q = f"SELECT id, path, place_id, lat, lon, east, north FROM images WHERE id IN ({marks})"
            out.update({r[0]: (self.resolve(r[1]), *r[2:]) for r in self.con.execute(q, part)})
        return out

    def local_features(self, kind: str, image_id: int) -> tuple | None:
        """The stored local features of ``kind`` of one database image (``store.get_local``), or None."""
        if kind not in self.manifest.get("local_features", {}):
            return None
        return get_local(self.con, kind, image_id)

    def resolve(self, stored: str) -> str:
        """A stored image path -> where the image is now (``store.resolve_path``: frames inside the index folder
        wherever it was copied; images outside it, after ``index relocate``, under their new root)."""
        return resolve_path(self.root, stored, self.manifest.get("image_root"))

    def missing_images(self) -> tuple[int, list[str]]:
        """Database images whose file is not where ``resolve`` says -> (how many, the first five)."""
        gone = [p for (s,) in self.con.execute("SELECT path FROM images WHERE id < ? ORDER BY id", (len(self),))
                if not os.path.isfile(p := self.resolve(s))]
        return len(gone), gone[:5]

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

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Stored descriptors of ``ids`` [B] as queries [B, D] float32 (a binary index's sign bits as +-1 / sqrt(D))."""
        bits = storage_of(self.manifest["kind"]) == "bits"
        ids = [int(i) for i in ids]
        blobs = dict(self.con.execute(f"SELECT id, descriptor FROM images WHERE id IN ({','.join('?' * len(ids))})",
                                      ids))  # one query per batch of probes
        x = np.stack([np.frombuffer(blobs[i], np.uint8 if bits else np.float32) for i in ids])
        x = (np.unpackbits(x, axis=1).astype(np.float32) * 2 - 1) if bits else x.astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def hubs(self, hood: Neighbourhood | None = None) -> np.ndarray:
        """Each image's k-occurrence on this map [N] (``decision.hubness``; ``hood`` default: 25 m or +-2 ids),
        measured once per generation and neighbourhood on first use (a new generation is a new PlaceIndex)."""
        hood = hood or Neighbourhood.default(self.coordinates())
        key = (hood.radius_m, hood.frames)
        if key not in self._hubs:
            self._hubs[key] = hubness(self.search_ids, self.rows_of, self.coordinates(), hood, len(self))
        return self._hubs[key]

    def route_shape(self) -> dict:
        """This map's sequence normalisation, chosen by its own route (``sequence.map_normalisation`` of
        ``sequence.route_coherence``), measured once per generation on first use -> {"normalisation",
        "coherence", "profile" (mean row-z similarity at 1..PROFILE_LAGS frames along the route, NaN: no pair)}."""
        if getattr(self, "_route_shape", None) is None:
            from ..sequence import map_normalisation, route_coherence

            coherence, profile = route_coherence(self.similarities, self.rows_of, self.segments())
            self._route_shape = {"normalisation": map_normalisation(coherence), "coherence": coherence,
                                 "profile": profile}
        return self._route_shape

    def descriptors(self) -> np.ndarray:
        """All stored descriptors in id order: [N, D] float32, or [N, D/8] uint8 sign bits for a binary index."""
        return _stored_descriptors(self.con, self.manifest["dim"], 0, storage_of(self.manifest["kind"]))


def verify_index(root: str | os.PathLike) -> dict:
    """Full check of an index folder -> {"verified": bool, "problems": [one line each]}; never raises."""
    root = Path(root)
    try:
        manifest = read_manifest(root)
        problems = check_files(root, manifest, full=True)
        if not problems:
            PlaceIndex.open(root, verify=True).close()  # the files parse, their counts agree, a search structure
            # derived from the rows (Qdrant) holds exactly them
            from ..decision import Calibration

            for key in ("calibration", "sequence_calibration"):  # the decision's records are valid
                if isinstance(manifest.get(key), dict) and manifest[key].get("kind") == "logistic":
                    Calibration.from_dict(manifest[key], f"{root / MANIFEST_FILE}: field {key}")
            pi = PlaceIndex.open(root)  # every database image is where the map says (thumbnails, verification)
            try:
                n, first = pi.missing_images()
            finally:
                pi.close()
            if n:
                problems.append(f"{root}: {n} database image(s) not found (first: {', '.join(first)}); if the images "
                                "moved, `edgevpr index relocate --index INDEX --root NEW` points the map at them")
    except (OSError, ValueError, RuntimeError) as e:
        problems = [str(e).splitlines()[0]]
    return {"verified": not problems, "problems": problems}
