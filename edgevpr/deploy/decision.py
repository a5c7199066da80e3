"""From scores to a decision: GNSS prior, position estimate, confidence and known/unknown (numpy only).

* **GNSS prior** (``GeoPrior``): an approximate position (lat/lon, or UTM east/north metres) and a radius; only the
  database images within it are searched. Distances are great-circle (haversine) for lat/lon and planar for UTM.
* **Confidence score**: the *margin* of the top-1 match over the best match outside its neighbourhood
  (``score = s1 - s_far``), where the neighbourhood of the top-1 is what would also count as the same place:
  within ``radius_m`` metres when the index has coordinates, else within ``frames`` database ids (an index built
  in route order). Chosen over the raw top-1 cosine because it separates right from wrong answers much better:
  average precision of "top-1 is right" ranked by each score, default model, whole sets: Gardens Point night
  0.964 (margin) vs 0.866 (top-1 cosine), day_left 0.989 vs 0.961, Nordland winter 0.184 vs 0.070 (the model is
  right on 4% of Nordland queries). A place that looks like many others (repetitive corridors, rails) gets a low
  margin even when its top-1 cosine is high.
* **Calibration** (``calibrate``): on validation queries with ground truth, the scores of right and wrong top-1
  answers give a precision-recall curve; the threshold is the lowest score at which the precision of the
  answers scoring at least that much reaches the target precision. ``confidence`` of an answer is then that
  empirical precision at its score (monotone in the score), and ``known`` is score >= threshold.
* **Position estimate**: the score-weighted mean of the coordinates of the top-k matches inside the top-1's
  neighbourhood (clipped at zero weight), with their weighted spread in metres.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

EARTH_RADIUS_M = 6_371_008.8
#: Depth of the search behind a decision: the best match outside the top-1's neighbourhood is looked for here.
DECISION_DEPTH = 100


@dataclass
class GeoPrior:
    """An approximate position and radius: ``lat``/``lon`` (degrees) or ``east``/``north`` (UTM metres)."""

    radius_m: float
    lat: float | None = None
    lon: float | None = None
    east: float | None = None
    north: float | None = None

    def __post_init__(self) -> None:
        geo, utm = self.lat is not None and self.lon is not None, self.east is not None and self.north is not None
        if geo == utm:
            raise ValueError("a GNSS prior needs lat and lon, or east and north (UTM metres), not both")
        if not (self.radius_m > 0 and math.isfinite(self.radius_m)):
            raise ValueError(f"prior radius {self.radius_m}: must be a positive number of metres")
        if geo and (abs(self.lat) > 90 or abs(self.lon) > 180):
            raise ValueError(f"prior lat/lon ({self.lat}, {self.lon}) out of range")

    @classmethod
    def parse(cls, text: str, utm: bool = False) -> GeoPrior:
        """'LAT,LON,RADIUS_M' (or 'EAST,NORTH,RADIUS_M' with ``utm``) -> GeoPrior; ValueError names the text."""
        try:
            a, b, r = (float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"prior '{text}': expected {'EAST,NORTH' if utm else 'LAT,LON'},RADIUS_M (3 numbers)") \
                from None
        return cls(r, east=a, north=b) if utm else cls(r, lat=a, lon=b)

    def distances(self, coords: Coordinates) -> np.ndarray:
        """Metres from the prior to each database image [N] (NaN where the image lacks that kind of coordinate)."""
        if self.lat is not None:
            return haversine(self.lat, self.lon, coords.lat, coords.lon)
        return np.hypot(coords.east - self.east, coords.north - self.north)

    def ids(self, coords: Coordinates, where: str) -> np.ndarray:
        """Ids of the database images within the radius (int64, sorted); ValueError when the index has no such
        coordinates."""
        kind = "lat/lon" if self.lat is not None else "UTM east/north"
        d = self.distances(coords)
        if np.isnan(d).all():
            raise ValueError(f"{where}: the index has no {kind} coordinates for a GNSS prior")
        return np.nonzero(d <= self.radius_m)[0].astype(np.int64)


@dataclass
class Coordinates:
    """Database coordinates in id order, NaN where missing: lat, lon (degrees), east, north (UTM metres) [N]."""

    lat: np.ndarray
    lon: np.ndarray
    east: np.ndarray
    north: np.ndarray

    @property
    def has_utm(self) -> bool:
        return bool(np.isfinite(self.east).any())

    @property
    def has_latlon(self) -> bool:
        return bool(np.isfinite(self.lat).any())

    def steps(self) -> np.ndarray:
        """Metres between consecutive images [N - 1] (NaN where either lacks coordinates)."""
        d = np.hypot(np.diff(self.east), np.diff(self.north))
        return np.where(np.isnan(d), haversine(self.lat[:-1], self.lon[:-1], self.lat[1:], self.lon[1:]), d)

    def metres(self, i: int, j: np.ndarray) -> np.ndarray:
        """Distances in metres from image i to images j [M] (UTM when both have it, else haversine, else NaN)."""
        d = np.hypot(self.east[j] - self.east[i], self.north[j] - self.north[i])
        return np.where(np.isnan(d), haversine(self.lat[i], self.lon[i], self.lat[j], self.lon[j]), d)


def haversine(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in metres (NaN in, NaN out)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(np.subtract(lon2, lon1)) / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


@dataclass
class Neighbourhood:
    """What counts as the same place as a match: within ``radius_m`` metres (indexes with coordinates) or within
    ``frames`` database ids (indexes without)."""

    radius_m: float | None = 25.0
    frames: int | None = None

    @classmethod
    def default(cls, coords: Coordinates) -> Neighbourhood:
        return cls(radius_m=25.0) if coords.has_utm or coords.has_latlon else cls(radius_m=None, frames=2)

    def near(self, coords: Coordinates, top: int, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` [M] are in the neighbourhood of database image ``top`` -> bool [M]."""
        if self.radius_m is not None:
            d = coords.metres(top, ids)
            return np.where(np.isnan(d), ids == top, d <= self.radius_m)
        return np.abs(ids - top) <= (self.frames or 0)


def margin(scores: np.ndarray, ids: np.ndarray, coords: Coordinates, hood: Neighbourhood) -> float:
    """Ranked scores [M] and ids [M] of one query's matches -> top-1 score minus the best score outside the
    top-1's neighbourhood (minus the last score when all M are inside: a lower bound of the margin)."""
    if len(ids) == 0:
        return float("-inf")
    far = ~hood.near(coords, int(ids[0]), ids)
    return float(scores[0] - (scores[far][0] if far.any() else scores[-1]))


def position(scores: np.ndarray, ids: np.ndarray, coords: Coordinates, hood: Neighbourhood,
             k: int) -> dict | None:
    """Score-weighted mean position of the top-k matches in the top-1's neighbourhood: {lat, lon} and/or
    {east, north}, ``spread_m`` (weighted RMS distance to that mean) and ``matches`` used; None without
    coordinates."""
    ids, scores = ids[:k], scores[:k]
    if len(ids) == 0:
        return None
    use = hood.near(coords, int(ids[0]), ids)
    w = np.clip(scores[use], 0.0, None) + 1e-9
    sel = ids[use]
    out: dict = {}
    for a, b in (("east", "north"), ("lat", "lon")):
        xa, xb = getattr(coords, a)[sel], getattr(coords, b)[sel]
        ok = np.isfinite(xa) & np.isfinite(xb)
        if ok.any():
            out[a], out[b] = float(np.average(xa[ok], weights=w[ok])), float(np.average(xb[ok], weights=w[ok]))
    if not out:
        return None
    if "east" in out:
        ok = np.isfinite(coords.east[sel])
        d2 = (coords.east[sel][ok] - out["east"]) ** 2 + (coords.north[sel][ok] - out["north"]) ** 2
    else:
        d2 = haversine(out["lat"], out["lon"], coords.lat[sel], coords.lon[sel]) ** 2
        ok = np.isfinite(d2)
        d2 = d2[ok]
    out["spread_m"] = float(np.sqrt(np.average(d2, weights=w[ok])))
    out["matches"] = int(use.sum())
    return out


@dataclass
class Calibration:
    """A known/unknown threshold on the margin score and the empirical precision curve behind confidences."""

    threshold: float
    target_precision: float
    precision: float  # reached at the threshold on the calibration queries
    recall: float  # share of the calibration queries answered 'known' and right at the threshold
    queries: int
    neighbourhood: dict
    curve_scores: list[float] = field(default_factory=list)  # ascending
    curve_precision: list[float] = field(default_factory=list)  # precision of answers with score >= curve_scores[i]

    def confidence(self, score: float) -> float:
        """Empirical precision of calibration answers scoring at least ``score`` (0 below every one of them)."""
        i = int(np.searchsorted(np.asarray(self.curve_scores), score, side="right")) - 1
        return float(self.curve_precision[i]) if i >= 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Calibration:
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"{where}: malformed calibration record ({e})") from None


def calibrate(scores: np.ndarray, correct: np.ndarray, target_precision: float, neighbourhood: Neighbourhood,
              points: int = 200) -> Calibration:
    """Margins [Q] and whether each query's top-1 is right [Q] -> the lowest threshold whose precision (of the
    answers at or above it) reaches ``target_precision``. When no threshold reaches it, the threshold is above
    every score (everything 'unknown') and the note is in ``precision`` (the best precision reached)."""
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"precision {target_precision}: must be in (0, 1]")
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    if len(scores) < 10:
        raise ValueError(f"{len(scores)} calibration queries: need at least 10")
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    prec = np.cumsum(c) / np.arange(1, len(c) + 1)  # precision of the top-i answers, by descending score
    # precision at threshold s[i] counts every answer scoring >= s[i]: take the last of each run of equal scores
    last = np.r_[s[1:] != s[:-1], True]
    ok = np.nonzero(last & (prec >= target_precision))[0]
    if len(ok):
        i = int(ok[-1])
        threshold, reached, recall = float(s[i]), float(prec[i]), float(np.cumsum(c)[i] / len(c))
    else:
        threshold, reached, recall = float(s[0] + 1e-6), float(prec[last].max()), 0.0
    asc_s, asc_p = s[last][::-1], prec[last][::-1]
    # confidence must not fall as the score rises: running max of the precision from low to high scores
    asc_p = np.maximum.accumulate(asc_p)
    keep = np.unique(np.linspace(0, len(asc_s) - 1, min(points, len(asc_s))).round().astype(int))
    return Calibration(threshold, float(target_precision), reached, recall, int(len(scores)),
                       asdict(neighbourhood), asc_s[keep].tolist(), asc_p[keep].tolist())
