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
* **Calibration** (``calibrate``): ``confidence`` is a calibrated probability that the top-1 is the right place:
  a logistic model on evidence free at query time (``evidence``: margin, the top-1's standing in its own ranking,
  the spatial spread of the top-10 poses, the top-1's hubness on the map; chosen by the transfer protocol of
  benchmarks/confidence.py, docs/methods.md) fitted on validation answers pooled over every query set
  given, plus photos of places the map does not hold (every answer to them counts as wrong). ``known`` is
  probability >= the lowest threshold at which the pooled answers reach the target precision; a target no
  threshold reaches is refused. ECE and Brier score of the fit are recorded with it.
* **Position**: the top-1's own coordinates, with the weighted spread in metres of the top-k matches inside its
  neighbourhood; a rejected answer has none (``Localizer.answer``).
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
        vals = (self.lat, self.lon) if geo else (self.east, self.north)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            raise ValueError(f"prior position {vals}: must be finite numbers")
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

    def widened(self, factor: float) -> Neighbourhood:
        """The neighbourhood ``factor`` times as wide (metres or frames)."""
        return Neighbourhood(None if self.radius_m is None else self.radius_m * factor,
                             None if self.frames is None else math.ceil(self.frames * factor))

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
    """The position of an answer: the top-1's own coordinates ({lat, lon} and/or {east, north}), with ``spread_m``,
    the score-weighted RMS distance of the top-k matches inside its neighbourhood from it (how far the evidence
    spreads along the route), and ``matches`` used; None without coordinates.

    The top-1's coordinates, not a weighted mean of its neighbourhood: on a map with frames 3 m apart the mean of a
    25 m neighbourhood pulled the estimate towards the middle of the matches (median error 7.1 m against 2.1 m for
    the top-1's own), and a position must never be worse than the best match's."""
    ids, scores = ids[:k], scores[:k]
    if len(ids) == 0:
        return None
    top = int(ids[0])
    out: dict = {}
    for a, b in (("east", "north"), ("lat", "lon")):
        xa, xb = float(getattr(coords, a)[top]), float(getattr(coords, b)[top])
        if math.isfinite(xa) and math.isfinite(xb):
            out[a], out[b] = xa, xb
    if not out:
        return None
    use = hood.near(coords, top, ids)
    w = np.clip(scores[use], 0.0, None) + 1e-9
    d = coords.metres(top, ids[use])
    ok = np.isfinite(d)
    out["spread_m"] = float(np.sqrt(np.average(d[ok] ** 2, weights=w[ok]))) if ok.any() else 0.0
    out["matches"] = int(use.sum())
    return out


#: The evidence a calibrated confidence is fitted on, all free at query time (one search DECISION_DEPTH deep).
FEATURES = ("margin", "top1_z", "log_spread", "hub")
#: The single-frame evidence of calibrations made before the transfer protocol (still read and applied): with the
#: raw top-1 cosine, whose level depends on the map and the conditions (a Gardens Point calibration on it called
#: 2199 of 2725 Nordland answers 'known' at precision 0.04; without it and with ``hub``, 6: docs/methods.md).
EARLIER_FEATURES = ("margin", "top1", "top1_z", "log_spread")
#: The evidence a sequence calibration is fitted on, each carrying its own null: ``margin_z`` (the margin over the
#: best trajectory outside the match's neighbourhood, in units of the spread of the top trajectory scores),
#: ``order_gain`` (``sequence.order_gain``: the frames' own order against every other order of them) and ``hub``
#: (log(1 + the match's k-occurrence on the map, ``hubness``)). Chosen by the transfer protocol of
#: benchmarks/confidence.py over the earlier set, whose ``agree`` and ``steady`` (still in every answer's evidence)
#: scored a hub that stays put while the frames change as perfectly steady (docs/methods.md).
SEQUENCE_FEATURES = ("margin_z", "order_gain", "hub")
#: Sequence evidence of calibrations made before the transfer protocol (still read and applied).
EARLIER_SEQUENCE_FEATURES = (*EARLIER_FEATURES, "agree", "steady")
#: The evidence of a verified answer (``--verify K``): also ``log_inliers``, log(1 + the geometric inliers of the
#: top-1 after re-ranking), and ``inlier_margin``, that minus log(1 + the most inliers of a candidate outside the
#: top-1's neighbourhood); both 0 when the query had too few local features to verify (no geometric support).
VERIFIED_FEATURES = (*FEATURES, "log_inliers", "inlier_margin")


def verified_evidence(check: dict, ids: np.ndarray, coords: Coordinates, hood: Neighbourhood) -> dict[str, float]:
    """A verification record (``Verifier.rerank``) and the ids of its candidates in verified order [K] ->
    ``log_inliers`` and ``inlier_margin`` of its answer.

    The inlier margin is ``margin`` on the geometric evidence: a top-1 whose place another candidate, elsewhere on
    the map, matches as well geometrically is a look-alike, however many inliers it has (measured: a Gardens Point
    day_left answer 4 frames off the truth had 72 inliers, the true place 75). 0 inliers stand for the best
    candidate outside when all K lie in the top-1's neighbourhood."""
    if not check.get("verified"):
        return {"log_inliers": 0.0, "inlier_margin": 0.0}
    counts = np.asarray(check["inliers"], np.float64)
    cand = np.asarray(ids[:len(counts)])
    far = ~hood.near(coords, int(cand[0]), cand)
    other = float(counts[far].max()) if far.any() else 0.0
    return {"log_inliers": math.log1p(counts[0]), "inlier_margin": math.log1p(counts[0]) - math.log1p(other)}


def steadiness(answers: list[int], coords: Coordinates, hood: Neighbourhood, length: int, move: int = 2) -> float:
    """The sequence matches of the last frames, oldest first (ids, up to ``length``) -> the share of the last
    ``length - 1`` frame-to-frame steps, counted back from the newest until the first jump, in which the match moved
    smoothly: into the neighbourhood of the one before, widened by ``move`` database frames when the neighbourhood
    is counted in frames (a right match moves up to the fastest trajectory's velocity, 1.25 frames, each frame: 2
    rounded up; a radius in metres already spans a frame's motion). 1.0: smooth for the whole window; 0.0: it
    just jumped.

    A right sequence match follows the route; a wrong one jumps between look-alike places as the frames come in.
    Free at query time (the tracker keeps its own last answers)."""
    if hood.radius_m is None:
        hood = Neighbourhood(radius_m=None, frames=(hood.frames or 0) + move)
    steps = 0
    for k in range(len(answers) - 1, 0, -1):
        if not hood.near(coords, answers[k - 1], np.array([answers[k]]))[0]:
            break
        steps += 1
    return steps / max(length - 1, 1)


#: Top-K poses whose spatial spread is the SUE-style feature (Zaffar et al., CVPR 2024).
SPREAD_K = 10
ECE_BINS = 10


def evidence(scores: np.ndarray, ids: np.ndarray, coords: Coordinates, hood: Neighbourhood,
             hubs: np.ndarray | None = None) -> dict[str, float]:
    """One query's ranked scores [M] and ids [M] (and the map's k-occurrence ``hubs`` [N] from ``hubness``, when
    known) -> the features of ``FEATURES``, plus ``margin_z`` and ``hub`` (``SEQUENCE_FEATURES``):

    * ``margin``: top-1 minus the best score outside its neighbourhood (``margin``);
    * ``top1``: the top-1 cosine;
    * ``top1_z``: the top-1 standardised over the M retrieved scores (a similarity-distribution statistic in the
      spirit of Miller et al. 2025: how far the best stands out of its own ranking);
    * ``log_spread``: log(1 + spatial spread of the top-``SPREAD_K`` poses), the spread being their RMS distance
      from their mean, weighted by a softmax of their scores at the temperature of those scores' own std (SUE:
      answers whose best matches sit in one place are more often right); metres with coordinates, database ids
      without;
    * ``margin_z``: the margin over the std of the M scores (scale-free: the same on any model's similarity scale);
    * ``hub``: log(1 + the top-1's k-occurrence ``hubs``; NaN without): a look-alike of much of the map.
    """
    if len(ids) == 0:
        return {f: float("nan") for f in (*EARLIER_FEATURES, "margin_z", "hub")}
    s = np.asarray(scores, np.float64)
    z = float((s[0] - s.mean()) / (s.std() + 1e-6)) if len(s) > 1 else 0.0
    top_s, top_i = s[:SPREAD_K], np.asarray(ids[:SPREAD_K])
    w = np.exp((top_s - top_s.max()) / (top_s.std() + 1e-6))
    w /= w.sum()
    x, y = coords.east[top_i], coords.north[top_i]
    if not np.isfinite(x).all():  # lat/lon only: local metres around the top-1 (equirectangular)
        lat0 = coords.lat[top_i[0]]
        x = np.radians(coords.lon[top_i] - coords.lon[top_i[0]]) * EARTH_RADIUS_M * math.cos(math.radians(lat0))
        y = np.radians(coords.lat[top_i] - lat0) * EARTH_RADIUS_M
    if not (np.isfinite(x).all() and np.isfinite(y).all()):  # no coordinates: database ids along the route
        x, y = top_i.astype(np.float64), np.zeros(len(top_i))
    spread = math.sqrt(float(np.sum(w * ((x - np.sum(w * x)) ** 2 + (y - np.sum(w * y)) ** 2))))
    m = margin(s, np.asarray(ids), coords, hood)
    return {"margin": m, "top1": float(s[0]), "top1_z": z, "log_spread": math.log1p(spread),
            "margin_z": m / (float(s.std()) + 1e-6) if len(s) > 1 else 0.0,
            "hub": math.log1p(float(hubs[int(ids[0])])) if hubs is not None else float("nan")}


#: A probe of ``hubness`` is searched with its neighbourhood this many times as wide left out: just outside the
#: neighbourhood itself the images still show the same place (Gardens Point frames 3 apart overlap), and counting
#: them would make every image's neighbours its hubs.
HUB_GAP = 3
#: Database images probed for ``hubness`` (all of them on a smaller map; a seeded sample of a larger one).
HUB_PROBES = 2000


def hubness(search, descriptors, coords: Coordinates, hood: Neighbourhood, n: int, probes: int = HUB_PROBES,
            seed: int = 0) -> np.ndarray:
    """A map's hubs, label-free: each probed database image [P of N] is searched as a query (``search(desc [B, D],
    k) -> (scores [B, k], ids [B, k])``, ``descriptors(ids) -> [B, D]``) as if its place were not in the map (its
    neighbourhood, ``HUB_GAP`` times as wide, left out), and its top-1 gets one count -> per image its
    k-occurrence, scaled by N / P (mean 1) [N]. A hub, the top-1 of many unrelated images, is the usual answer of a
    foreign photo (Radovanovic et al. 2010): answers on it are discounted by their ``hub`` evidence."""
    probe = np.arange(n) if n <= probes else np.sort(np.random.default_rng(seed).choice(n, probes, replace=False))
    counts, gap = np.zeros(n), hood.widened(HUB_GAP)
    for a in range(0, len(probe), 256):
        batch = probe[a:a + 256]
        _, found = search(descriptors(batch), min(n, 2 * DECISION_DEPTH))
        for i, row in zip(batch, found, strict=True):
            row = row[row >= 0]
            row = row[~gap.near(coords, int(i), row)]
            if len(row):
                counts[int(row[0])] += 1
    return counts * (n / len(probe))


def expected_calibration_error(p: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list]:
    """ECE over ``bins`` equal-width probability bins -> (ECE, [per bin: [mean p, accuracy, count]])."""
    p, correct = np.asarray(p, np.float64), np.asarray(correct, np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            table.append([float(p[sel].mean()), float(correct[sel].mean()), int(sel.sum())])
            ece += sel.mean() * abs(p[sel].mean() - correct[sel].mean())
    return float(ece), table


#: 'known' needs at least this P whatever the fitted threshold (``Calibration.known_from``)
KNOWN_FLOOR = 0.5
#: the extrapolation guard's slack: a feature may pass the calibration's range by this share of its width
GUARD_SLACK = 0.5


@dataclass
class Calibration:
    """Confidence = a calibrated probability that the top-1 is the right place: a logistic model on the evidence
    (``FEATURES``, standardised), fitted on validation answers; ``known`` = probability >= ``threshold``, the lowest
    probability at which the pooled calibration answers reach ``target_precision`` and enough of the answers to
    unknown-place photos fall below it to promise ``reject_unknown`` of them at 90% confidence (``unknown_floor``)."""

    threshold: float
    target_precision: float
    precision: float  # reached at the threshold on the calibration queries
    recall: float  # share of the calibration queries answered 'known' and right at the threshold
    queries: int
    neighbourhood: dict
    features: list[str]
    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float
    unknown_queries: int = 0  # of ``queries``: photos of places outside the map (every answer to them is wrong)
    ece: float = float("nan")  # on the calibration answers themselves (held-out ECE: benchmarks/confidence.py)
    brier: float = float("nan")
    reliability: list = field(default_factory=list)  # per probability bin: [mean probability, accuracy, count]
    kind: str = "logistic"
    sequence_length: int = 0  # a calibration of sequence answers: their length L and method (0, "": single frames)
    sequence_method: str = ""
    verify: int = 0  # fitted on answers verified over the top ``verify`` candidates (0: unverified) ...
    verify_features: str = ""  # ... with these local features ("feature map", "patch tokens", "sift")
    reject_unknown: float = 0.0  # the share of unknown-place answers 'known' must reject (target)
    unknown_rejected: float = float("nan")  # ... rejected at the threshold on the calibration answers
    unknown_rejected_bound: float = float("nan")  # its lower bound at REJECT_CONFIDENCE (``rejected_bound``)
    lo: list = field(default_factory=list)  # per feature, the lowest and highest value the calibration answers had:
    hi: list = field(default_factory=list)  # evidence outside [lo, hi] is an extrapolation, never 'known'

    def probability(self, ev: dict[str, float]) -> float:
        """Evidence of one answer (``evidence``) -> P(its top-1 is the right place)."""
        x = np.array([ev[f] for f in self.features], np.float64)
        if not np.isfinite(x).all():
            return 0.0
        z = (x - np.asarray(self.mean)) / np.asarray(self.std)
        logit = float(np.clip(np.dot(self.coef, z) + self.intercept, -700.0, 700.0))  # no overflow on far evidence
        return float(1.0 / (1.0 + math.exp(-logit)))

    @property
    def known_from(self) -> float:
        """The P at and above which an answer is 'known': the fitted threshold, never below 0.5, so that 'known' is
        never said of an answer more likely wrong than right (the word and its P cannot contradict)."""
        return max(float(self.threshold), KNOWN_FLOOR)

    def outside(self, ev: dict[str, float]) -> list[str]:
        """The features of ``ev`` beyond the range the calibration answers covered (``lo``/``hi``, widened by
        ``GUARD_SLACK`` of its width) on the side that raises P: a logistic fit extrapolated there grows surer
        than anything it was fitted on; beyond the other side P only falls. None for a calibration made before
        the range was recorded."""
        if not self.lo:
            return []
        out = []
        for f, lo, hi, c in zip(self.features, self.lo, self.hi, self.coef, strict=True):
            v, slack = ev[f], GUARD_SLACK * (hi - lo)
            if not math.isfinite(v) or (c > 0 and v > hi + slack) or (c < 0 and v < lo - slack):
                out.append(f)
        return out

    def decide(self, ev: dict[str, float]) -> dict:
        """Evidence of one answer -> {"confidence": P(right place), "known", "threshold": the P it is known from,
        and ``reason`` when it is not known for a reason besides a low P ("outside calibration: FEATURE")}."""
        p = self.probability(ev)
        out = self.outside(ev)
        known = p >= self.known_from and not out
        return {"confidence": p, "known": bool(known), "threshold": self.known_from,
                **({"reason": f"outside calibration: {', '.join(out)} beyond the range it was fitted on"}
                   if out and p >= self.known_from else {})}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Calibration:
        """A stored record -> Calibration, every field checked (type, length, finite, range): a record is data, and a
        wrong one is one line naming ``where`` (the file and field) and what is wrong, never a crash at answer time."""
        if not isinstance(d, dict) or d.get("kind") != "logistic":
            raise ValueError(f"{where}: its calibration was made by an earlier edgevpr (a threshold on the margin, "
                             "whose confidence was not a probability): run `edgevpr calibrate` again")
        try:
            cal = cls(**d)
        except TypeError as e:
            raise ValueError(f"{where}: malformed calibration record ({e})") from None
        cal.check(where)
        return cal

    def check(self, where: str) -> None:
        """ValueError naming ``where`` and the field when a value is out of its type or range."""
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{where}.{field}: {why}; run `edgevpr calibrate` again")

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        known = set(SEQUENCE_FEATURES) | set(EARLIER_SEQUENCE_FEATURES) | set(VERIFIED_FEATURES)
        if not (isinstance(self.features, list) and self.features and
                all(isinstance(f, str) and f in known for f in self.features)):
            raise bad("features", f"must list evidence names from {', '.join(sorted(known))}")
        n = len(self.features)
        for name, lim in (("mean", 1e6), ("std", 1e6), ("coef", 1e3)):
            v = getattr(self, name)
            if not (isinstance(v, list) and len(v) == n and all(number(x) and abs(x) <= lim for x in v)):
                raise bad(name, f"must be {n} finite numbers within +-{lim:g} (one per feature)")
        if not all(x > 0 for x in self.std):
            raise bad("std", "must be positive")
        for name in ("lo", "hi"):
            v = getattr(self, name)
            if not (isinstance(v, list) and len(v) in (0, n) and all(number(x) for x in v)):
                raise bad(name, f"must be empty or {n} finite numbers (one per feature)")
        if len(self.lo) != len(self.hi):
            raise bad("hi", "must have as many values as lo")
        if not (number(self.intercept) and abs(self.intercept) <= 1e3):
            raise bad("intercept", "must be a finite number within +-1000")
        for name in ("threshold", "target_precision"):
            v = getattr(self, name)
            if not (number(v) and 0.0 <= v <= 1.0):
                raise bad(name, f"is {str(v)[:40]!r}, must be a probability in [0, 1]")
        hood = self.neighbourhood
        if not (isinstance(hood, dict) and set(hood) <= {"radius_m", "frames"}
                and (number(hood.get("radius_m")) and hood["radius_m"] > 0 or hood.get("radius_m") is None)
                and (isinstance(hood.get("frames"), int) and hood["frames"] >= 0 or hood.get("frames") is None)):
            raise bad("neighbourhood", "must be {radius_m: metres > 0 or null, frames: whole number or null}")
        for name in ("sequence_length", "verify", "queries", "unknown_queries"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise bad(name, "must be a whole number >= 0")


#: A threshold must keep at least this many calibration answers above it: a precision measured on one or two
#: answers (reached by luck at the very top) promises nothing.
MIN_KNOWN = 10


def precision_threshold(p: np.ndarray, correct: np.ndarray, target: float, min_known: int = MIN_KNOWN,
                        floor: float = -math.inf) -> tuple[float | None, float, float]:
    """Scores [Q] and right/wrong [Q] -> (the lowest threshold, at least ``floor``, whose answers at or above it,
    at least ``min_known`` of them, reach ``target`` precision, or None; the precision there, or the best any such
    threshold reaches when none does (nan when there is no such threshold); the share of all queries answered right
    at or above it)."""
    order = np.argsort(-p, kind="stable")
    s, c = p[order], correct[order]
    prec = np.cumsum(c) / np.arange(1, len(c) + 1)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold counts every answer scoring >= it: the last of equal runs
    last &= np.arange(1, len(c) + 1) >= min(min_known, len(c))
    last &= s >= floor
    if not last.any():
        return None, float("nan"), 0.0
    ok = np.nonzero(last & (prec >= target))[0]
    if not len(ok):
        return None, float(prec[last].max()), 0.0
    i = int(ok[-1])
    return float(s[i]), float(prec[i]), float(np.cumsum(c)[i] / len(c))


#: The share of answers to unknown-place photos that 'known' must reject, besides the target precision: the issue's
#: own requirement for a robot (>= 0.95 rejected). The precision target alone is met by a threshold near 0 when the
#: known places' answers are nearly all right, and then lets unknown places through (measured: a Nordland-trained
#: ViT rejected 0.62 of unknown-place sequences at threshold 0.03; 0.90 with this).
REJECT_UNKNOWN = 0.95
#: ... reached with this confidence: the one-sided Clopper-Pearson lower bound of the share the threshold rejects
#: on the calibration's unknown-place answers must reach ``REJECT_UNKNOWN``. A threshold that rejects exactly 0.95
#: of them rejects about as often less as more of fresh ones (measured, Gardens Point sequences, two folds: 0.953 on
#: the calibration answers, 0.911 and 0.969 held out; with the bound 0.974 -> 0.969 and 0.990).
REJECT_CONFIDENCE = 0.9
_NEEDS_CALIBRATE = ("fitting a calibration needs scikit-learn and scipy, which this install lacks: pip install "
                    "'edgevpr[calibrate]' (using one needs numpy alone)")


def require_fitting() -> None:
    """Refuse in one line, before any work, when the libraries that fit a calibration are missing."""
    import importlib.util

    if importlib.util.find_spec("sklearn") is None or importlib.util.find_spec("scipy") is None:
        raise ValueError(_NEEDS_CALIBRATE)


def rejected_bound(rejected: int, total: int, confidence: float = REJECT_CONFIDENCE) -> float:
    """The one-sided ``confidence`` Clopper-Pearson lower bound of a share from ``rejected`` of ``total``."""
    try:
        from scipy.stats import beta
    except ImportError:
        raise ValueError(_NEEDS_CALIBRATE) from None

    return float(beta.ppf(1.0 - confidence, rejected, total - rejected + 1)) if rejected else 0.0


def unknown_floor(p_unknown: np.ndarray, share: float, confidence: float = REJECT_CONFIDENCE) -> float:
    """Probabilities of the answers to unknown-place photos [U] -> the lowest threshold below which enough of them
    fall that their share's lower bound (``rejected_bound``) reaches ``share``; above every one of them when even
    that cannot promise ``share`` (fewer than about 45 photos at 0.95); -inf when none need be rejected."""
    n = len(p_unknown)
    if share <= 0 or n == 0:
        return -math.inf
    need = next((r for r in range(math.ceil(share * n - 1e-9), n + 1) if rejected_bound(r, n, confidence) >= share),
                n)
    return float(np.nextafter(np.sort(p_unknown)[need - 1], math.inf))


def calibrate(features: np.ndarray, correct: np.ndarray, target_precision: float, neighbourhood: Neighbourhood,
              unknown: np.ndarray | None = None, names: tuple[str, ...] = FEATURES, refuse: bool = True,
              what: str = "calibration", reject_unknown: float = REJECT_UNKNOWN) -> Calibration:
    """Evidence [Q, F] (columns ``names``) and whether each top-1 is right [Q] -> a fitted Calibration.
    ``unknown`` [Q]: which answers are to photos of places the map does not hold (all wrong); the threshold also
    rejects enough of them that the lower bound of the share rejected reaches ``reject_unknown`` (``unknown_floor``).

    Logistic regression (scikit-learn, L2, C = 1) on standardised features: monotone in each feature's learned
    direction, smooth, and fitted well by a few hundred answers, where isotonic regression over several features
    would need far more. Refuses in one line when the answers hold only one class or when no threshold reaches the
    target precision (nothing is written then); ``refuse=False`` (benchmarks) returns the fit with an infinite
    threshold (nothing 'known') and the best precision reached instead. ``what`` names the answers in errors
    ("calibration", "sequence")."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ValueError(_NEEDS_CALIBRATE) from None

    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"precision {target_precision}: must be in (0, 1]")
    if not 0.0 <= reject_unknown <= 1.0:
        raise ValueError(f"reject-unknown {reject_unknown}: must be in [0, 1]")
    x, y = np.asarray(features, np.float64), np.asarray(correct, bool)
    unknown = np.zeros(len(y), bool) if unknown is None else np.asarray(unknown, bool)
    if len(x) < 10:
        raise ValueError(f"{len(x)} {what} answers: need at least 10")
    if y.all() or not y.any():
        raise ValueError(f"all {len(y)} {what} answers are {'right' if y.all() else 'wrong'}: a confidence "
                         "needs both (add photos of places outside the map with --unknown, or queries the model gets "
                         "right)")
    x = np.where(np.isfinite(x), x, np.nanmin(np.where(np.isfinite(x), x, np.inf), axis=0))
    mean, std = x.mean(0), x.std(0) + 1e-9
    lr = LogisticRegression(C=1.0, max_iter=1000).fit((x - mean) / std, y)
    p = lr.predict_proba((x - mean) / std)[:, 1]
    floor = unknown_floor(p[unknown], reject_unknown)
    threshold, reached, recall = precision_threshold(p, y, target_precision, floor=floor)
    if threshold is None and not refuse:
        threshold = math.inf
    elif threshold is None:
        also = f" with {reject_unknown} of the {int(unknown.sum())} unknown-place answers rejected" \
            if np.isfinite(floor) else ""
        best = f"at most {reached:.3f}" if math.isfinite(reached) else \
            f"no threshold that high keeps {MIN_KNOWN} answers"
        raise ValueError(f"target precision {target_precision}{also} cannot be reached on these {len(y)} {what} "
                         f"answers ({int(y.sum())} right): {best}; lower --precision"
                         f"{' or --reject-unknown' if also else ''} or add validation queries")
    ece, table = expected_calibration_error(p, y)
    rejected = int((p[unknown] < threshold).sum())
    return Calibration(threshold, float(target_precision), reached, recall, int(len(y)), asdict(neighbourhood),
                       list(names), mean.tolist(), std.tolist(), lr.coef_[0].tolist(), float(lr.intercept_[0]),
                       int(unknown.sum()), ece, float(np.mean((p - y) ** 2)), table,
                       reject_unknown=float(reject_unknown),
                       unknown_rejected=float(rejected / unknown.sum()) if unknown.any() else float("nan"),
                       unknown_rejected_bound=rejected_bound(rejected, int(unknown.sum())) if unknown.any()
                       else float("nan"), lo=x.min(0).tolist(), hi=x.max(0).tolist())
