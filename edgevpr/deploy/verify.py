"""Geometric verification re-ranking of the top-K candidates (torch-free: OpenCV and numpy).

The spatial verification of hloc and Patch-NetVLAD, with weight-free parts: SIFT keypoints (at most ``features`` per
image, 1000 by default, on the image resized to ``max_side`` px) described as RootSIFT (L1-normalised, square-
rooted: Arandjelovic and Zisserman 2012, better matching than raw SIFT at no cost), mutual nearest neighbours (a
match must be each descriptor's nearest in both directions) passing Lowe's ratio test at 0.8 (hloc's SIFT matcher),
and a fundamental matrix fitted by OpenCV's USAC MAGSAC++ (any rigid scene seen from two viewpoints; a homography
would assume a plane). Its inliers are the evidence. A model's own local features can stand in for SIFT
(``patch_features``: a ViT's patch tokens or a CNN's stride-16 feature map, torch or a CNN's ONNX export; mutual
check alone, fitted at 0.5 cell): they verify where SIFT finds nothing (64x32 frames) and cost about half
of its matching, MAGSAC++ included (``verifier_for``, ``--verify-with``).

Re-ranking: the top-K candidates are reordered by ``similarity + weight * log(1 + inliers)`` (a fusion: similarity
still breaks ties between candidates with few inliers, and a handful of chance inliers cannot overturn a clear
descriptor match); candidates below K keep their order. Frames too small or too plain for local features (Nordland's
64x32 thumbnails have a few SIFT points) are not verified: when the query has fewer than ``min_features`` keypoints
the answer keeps its similarity order and says why. Database features are computed on first use and kept (a bounded
cache), so a live stream pays for each database image once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .. import threads

#: Lowe's ratio test on top of the mutual check (hloc's SIFT matcher: mutual nearest neighbours, ratio 0.8)
RATIO = 0.8
#: Defaults, chosen on validation places (benchmarks/verification.py).
DEFAULT_K = 10
DEFAULT_WEIGHT = 0.05
#: With a model's own local features (benchmarks/verification_tokens.py, chosen with a ViT's patch tokens on
#: Nordland 1500-1999 and Gardens Point night 60-79, places the measured ViT never trained on): K 25, w 0.5, mutual
#: check alone, 0.5 cell. For the ImageNet CNN's stride-16 map the same validation sets put them 0.002 below its
#: best (w 1.0): one setting for both.
TOKEN_K = 25
TOKEN_WEIGHT = 0.5
#: With ALIKED + LightGlue (benchmarks/verification_learned.py, chosen on Gardens Point night 0-49: the best R@1,
#: 0.96 at K = 10 for w 0.1, 0.5 and 2.0, then the fewest pairs matched): w 0.5, which makes an early stop safe, at
#: 170 inliers (one more than any wrong candidate had there): 0.81 of the pairs matched on validation
LEARNED_WEIGHT = 0.5
LEARNED_CERTAIN = 170


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ValueError("geometric verification needs OpenCV, which this install lacks: pip install "
                         "'edgevpr[verify]' (opencv-python-headless)") from None
    if threads.current():
        cv2.setNumThreads(threads.current())
    return cv2


@dataclass
class Features:
    """Keypoints [N, 2] (pixels of the resized image) and descriptors [N, C] float32 (RootSIFT: C = 128; a model's
    own local features: their cells, ``patch_features``; learned: ``learned.LearnedLocal``), and the (width, height)
    they were found in where a matcher needs it (LightGlue normalises keypoints by it)."""

    xy: np.ndarray
    desc: np.ndarray
    size: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return int(self.xy.nbytes + self.desc.nbytes)


def local_features(img: Image.Image, max_side: int = 640, features: int = 1000) -> Features:
    """An RGB image -> its SIFT keypoints and RootSIFT descriptors."""
    cv2 = _cv2()
    g = np.asarray(img.convert("L"))
    scale = max_side / max(g.shape)
    if scale < 1:
        g = cv2.resize(g, (round(g.shape[1] * scale), round(g.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    kps, desc = cv2.SIFT_create(nfeatures=features).detectAndCompute(g, None)
    if desc is None or not kps:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    desc = desc / (np.abs(desc).sum(1, keepdims=True) + 1e-7)
    return Features(np.array([k.pt for k in kps], np.float32), np.sqrt(desc).astype(np.float32))


def patch_features(tokens: np.ndarray, grid: tuple[int, int]) -> Features:
    """A model's own local features [H*W, C] (a ViT's patch tokens, none pruned, or a CNN's feature map cells;
    row-major in ``grid`` = (H, W)) -> Features at the cell centres (in cell units) with the L2-normalised vectors
    as descriptors, for ``inliers(..., threshold_px=0.5, ratio=1.0)`` (a mutual check alone: a coarse grid has few
    look-alike cells)."""
    h, w = grid
    if len(tokens) != h * w:
        raise ValueError(f"{len(tokens)} patch tokens for a {h}x{w} grid: token verification needs every patch")
    k = np.arange(h * w)
    desc = tokens / (np.linalg.norm(tokens, axis=1, keepdims=True) + 1e-12)
    return Features(np.stack([k % w, k // w], 1).astype(np.float32) + 0.5, desc.astype(np.float32))


def mutual_matches(a: np.ndarray, b: np.ndarray, ratio: float = RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length descriptors a [Na, C] and b [Nb, C] (Nb >= 2) -> the indices (into a [M], into b [M], ascending
    in a) of the pairs that are each other's nearest neighbour and pass Lowe's ratio test on L2 distances (ratio 1:
    the mutual check alone). Nearest by one matrix product (for unit vectors the largest dot product is the smallest
    L2 distance, sqrt(2 - 2 dot)): the pairs of OpenCV's brute-force L2 matcher (knnMatch both ways; tested equal on
    real pairs) at a seventh of its time for a CNN map and a quarter for SIFT."""
    s = a @ b.T
    nn, back = s.argmax(1), s.argmax(0)
    keep = back[nn] == np.arange(len(nn))
    if ratio < 1:
        top2 = -np.partition(-s, 1, axis=1)[:, :2]
        d = np.sqrt(np.maximum(2.0 - 2.0 * top2, 0.0))
        keep &= d[:, 0] < ratio * d[:, 1]
    i = np.flatnonzero(keep)
    return i, nn[i]


def matches(a: Features, b: Features, ratio: float = RATIO,
            matcher: Callable[[Features, Features], tuple[np.ndarray, np.ndarray]] | None = None,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Two images' features -> matched indices (into a [M], into b [M]): mutual nearest neighbours passing the ratio
    test, or ``matcher``'s (a learned matcher: ``learned.LearnedLocal.match``). Empty when either has < 8."""
    if len(a.desc) < 8 or len(b.desc) < 8:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return mutual_matches(a.desc, b.desc, ratio) if matcher is None else matcher(a, b)


def fit(p1: np.ndarray, p2: np.ndarray, threshold_px: float = 3.0) -> int:
    """Matched points p1 [M, 2], p2 [M, 2] -> how many a MAGSAC++ fundamental matrix explains (0 below 8)."""
    cv2 = _cv2()
    if len(p1) < 8:
        return 0
    try:
        _, mask = cv2.findFundamentalMat(p1, p2, cv2.USAC_MAGSAC, threshold_px, 0.999, 2000)
    except cv2.error:  # degenerate correspondences (e.g. all on a grid line): no model, no inliers
        return 0
    return 0 if mask is None else int(mask.sum())


def inliers(a: Features, b: Features, threshold_px: float = 3.0, ratio: float = RATIO,
            matcher: Callable[[Features, Features], tuple[np.ndarray, np.ndarray]] | None = None) -> int:
    """Matches of two images (``matches``) that a MAGSAC++ fundamental matrix explains (``fit``)."""
    i, j = matches(a, b, ratio, matcher)
    return fit(a.xy[i], b.xy[j], threshold_px)


@dataclass
class Verifier:
    """Re-ranks a query's top-``k`` candidates by geometric verification (see the module notes)."""

    k: int = DEFAULT_K
    weight: float = DEFAULT_WEIGHT
    max_side: int = 640
    features: int = 1000
    min_features: int = 50
    #: database features kept for later queries (least recently used dropped first), bounded in bytes because their
    #: size differs 6x by kind: a CNN's 14x14x112 map is 89 KB (256 MB: ~2900 images), 1000 SIFT points 520 KB
    #: (~500 images)
    cache_mb: float = 256.0
    #: the local features of an image: None = SIFT; else e.g. a model's patch tokens (``patch_features``), matched
    #: with ``ratio`` and fitted at ``threshold_px`` in their own units, and called ``local_name`` in answers
    local: Callable[[Image.Image], Features] | None = None
    local_name: str = "patch tokens"
    ratio: float = RATIO
    threshold_px: float = 3.0
    #: verify only answers whose unverified ``margin_z`` is below this (None: every answer; ``--verify-below``)
    gate: float | None = None
    #: stop verifying the candidates (taken in similarity order) once one has this many inliers: no look-alike on
    #: validation had as many (None: verify all K). Safe when weight * log(1 + certain) exceeds any similarity gap
    #: (cosines differ by < 2), which ``__post_init__`` checks.
    certain: int | None = None
    #: a learned matcher (features -> matched index pairs) in place of mutual nearest neighbours
    matcher: Callable[[Features, Features], tuple[np.ndarray, np.ndarray]] | None = None
    #: the database's stored features (``index features``): image id -> (xy, desc, size) or None, and their key
    store: Callable[[int], tuple | None] | None = None
    store_kind: str | None = None
    #: seconds spent on the query's and the candidates' features, on matching + fitting, and counts
    timing: dict = field(default_factory=lambda: {"features_s": 0.0, "match_fit_s": 0.0, "queries": 0, "pairs": 0})
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _cached_bytes: int = field(default=0, repr=False)

    @classmethod
    def with_tokens(cls, tokens: Callable[[Image.Image], Features], k: int = TOKEN_K,
                    name: str = "patch tokens") -> Verifier:
        """A verifier on a model's own local features (``tokens``: image -> ``patch_features``: a ViT's patch
        tokens or a CNN's feature map, called ``name``), with the settings chosen for them."""
        return cls(k=k, weight=TOKEN_WEIGHT, min_features=8, local=tokens, local_name=name, ratio=1.0,
                   threshold_px=0.5)

    @classmethod
    def with_learned(cls, learned, k: int = DEFAULT_K, weight: float | None = None) -> Verifier:
        """A verifier on learned features and LightGlue (``learned.LearnedLocal``), with the settings chosen for
        them (``LEARNED_WEIGHT``, and the early stop ``LEARNED_CERTAIN`` where that weight makes it safe)."""
        w = LEARNED_WEIGHT if weight is None else weight
        return cls(k=k, weight=w, max_side=learned.max_side, features=learned.max_keypoints, min_features=8,
                   local=learned.extract, local_name=learned.name, ratio=1.0, matcher=learned.match,
                   store_kind=learned.key, certain=LEARNED_CERTAIN if w * np.log1p(LEARNED_CERTAIN) > 2.0 else None)

    @property
    def kind(self) -> str:
        return "sift" if self.local is None else self.local_name

    @property
    def method(self) -> str:
        """What it does, in one line (for reports)."""
        features = "SIFT (RootSIFT) + mutual NN + ratio 0.8" if self.local is None else \
            f"{self.local_name} ({self.features} keypoints at {self.max_side} px)" if self.matcher is not None else \
            f"the model's {self.local_name} + mutual NN{'' if self.ratio >= 1 else f' + ratio {self.ratio}'}"
        return f"{features} + MAGSAC++ F; similarity + {self.weight} log(1 + inliers)"

    def features_of(self, img: Image.Image) -> Features:
        return local_features(img, self.max_side, self.features) if self.local is None else self.local(img)

    def __post_init__(self) -> None:
        if self.certain is not None and not self.weight * np.log1p(self.certain) > 2.0:
            raise ValueError(f"verification: an early stop at {self.certain} inliers needs weight * log(1 + "
                             f"{self.certain}) > 2 (weight {self.weight}): an unverified candidate could overtake it")
        if not 1 <= self.k <= 1000:
            raise ValueError(f"--verify {self.k}: must be between 1 and 1000 candidates")
        if not self.cache_mb >= 0:
            raise ValueError(f"verification cache {self.cache_mb} MB: must be >= 0")
        _cv2()

    def db_features(self, path: str, image_id: int | None = None) -> Features:
        """A database image's features: cached, else stored in the index (``store``, by ``image_id``), else
        computed from the image at ``path``."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        from ..data.images import load_image

        got = self.store(image_id) if self.store is not None and image_id is not None else None
        f = Features(*got) if got is not None else self.features_of(load_image(path))
        self._cache[path] = f
        self._cached_bytes += f.nbytes
        while self._cached_bytes > self.cache_mb * 2**20 and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return f

    def rerank(self, query: Image.Image, scores: np.ndarray, paths: list[str],
               features: Features | None = None, ids: list[int] | None = None) -> tuple[np.ndarray, dict]:
        """The similarity-ranked candidates (scores [M], database paths [M]) -> (new order [M]: the first
        min(k, M) re-ranked by fused score, the rest as they were; a record of what was done). ``features``: the
        query's, when its descriptor's pass already gave them (``Localizer.embed_local``); else computed here.
        ``ids``: the candidates' index ids [M], to read their stored features (``store``)."""
        n = min(self.k, len(paths))
        t0 = time.perf_counter()
        q = self.features_of(query) if features is None else features
        self.timing["queries"] += 1
        if len(q.desc) < self.min_features:
            self.timing["features_s"] += time.perf_counter() - t0
            return np.arange(len(paths)), {"verified": False, "reason": f"the query has {len(q.desc)} local "
                                           f"features (< {self.min_features}): too small or plain to verify"}
        self.timing["features_s"] += time.perf_counter() - t0
        counts, done = np.zeros(n, np.int64), n
        for c, p in enumerate(paths[:n]):  # in similarity order
            t0 = time.perf_counter()
            d = self.db_features(p, None if ids is None else ids[c])
            t1 = time.perf_counter()
            counts[c] = inliers(q, d, self.threshold_px, self.ratio, self.matcher)
            self.timing["features_s"] += t1 - t0
            self.timing["match_fit_s"] += time.perf_counter() - t1
            self.timing["pairs"] += 1
            if self.certain is not None and counts[c] >= self.certain:
                done = c + 1  # the rest keep 0 inliers: their fused score cannot reach this one's
                break
        fused = np.asarray(scores[:n], np.float64) + self.weight * np.log1p(counts)
        top = np.argsort(-fused, kind="stable")
        order = np.r_[top, np.arange(n, len(paths))]
        return order, {"verified": True, "features": self.kind, "candidates": n, "inliers": counts[top].tolist(),
                       "fused": fused[top].tolist(), "moved": bool(top[0] != 0),
                       **({"stopped_after": done} if done < n else {})}


#: what ``--verify-with`` accepts
KINDS = ("auto", "sift", "tokens", "aliked", "disk")


def verifier_for(model, transform, k: int, kind: str = "auto", knobs: dict | None = None,
                 lock: threading.Lock | None = None) -> Verifier:
    """A verifier of the top ``k`` for ``model`` (whose input ``transform`` makes [3, H, W] arrays) on ``kind``
    local features: "sift", "tokens" (the torch model's own: a ViT's patch tokens at every patch, a CNN's stride-16
    feature map), "aliked" or "disk" (learned features matched by LightGlue: ``learned``; needs torch) or "auto"
    (tokens when the model has them, else SIFT: measured better with a trained ViT and with the ImageNet CNN,
    benchmarks/results/verification_tokens.md and verification_cnn.md). ``lock``: held around the
    model's forward passes (a model shared between threads)."""
    from .embed import patch_tokens

    if kind not in KINDS:
        raise ValueError(f"--verify-with {kind}: must be one of {', '.join(KINDS)}")
    if kind == "sift":
        return Verifier(k=k)
    if kind in ("aliked", "disk"):
        from .learned import LearnedLocal

        return Verifier.with_learned(LearnedLocal(kind), k=k)

    def tokens(img: Image.Image) -> Features:
        with lock or contextlib.nullcontext():
            got = patch_tokens(model, transform.array(img)[None], knobs)
        return patch_features(got[0][0], got[1])

    probe = patch_tokens(model, np.zeros((1, 3, *transform.size), np.float32), knobs)
    if probe is None and kind == "tokens":
        raise ValueError(f"--verify-with tokens: model {model.name} has no local features of its own here (a torch "
                         "ViT or CNN, or a CNN's ONNX export, is needed)")
    if probe is None:
        return Verifier(k=k)
    vit = getattr(getattr(model, "backbone", None), "has_cls", False)  # else a CNN's map (torch or its export)
    return Verifier.with_tokens(tokens, k=k, name="patch tokens" if vit else "feature map")
