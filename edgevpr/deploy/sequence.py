"""Sequence matching over any model's descriptors: pure functions of similarities, no model and no I/O (numpy only).

* ``seqslam``: offline SeqSLAM-style search (Milford & Wyeth 2012) over a whole query stream: each row of the
  similarity matrix S [Q, N] (queries in capture order, database in route order) is normalised (``how``, default
  ``row-z``: minus its mean, over its std, over the whole database; SeqSLAM's local contrast within +-``window``
  database frames is ``local``: it erases the true peak where neighbouring frames look alike, and was the default
  until benchmarks/sequence_norm.py chose row z-scores on validation places of both map kinds), then for every
  query i and database frame j the straight trajectories ending at (i, j) with a velocity in
  ``velocities`` (database frames per query frame) are scored by their mean normalised similarity over the last
  ``length`` queries; the best trajectory gives the match of query i. Trajectories never leave the database route
  they end on (``db_segments``: a route made of several traversals, or a looped one cut into segments) and never
  reach back before the start of the query sequence (``q_starts``: where each query sequence begins; shorter
  trajectories are used at a sequence's start).
* ``SequenceFilter``: an online causal filter for live use, a discrete Bayes (HMM forward) filter over database
  positions: predict by a motion model (advance by ``velocities`` frames, each equally likely, within a segment;
  with probability ``teleport`` jump anywhere, so a wrong start is recovered from), update by the likelihood
  exp(z / temperature), z the query's similarities standardised over the database (minus their mean, over their
  std: the same temperature then suits any model's similarity scale). It returns the most probable position and
  its probability (a confidence). The default temperature was chosen on validation places (benchmarks/sequence.py).
"""

from __future__ import annotations

import numpy as np


def local_contrast(s: np.ndarray, window: int = 10) -> np.ndarray:
    """S [Q, N] -> each entry normalised by the mean and std of its row within +-window database frames."""
    q, n = s.shape
    c = np.cumsum(np.pad(s, ((0, 0), (1, 0))), axis=1)
    c2 = np.cumsum(np.pad(s * s, ((0, 0), (1, 0))), axis=1)
    lo = np.clip(np.arange(n) - window, 0, n)
    hi = np.clip(np.arange(n) + window + 1, 0, n)
    cnt = (hi - lo).astype(np.float64)
    mean = (c[:, hi] - c[:, lo]) / cnt
    var = np.maximum((c2[:, hi] - c2[:, lo]) / cnt - mean * mean, 0.0)
    return (s - mean) / (np.sqrt(var) + 1e-6)


def row_z(s: np.ndarray) -> np.ndarray:
    """S [Q, N] -> each row standardised over the whole database (minus its mean, over its std): removes a query's
    overall similarity level (night frames score lower everywhere) without touching the shape of its row."""
    return (s - s.mean(axis=1, keepdims=True)) / (s.std(axis=1, keepdims=True) + 1e-6)


#: the local window (+- frames) of ``local-mix``
LOCAL_WINDOW = 5


def local_mix(s: np.ndarray, window: int = LOCAL_WINDOW) -> np.ndarray:
    """S [Q, N] -> a quarter of ``row_z`` plus three quarters of ``local_contrast`` over +-window frames: the
    normalisation of maps made of long look-alike stretches (``map_normalisation``)."""
    return 0.25 * row_z(s) + 0.75 * local_contrast(s, window)


#: Per-row normalisations of the similarity matrix before the trajectory search (each acts on one row alone, so a
#: live stream normalises each frame once).
NORMALISATIONS = {"none": lambda s, window: s, "row-z": lambda s, window: row_z(s),
                  "local": lambda s, window: local_contrast(s, window),
                  "local-mix": lambda s, window: local_mix(s)}  # a fixed recipe: its window is LOCAL_WINDOW
SEQSLAM_VELOCITIES = (0.8, 0.9, 1.0, 1.1, 1.25)
#: the normalisation of a map whose frames decorrelate within a few frames, and of ``seqslam`` given no map
DEFAULT_NORMALISATION = "row-z"
#: route lags measured by ``route_coherence`` (frames)
PROFILE_LAGS = 30
#: database images probed for the profile (a random, seeded sample on larger maps)
PROFILE_PROBES = 1000
#: local contrast suits a map whose frames still look this much alike at the local window's edge (``route_coherence``)
COHERENCE_MIN = 0.4


def route_coherence(similarities, descriptors, segments: np.ndarray, probes: int = PROFILE_PROBES,
                    seed: int = 0, window: int = LOCAL_WINDOW) -> tuple[float, list[float]]:
    """How far along its route a map keeps looking like itself, label-free: probed database images
    (``descriptors(ids) -> [B, D]``) are compared with the whole map (``similarities(desc) -> [B, N]``), each row
    z-scored over the map; the mean z of frame i+k, for k = 1..PROFILE_LAGS frames further along the same route
    segment (``segments`` [N]), is the map's self-similarity profile -> (coherence: the profile at the local
    window's edge, k = ``window``, over the profile at k = 1; the profile [PROFILE_LAGS])."""
    seg = np.asarray(segments)
    n = len(seg)
    probe = np.arange(n) if n <= probes else np.sort(np.random.default_rng(seed).choice(n, probes, replace=False))
    total, count = np.zeros(PROFILE_LAGS), np.zeros(PROFILE_LAGS)
    lags = np.arange(1, PROFILE_LAGS + 1)
    for a in range(0, len(probe), 256):
        batch = probe[a:a + 256]
        z = row_z(np.asarray(similarities(descriptors(batch)), np.float64))
        for r, i in enumerate(batch):
            j = i + lags
            ok = (j < n) & (seg[np.minimum(j, n - 1)] == seg[i])
            total[ok] += z[r, j[ok]]
            count[ok] += 1
    profile = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    coherence = profile[window - 1] / profile[0] if profile[0] > 0 else float("nan")
    return float(coherence), [float(x) for x in profile]


def map_normalisation(coherence: float) -> str:
    """A map's coherence (``route_coherence``) -> the sequence normalisation that suits it: ``local-mix`` when its
    frames still look alike at the local window's edge (coherence >= ``COHERENCE_MIN``): a query's similarity then
    carries the level of the look-alike stretch it is in, which local contrast removes, leaving the place's own
    peak (Nordland, every frame or every second: coherence 0.60-0.68, sequence R@1 up to +0.17 over row z-scores);
    else ``row-z``: where the map decorrelates within the window, the true peak dominates the window's spread and
    contrast flattens it (Gardens Point: 0.20-0.35, R@1 down by up to 0.30 with local contrast). Unmeasurable
    (a map shorter than the window): ``row-z``. benchmarks/sequence_norm.py."""
    return "local-mix" if coherence >= COHERENCE_MIN else DEFAULT_NORMALISATION


def normalise(s: np.ndarray, how: str = DEFAULT_NORMALISATION, window: int = 10) -> np.ndarray:
    """S [Q, N] float -> normalised [Q, N] float64 (``NORMALISATIONS``)."""
    if how not in NORMALISATIONS:
        raise ValueError(f"sequence normalisation {how!r}: choose from {', '.join(NORMALISATIONS)}")
    return NORMALISATIONS[how](np.asarray(s, np.float64), window)


def seqslam(s: np.ndarray, length: int = 10, velocities: tuple[float, ...] = SEQSLAM_VELOCITIES,
            window: int = 10, db_segments: np.ndarray | None = None,
            q_starts: list[int] | None = None, how: str = DEFAULT_NORMALISATION) -> tuple[np.ndarray, np.ndarray]:
    """Similarities [Q, N] -> (best database frame [Q], its sequence score [Q]) by sequence search."""
    q, n = s.shape
    seg = np.zeros(n, np.int64) if db_segments is None else np.asarray(db_segments)
    starts = sorted(set([0, *(q_starts or [])]))
    seq_start = np.zeros(q, np.int64)
    for a in starts:
        seq_start[a:] = a
    norm = normalise(s, how, window)
    best_j, best_score = np.zeros(q, np.int64), np.full(q, -np.inf)
    for i in range(q):
        best_j[i], best_score[i] = trajectory_search(norm[seq_start[i]:i + 1], length, velocities, seg)
    return best_j, best_score


def trajectory_lines(n: int, steps: int, velocities: tuple[float, ...], seg: np.ndarray) -> list:
    """The straight trajectories over ``steps`` query frames ending at each of ``n`` database frames: per velocity
    (and, for a fractional one, sub-frame phase: its line need not pass through an integer frame at the newest
    query) the database frame at each step [steps, n] int32 (step 0 = the newest query) and which ends keep the
    whole line inside the database and inside the end's route segment ``seg`` [n] bool."""
    js = np.arange(n)
    back = np.arange(steps)[:, None]
    out = []
    for v in velocities:
        for phase in ((0.0,) if float(v).is_integer() else (-1 / 3, 0.0, 1 / 3)):
            jj = np.floor(js + phase - back * v + 0.5).astype(np.int64)
            ok = ((jj >= 0) & (jj < n)).all(0)
            jj = np.clip(jj, 0, n - 1)
            ok &= (seg[jj] == seg).all(0)
            out.append((jj.astype(np.int32), ok))
    return out


def trajectory_scores(norm: np.ndarray, length: int, velocities: tuple[float, ...], seg: np.ndarray,
                      lines: list | None = None) -> np.ndarray:
    """Normalised similarities [T, N] of one sequence's frames so far (the newest last) -> per database frame j the
    mean score of the best straight trajectory over the last min(length, T) frames that ends at j [N] (-inf where
    none fits inside j's route segment). ``lines``: ``trajectory_lines`` for these sizes, when the caller keeps
    them (a live tracker does). Its cost depends on ``length``, not on T, so a live stream pays the same for every
    frame: one gather of [steps, N] per velocity and phase."""
    t, n = norm.shape
    steps = min(length, t)
    rows = (t - 1 - np.arange(steps))[:, None]
    best = np.full(n, -np.inf)
    for jj, ok in lines if lines is not None else trajectory_lines(n, steps, velocities, seg):
        np.maximum(best, np.where(ok, norm[rows, jj].sum(0) / steps, -np.inf), out=best)
    return best


def trajectory_search(norm: np.ndarray, length: int, velocities: tuple[float, ...],
                      seg: np.ndarray) -> tuple[int, float]:
    """Normalised similarities [T, N] -> (best database frame for the newest frame, its score): the argmax of
    ``trajectory_scores``."""
    score = trajectory_scores(norm, length, velocities, seg)
    j = int(np.argmax(score))
    return j, float(score[j])


#: A sequence answer is 'known' only when its best trajectory beats the best over every reordering of the same frames
#: by more than this (mean row-normalised similarity; ``order_gain``): the frames' own order must be the best one,
#: by a little. Chosen by benchmarks/order_gain.py on tuning streams (the smallest value passing at most 5% of a
#: foreign stream at L = 10) and judged on held-out ones (benchmarks/results/order_gain.md).
ORDER_GAIN_MIN = 0.05
#: The reorderings of a sequence's frames the order test scores against: the reversal and fixed shuffles, this many
#: in all (fewer when the frames have fewer distinct orders).
ORDER_REORDERINGS = 10


def reorderings(steps: int, count: int = ORDER_REORDERINGS) -> list[np.ndarray]:
    """The orders of ``steps`` frames the order test compares with [count][steps]: the reversal first, then
    shuffles from a fixed seed (the same for every call: a deterministic test), never the frames' own order."""
    if steps < 2:
        return []
    rng, seen = np.random.default_rng(steps), {tuple(range(steps))}
    out = []
    for order in [np.arange(steps)[::-1], *(rng.permutation(steps) for _ in range(8 * count))]:
        if tuple(order) not in seen and len(out) < count:
            seen.add(tuple(order))
            out.append(np.asarray(order))
    return out


def order_gain(norm: np.ndarray, best: float, length: int, seg: np.ndarray, lines: list | None = None,
               velocities: tuple[float, ...] = SEQSLAM_VELOCITIES) -> float:
    """A test of temporal order, label-free and with its own null: the best trajectory score ``best`` of the last
    ``length`` frames [T, N] (normalised rows, newest last) minus the best score of the same frames in any of
    ``reorderings`` (the reversal and fixed shuffles). A right match moves along the route with the frames, so
    every other order breaks its trajectory; a match that stays on one image while the frames change (a hub, a
    static match, a repeated frame) or a foreign stream whose best trajectory is chance scores about as well in
    another order: gain <= 0. Against the reversal alone, foreign streams on a 100-image map passed 0.25 in 13%
    of answers (Nordland winter vs Gardens Point, ``pixels-patchnorm``; benchmarks/results/confidence_transfer.md
    has the figures against every order). ``lines``: ``trajectory_lines`` for
    min(T, length) rows when the caller keeps them."""
    rows = norm[-length:]
    other = -np.inf
    for order in reorderings(len(rows)):
        t = trajectory_scores(rows[order], length, velocities, seg, lines)
        t = t[np.isfinite(t)]
        if len(t):
            other = max(other, float(t.max()))
    return float(best - other) if np.isfinite(other) else float(best)


class SequenceFilter:
    """Online discrete Bayes filter over N database positions (see the module notes)."""

    def __init__(self, n: int, velocities: tuple[int, ...] = (0, 1, 2), teleport: float = 0.05,
                 temperature: float = 2.0, db_segments: np.ndarray | None = None) -> None:
        self.n, self.velocities, self.teleport, self.t = n, velocities, teleport, temperature
        self.seg = np.zeros(n, np.int64) if db_segments is None else np.asarray(db_segments)
        self.belief = np.full(n, 1.0 / n)

    def predict(self) -> np.ndarray:
        moved = np.zeros(self.n)
        for v in self.velocities:
            src = np.arange(self.n - v) if v >= 0 else np.arange(-v, self.n)
            dst = src + v
            same = self.seg[src] == self.seg[dst]
            np.add.at(moved, dst[same], self.belief[src[same]] / len(self.velocities))
        moved /= max(moved.sum(), 1e-300)
        return (1 - self.teleport) * moved + self.teleport / self.n

    def update(self, similarity: np.ndarray) -> tuple[int, float]:
        """One query's similarities [N] -> (most probable database frame, its probability)."""
        s = np.asarray(similarity, np.float64)
        z = (s - s.mean()) / (s.std() + 1e-12)
        like = np.exp((z - z.max()) / self.t)
        b = self.predict() * like
        self.belief = b / b.sum()
        j = int(np.argmax(self.belief))
        return j, float(self.belief[j])
