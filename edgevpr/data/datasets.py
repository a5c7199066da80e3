"""Evaluation datasets in the formats users already have, reduced to one structure: ``VPRDataset``.

Formats (see README): aligned traversals (i-th sorted image = same place, +-k frames), gmberton UTM
file names (``@east@north@...``, positives within a radius), a CSV manifest (path + lat/lon or UTM),
and VPR-Bench ``ground_truth_new.npy``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS, list_images, mean_intensity
from .safe_npy import load_npy


@dataclass
class VPRDataset:
    """A database and a query set with ground truth.

    positives[i]: sorted int64 array of database indices that are correct matches for query i.
    db_utm / q_utm: [N, 2] float64 (easting, northing) when the format carries coordinates.
    db_keys / q_keys: frame number or place id per image, used by ``subset``.
    """

    name: str
    db_paths: list[Path]
    q_paths: list[Path]
    positives: list[np.ndarray]
    db_utm: np.ndarray | None = None
    q_utm: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.positives) != len(self.q_paths):
            raise ValueError(f"{self.name}: {len(self.positives)} ground-truth rows for {len(self.q_paths)} queries")

    @property
    def num_db(self) -> int:
        return len(self.db_paths)

    @property
    def num_queries(self) -> int:
        return len(self.q_paths)

    def subset(self, db_keep: np.ndarray, q_keep: np.ndarray) -> VPRDataset:
        """The dataset restricted to boolean masks over database and queries (positives remapped)."""
        db_keep = np.asarray(db_keep, bool)
        q_keep = np.asarray(q_keep, bool)
        new_index = np.cumsum(db_keep) - 1
        positives = [new_index[p[db_keep[p]]] for p, k in zip(self.positives, q_keep, strict=True) if k]
        return VPRDataset(
            name=self.name,
            db_paths=[p for p, k in zip(self.db_paths, db_keep, strict=True) if k],
            q_paths=[p for p, k in zip(self.q_paths, q_keep, strict=True) if k],
            positives=positives,
            db_utm=None if self.db_utm is None else self.db_utm[db_keep],
            q_utm=None if self.q_utm is None else self.q_utm[q_keep],
            info=dict(self.info),
        )

    def drop_dark(self, threshold: float) -> VPRDataset:
        """Drop near-black frames (mean gray level < threshold, 0-255), e.g. Nordland tunnels."""
        db_keep = np.array([mean_intensity(p) >= threshold for p in self.db_paths])
        q_keep = np.array([mean_intensity(p) >= threshold for p in self.q_paths])
        out = self.subset(db_keep, q_keep)
        out.info["dropped_dark"] = {"db": int((~db_keep).sum()), "queries": int((~q_keep).sum()),
                                    "threshold": threshold}
        return out


def _aligned_positives(q_frames: np.ndarray, db_frames: np.ndarray, tolerance: int) -> list[np.ndarray]:
    order = np.argsort(db_frames)
    sorted_frames = db_frames[order]
    out = []
    for f in q_frames:
        lo, hi = np.searchsorted(sorted_frames, [f - tolerance, f + tolerance + 1])
        out.append(np.sort(order[lo:hi]).astype(np.int64))
    return out


def aligned(db: str | os.PathLike, queries: str | os.PathLike, tolerance: int = 2,
            frames: tuple[int, int] | None = None) -> VPRDataset:
    """Aligned traversals: the i-th image (sorted by name) of each folder shows place i; +-tolerance frames.

    frames: (start, stop) keeps places start <= i < stop only, e.g. places held out of training.
    """
    db_paths, q_paths = list_images(db), list_images(queries)
    if not db_paths or not q_paths:
        raise ValueError(f"no images in {db if not db_paths else queries}")
    if len(db_paths) != len(q_paths):
        raise ValueError(
            f"aligned traversals need the same number of images: {db} has {len(db_paths)}, {queries} has {len(q_paths)}"
        )
    name, info = f"{Path(queries).name}_vs_{Path(db).name}", {"format": "aligned", "tolerance_frames": tolerance}
    if frames is not None:
        start, stop = frames
        if not 0 <= start < min(stop, len(db_paths)):
            raise ValueError(f"frames {start}:{stop} select nothing of the {len(db_paths)} images in {db}")
        db_paths, q_paths = db_paths[start:stop], q_paths[start:stop]
        name, info["frames"] = f"{name}_{start}-{start + len(db_paths)}", [start, start + len(db_paths)]
    idx = np.arange(len(db_paths))
    return VPRDataset(name=name, db_paths=db_paths, q_paths=q_paths,
                      positives=_aligned_positives(idx, idx, tolerance), info=info)


def parse_utm_name(path: Path) -> tuple[float, float]:
    """(easting, northing) from a gmberton file name ``@utm_east@utm_north@...@.jpg``."""
    parts = path.name.split("@")
    try:
        return float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: file name is not in the '@utm_east@utm_north@...' format") from None


def radius_positives(q_utm: np.ndarray, db_utm: np.ndarray, radius: float) -> list[np.ndarray]:
    """Database indices within ``radius`` metres of each query (exact, chunked)."""
    out = []
    for start in range(0, len(q_utm), 1024):
        q = q_utm[start : start + 1024]
        d2 = ((q[:, None, :] - db_utm[None, :, :]) ** 2).sum(-1)
        out.extend(np.nonzero(row <= radius * radius)[0].astype(np.int64) for row in d2)
    return out


def utm_names(db: str | os.PathLike, queries: str | os.PathLike, radius: float = 25.0) -> VPRDataset:
    """gmberton format: ``database/`` and ``queries/`` folders of ``@east@north@...@.jpg`` files."""
    db_paths, q_paths = list_images(db), list_images(queries)
    db_utm = np.array([parse_utm_name(p) for p in db_paths], dtype=np.float64).reshape(-1, 2)
    q_utm = np.array([parse_utm_name(p) for p in q_paths], dtype=np.float64).reshape(-1, 2)
    return _geo_dataset(f"{Path(queries).name}_vs_{Path(db).name}", db_paths, db_utm, q_paths, q_utm, radius, "utm")


def _geo_dataset(name: str, db_paths: list[Path], db_utm: np.ndarray, q_paths: list[Path], q_utm: np.ndarray,
                 radius: float, fmt: str) -> VPRDataset:
    """A dataset whose positives are the database images within ``radius`` metres of each query."""
    return VPRDataset(name=name, db_paths=db_paths, q_paths=q_paths,
                      positives=radius_positives(q_utm, db_utm, radius), db_utm=db_utm, q_utm=q_utm,
                      info={"format": fmt, "radius_m": radius})


def latlon_to_utm(lat: np.ndarray, lon: np.ndarray, where: str) -> np.ndarray:
    """Degrees [N] -> UTM (easting, northing) [N, 2] in the zone of the first point (one frame for all)."""
    import utm

    if np.any(np.abs(lat) > 84) or np.any(np.abs(lon) > 180):
        raise ValueError(f"{where}: lat/lon out of range")
    _, _, zone, letter = utm.from_latlon(lat[0], lon[0])
    east, north, _, _ = utm.from_latlon(lat, lon, force_zone_number=zone, force_zone_letter=letter)
    return np.stack([east, north], 1)


def read_manifest(csv_path: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str] | None]:
    """A CSV manifest: ``path`` plus ``lat,lon`` or ``utm_east,utm_north`` (optional ``place_id``).

    Relative paths are resolved against the CSV's folder. Lat/lon are converted to UTM in the zone of
    the first row. Returns (paths, utm [N,2], place ids or None).
    """

    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path}: empty manifest")
    cols = set(rows[0])
    if "path" not in cols:
        raise ValueError(f"{csv_path}: missing column 'path' (columns: {', '.join(sorted(cols))})")
    paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else csv_path.parent / r["path"] for r in rows]

    def column(name: str) -> np.ndarray:
        try:
            return np.array([float(r[name]) for r in rows])
        except ValueError as e:
            raise ValueError(f"{csv_path}: column '{name}': {e}") from None

    if {"utm_east", "utm_north"} <= cols:
        coords = np.stack([column("utm_east"), column("utm_north")], 1)
    elif {"lat", "lon"} <= cols:
        coords = latlon_to_utm(column("lat"), column("lon"), str(csv_path))
    else:
        raise ValueError(f"{csv_path}: needs columns lat,lon or utm_east,utm_north")
    places = [r["place_id"] for r in rows] if "place_id" in cols else None
    return paths, coords.astype(np.float64), places


def manifest(db_csv: str | os.PathLike, queries_csv: str | os.PathLike, radius: float = 25.0) -> VPRDataset:
    """Two CSV manifests; positives are database images within ``radius`` metres."""
    db_paths, db_utm, _ = read_manifest(db_csv)
    q_paths, q_utm, _ = read_manifest(queries_csv)
    return _geo_dataset(f"{Path(queries_csv).stem}_vs_{Path(db_csv).stem}", db_paths, db_utm, q_paths, q_utm,
                        radius, "csv")


def vprbench(db: str | os.PathLike, queries: str | os.PathLike, gt_file: str | os.PathLike) -> VPRDataset:
    """VPR-Bench: images sorted by name, ``ground_truth_new.npy`` rows ``[query_idx, [ref idxs]]``."""
    db_paths, q_paths = list_images(db), list_images(queries)
    gt = load_npy(gt_file)  # an object array: read by a restricted unpickler that never runs code
    if gt.ndim != 2 or gt.shape[1] != 2:
        raise ValueError(f"{gt_file}: expected rows [query_idx, [ref idxs]] (shape [N, 2]), got shape {gt.shape}")
    positives: list[np.ndarray] = [np.zeros(0, np.int64) for _ in q_paths]
    for row in gt:
        try:
            qi = int(row[0])
            refs = np.atleast_1d(np.asarray(row[1], dtype=np.int64))
        except (TypeError, ValueError):
            raise ValueError(f"{gt_file}: row {row[0]!r:.40}: not [query_idx, [ref idxs]] of integers") from None
        if not 0 <= qi < len(q_paths):
            raise ValueError(f"{gt_file}: query index {qi} out of range (0..{len(q_paths) - 1})")
        if refs.size and (refs.min() < 0 or refs.max() >= len(db_paths)):
            raise ValueError(f"{gt_file}: reference index out of range for query {qi}")
        positives[qi] = np.unique(refs)
    return VPRDataset(
        name=f"{Path(queries).name}_vs_{Path(db).name}",
        db_paths=db_paths,
        q_paths=q_paths,
        positives=positives,
        info={"format": "vprbench", "gt_file": str(gt_file)},
    )


def open_dataset(
    db: str | os.PathLike,
    queries: str | os.PathLike,
    aligned_tolerance: int | None = None,
    radius: float = 25.0,
    gt_file: str | os.PathLike | None = None,
    drop_dark: float | None = None,
    frames: tuple[int, int] | None = None,
) -> VPRDataset:
    """Pick the reader from the arguments: ``gt_file`` -> VPR-Bench, ``aligned_tolerance`` -> aligned,
    CSV files -> manifest, folders of ``@``-named files -> UTM names."""
    db, queries = Path(db), Path(queries)
    for p in (db, queries):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
    if gt_file is not None:
        ds = vprbench(db, queries, gt_file)
    elif aligned_tolerance is not None:
        ds = aligned(db, queries, aligned_tolerance, frames)
    elif frames is not None:
        raise ValueError("frames (a range of places) applies to aligned traversals only; add --aligned K")
    elif db.suffix.lower() == ".csv":
        ds = manifest(db, queries, radius)
    else:
        sample = next((p for p in db.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), None)
        if sample is None or sample.name.count("@") < 3:
            raise ValueError(
                f"{db}: cannot tell the ground truth; give --aligned K (aligned traversals), --gt FILE "
                "(VPR-Bench) or CSV manifests, or use '@east@north@...' file names"
            )
        ds = utm_names(db, queries, radius)
    return ds.drop_dark(drop_dark) if drop_dark else ds
