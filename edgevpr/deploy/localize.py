"""Localize photos against a place index: embed with the index's model (PyTorch or onnxruntime), search.

Torch is imported only for a PyTorch model: with an exported ``.onnx`` model this runs on numpy, PIL,
onnxruntime and faiss alone (``pip install "edgevpr[runtime]"``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import threading
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..integrity import check_finite, warn
from .decision import (
    DECISION_DEPTH,
    FEATURES,
    REJECT_UNKNOWN,
    SEQUENCE_FEATURES,
    VERIFIED_FEATURES,
    Calibration,
    GeoPrior,
    Neighbourhood,
    calibrate,
    evidence,
    position,
    steadiness,
    verified_evidence,
)
from .embed import embed, embed_with_local
from .index import Match, PlaceIndex, check_model, match_dicts, update_manifest
from .sequence import (
    DEFAULT_NORMALISATION,
    NORMALISATIONS,
    ORDER_GAIN_MIN,
    SEQSLAM_VELOCITIES,
    SequenceFilter,
    normalise,
    order_gain,
    trajectory_lines,
    trajectory_scores,
)


def open_model(spec: str | os.PathLike, device="cpu", int8: bool = False):
    """A VPRModel (named preset, config file, saved folder) or, for a ``.onnx`` file, an onnxruntime model."""
    from .onnx_model import OnnxModel, is_onnx

    if is_onnx(spec):
        if int8:
            raise ValueError(f"{spec}: --int8 applies to PyTorch ternary models; export with --int8 instead")
        return OnnxModel(spec).to(device)
    try:
        from ..models.model import load_model
    except ImportError as e:
        raise ValueError(f"model {spec}: a PyTorch model needs the full install (pip install edgevpr[full]: "
                         f"{e.name} is missing); the runtime install runs exported .onnx models") from None

    from ..utils import pick_device

    model = load_model(spec, pick_device(device))
    if int8:
        from ..models.ternary import TernaryLinear, to_int8

        if not any(isinstance(m, TernaryLinear) for m in model.modules()):
            raise ValueError(f"--int8: model {model.name} has no ternary layers")
        to_int8(model)
    return model


class Localizer:
    """Index + model, checked to belong together. Thread-safe (one forward at a time)."""

    def __init__(self, index: str | os.PathLike | PlaceIndex, model=None, mmap: bool = True,
                 device="cpu", verify: int = 0, exclude_sessions: list[str] = (), verify_with: str = "auto",
                 verify_below: float | None = None) -> None:
        """``verify`` > 0: geometric verification re-ranks each answer's top ``verify`` candidates
        (``deploy.verify``; needs the query images, so ``stream`` and ``localize`` apply it), on ``verify_with``
        local features: "sift", "tokens" (the torch model's own: a ViT's patch tokens, a CNN's stride-16 feature
        map), "aliked" or "disk" (learned, LightGlue; the database's features stored by ``index features`` are
        read, not recomputed) or "auto" (tokens when the model has them, else SIFT). ``verify_below``: verify only
        the answers whose unverified ``margin_z`` is below it (the adaptive gate; None: every answer).
        ``exclude_sessions``: answers come from the other sessions only (single frames and sequences)."""
        self.index = index if isinstance(index, PlaceIndex) else PlaceIndex.open(index, mmap=mmap)
        self.mmap, self.exclude_sessions = mmap, list(exclude_sessions)
        self._swap = threading.Lock()
        self.allowed = self._allowed(self.index)  # ids answers may come from (None: all)
        rec = self.index.model
        if model is None:
            if not rec.get("spec"):
                raise ValueError(f"{self.index.root}: the index does not record a loadable model; give --model")
            model = rec["spec"]
        self.model = open_model(model, device) if isinstance(model, (str, os.PathLike)) else model
        check_model(rec, self.model.name, self.model.fingerprint(), str(self.index.root))
        self.knobs = rec["knobs"]
        self._calibration("calibration"), self._calibration("sequence_calibration")  # refused here, not mid-stream
        self.transform = self.model.transform(tuple(rec["image_size"]))
        self._lock = threading.Lock()
        if verify:
            from .verify import verifier_for

            self.verifier = verifier_for(self.model, self.transform, verify, verify_with, self.knobs, self._lock)
            self.verifier.gate = verify_below
        else:
            self.verifier = None

    def _allowed(self, index: PlaceIndex) -> np.ndarray | None:
        if not self.exclude_sessions:
            return None
        allowed = np.setdiff1d(np.arange(len(index)), index.session_ids(self.exclude_sessions))
        if not len(allowed):
            raise ValueError(f"{index.root}: excluding {', '.join(self.exclude_sessions)} leaves no image")
        return allowed

    def refresh(self) -> tuple[PlaceIndex, np.ndarray | None]:
        """The index generation to answer from, and its allowed ids: when a writer (``index add``, ``remove``,
        ``pull``) has swapped in a new generation since the last call, it is opened (checked like any open, and
        refused if another model made it) and used from now on; one answer never mixes two generations (callers
        use what this returns for the whole answer). -> (index, allowed ids or None)."""
        with self._swap:
            if self.index.changed():
                new = PlaceIndex.open(self.index.root, mmap=self.mmap)
                check_model(new.model, self.model.name, self.model.fingerprint(), str(new.root))
                self.index, self.allowed = new, self._allowed(new)  # the old one closes when no answer holds it
            return self.index, self.allowed

    def embed(self, images: list[Image.Image], knobs: dict | None = None) -> np.ndarray:
        """RGB images -> descriptors [B, D] float32. ``knobs`` override the index's for these queries only
        (e.g. a lower keep_ratio for faster queries against a database embedded unpruned)."""
        return self.embed_arrays(np.stack([self.prepare(im) for im in images]), knobs, _names(images))

    def prepare(self, image: Image.Image) -> np.ndarray:
        """An RGB image -> the model's input [3, H, W] float32 (resized and normalised as the index's images were)."""
        return self.transform.array(image)

    def embed_arrays(self, x: np.ndarray, knobs: dict | None = None, names: list[str] | None = None) -> np.ndarray:
        """Prepared images [B, 3, H, W] -> descriptors [B, D] float32 (one forward at a time: thread-safe)."""
        return self.embed_local(x, knobs, names, local=False)[0]

    def embed_local(self, x: np.ndarray, knobs: dict | None = None, names: list[str] | None = None,
                    local: bool = True) -> tuple[np.ndarray, list]:
        """Prepared images [B, 3, H, W] -> (descriptors [B, D] float32; per image the query features this
        localizer's verifier needs when the same forward gave them (``embed.embed_with_local``: a CNN's map, an
        unpruned ViT's tokens), else None, and ``Verifier.rerank`` computes them itself). So a query verified on
        the model's own features costs one forward, not two. Only when ``knobs`` change nothing of the index's:
        the verifier reads every image at the index's knobs."""
        knobs = {**self.knobs, **{k: v for k, v in (knobs or {}).items() if v is not None}}
        own = local and self.verifier is not None and self.verifier.local is not None and knobs == self.knobs
        with self._lock:
            self.model.eval()
            d, feats = embed_with_local(self.model, x, knobs) if own else (embed(self.model, x, knobs), None)
        check_finite(d, names or [f"query {i}" for i in range(len(x))], self.model.name)
        if feats is None:
            return d, [None] * len(x)
        from .verify import patch_features

        return d, [patch_features(t, feats[1]) for t in feats[0]]

    def localize(self, images: list[Image.Image], k: int = 5, knobs: dict | None = None,
                 prior: GeoPrior | None = None) -> list[list[Match]]:
        """RGB images -> per image its top-k matches (within the GNSS ``prior`` when given)."""
        return [a.matches for a in self.answer_images(images, k, knobs, prior)]

    def answer_images(self, images: list[Image.Image], k: int = 5, knobs: dict | None = None,
                      prior: GeoPrior | None = None, names: list[str] | None = None) -> list[Answer]:
        """RGB images -> per image its ``answer`` (verified when on, the query's own features from its
        descriptor's forward: ``embed_local``). ``names``: the images' in errors (default: their file names)."""
        d, feats = self.embed_local(np.stack([self.prepare(im) for im in images]), knobs, names or _names(images))
        return self.answer(d, k, prior, images, features=feats)

    @property
    def calibration(self) -> Calibration | None:
        """The index's single-frame calibration; None (with a one-line warning) for one made by an earlier
        edgevpr."""
        return self._calibration("calibration")

    @property
    def sequence_calibration(self) -> Calibration | None:
        """The index's calibration of sequence answers (``calibrate --sequence L``), or None."""
        return self._calibration("sequence_calibration")

    def frame_calibration(self) -> Calibration | None:
        """The single-frame calibration when it applies to this localizer's answers (``_verified_alike``)."""
        return self._verified_alike(self.calibration)

    def _verified_alike(self, cal: Calibration | None) -> Calibration | None:
        """``cal`` when it applies to this localizer's answers: one fitted on verified answers (their
        ``log_inliers`` and ``inlier_margin``, and for sequences the verified frame top-1 of ``agree``) needs the
        same verification (K and features); None otherwise, with a one-line warning."""
        if cal is None or not cal.verify:
            return cal
        v = self.verifier
        if v is None or (v.k, v.kind) != (cal.verify, cal.verify_features):
            if not getattr(self, "_warned_verify", False):
                now = f"--verify {v.k} on {v.kind}" if v else "no --verify"
                warn(f"{self.index.root}: its calibration was fitted on answers verified with --verify {cal.verify} "
                     f"on {cal.verify_features}, not {now}: answers are uncalibrated (verify as it did, or run "
                     "`edgevpr calibrate` again)")
                self._warned_verify = True
            return None
        return cal

    def _calibration(self, key: str) -> Calibration | None:
        rec = self.index.manifest.get(key)
        if not rec:
            return None
        try:
            return Calibration.from_dict(rec, f"{self.index.root / 'manifest.json'}: field {key}")
        except ValueError as e:
            if "earlier edgevpr" not in str(e):
                raise  # a damaged or edited record is refused, never half-used
            if not getattr(self, "_warned", False):
                warn(str(e))
                self._warned = True
            return None

    def hood(self, hood: Neighbourhood | None = None) -> Neighbourhood:
        """The neighbourhood of a margin: ``hood``, else the calibration's, else 25 m or +-2 ids."""
        cal = self.calibration
        return hood or (Neighbourhood(**cal.neighbourhood) if cal else
                        Neighbourhood.default(self.index.coordinates()))

    def answer(self, desc: np.ndarray, k: int = 5, prior: GeoPrior | None = None,
               images: list[Image.Image] | None = None, hood: Neighbourhood | None = None,
               features: list | None = None) -> list[Answer]:
        """Descriptors [Q, D] -> per query its top-k matches and a decision (see ``decision``): position
        estimate, margin score, calibrated confidence and known/unknown. Searches ``DECISION_DEPTH`` deep to find
        the best match outside the top-1's neighbourhood. With a verifier and the query ``images``, the top
        candidates are re-ranked by geometric verification first, and the decision is made on the new order
        (``decision.verification`` records the inliers). ``hood``: the neighbourhood of the margin (default: the
        calibration's, else 25 m or +-2 ids). ``features``: per query its local features from ``embed_local``
        (None: the verifier computes them)."""
        index, allowed = self.refresh()
        ids = prior.ids(index.coordinates(), str(index.root)) if prior is not None else None
        if allowed is not None:
            ids = allowed if ids is None else np.intersect1d(ids, allowed)
        if ids is not None and len(ids) == 0:
            return [Answer([], {"known": False, "reason": "no database image within the prior's radius",
                                "searched": 0}) for _ in range(len(desc))]
        geo = (prior.lat, prior.lon, prior.radius_m) if prior is not None and prior.lat is not None else None
        scores, found = index.search_ids(desc, max(k, DECISION_DEPTH), ids, geo)
        checks: list[dict | None] = [None] * len(desc)
        coords, hood = index.coordinates(), self.hood(hood)
        if self.verifier is not None and images is not None:
            gate, kind = self.verifier.gate, self.verifier.store_kind
            if kind is not None:  # this generation's stored database features
                self.verifier.store = functools.partial(index.local_features, kind)
            for q, img in enumerate(images):
                if gate is not None:  # verify only the answers whose margin is not already clear
                    ok = found[q] >= 0
                    z = evidence(scores[q][ok], found[q][ok], coords, hood)["margin_z"]
                    if z >= gate:
                        checks[q] = {"verified": False, "reason": f"margin_z {z:.2f} >= --verify-below {gate:g}: "
                                     "clear without verification"}
                        continue
                n = int(min(self.verifier.k, (found[q] >= 0).sum()))
                rows = index.rows([int(i) for i in found[q, :n]])
                order, checks[q] = self.verifier.rerank(img, scores[q, :n], [rows[int(i)][0] for i in found[q, :n]],
                                                        features[q] if features else None, found[q, :n].tolist())
                scores[q, :n], found[q, :n] = scores[q, :n][order], found[q, :n][order]
        top = index.matches(scores[:, :k], found[:, :k])
        for matches, check in zip(top, checks, strict=True):  # verified candidates come in verified order
            for m, n in zip(matches, (check or {}).get("inliers", ()), strict=False):
                m.inliers = int(n)
        cal = self.frame_calibration()
        out = []
        for matches, sq, iq, check in zip(top, scores, found, checks, strict=True):
            sq, iq = sq[iq >= 0], iq[iq >= 0]
            ev = evidence(sq, iq, coords, hood, index.hubs(hood))
            if check is not None:
                ev |= verified_evidence(check, iq, coords, hood)
            c = cal if cal and all(f in ev for f in cal.features) else None  # verified evidence needs images
            said = c.decide(ev) if c else {"confidence": None, "known": None, "threshold": None}
            pos = position(sq, iq, coords, hood, max(k, DECISION_DEPTH)) if said["known"] is not False else None
            out.append(Answer(matches, {
                "position": pos, "score": ev["margin"], **said, "evidence": ev,
                "searched": len(index) if ids is None else len(ids),
                **({"verification": check} if check is not None else {})}))
        return out

    def localize_files(self, paths: list[str | os.PathLike], k: int = 5,
                       knobs: dict | None = None) -> tuple[list[list[Match]], list[float]]:
        """Per photo (loaded, embedded and searched one at a time, as a live query is): matches and ms."""
        from .inputs import Stream

        answers = list(self.stream(Stream(list(paths)), k, knobs))
        return [a.matches for a in answers], [a.ms for a in answers]

    def calibrate(self, frames, positives: list[set[str]], precision: float = 0.95,
                  hood: Neighbourhood | None = None, unknown_frames=(), sequence: int = 0,
                  method: str = "seqslam", reject_unknown: float = REJECT_UNKNOWN, progress: bool = False,
                  total: int | None = None) -> tuple[Calibration, Calibration | None]:
        """Validation frames (``inputs.Frame``, in capture order, every query set pooled) and, per frame, the
        database paths that count as right, plus ``unknown_frames``: photos of places the map does not hold (every
        answer to them is wrong) -> (single-frame Calibration, sequence Calibration or None) at the target
        ``precision`` (and ``reject_unknown`` of the unknown-place answers rejected at 90% confidence), recorded in the
        index together. With ``sequence`` L > 0 the frames are also tracked as sequences (each capture sequence on
        its own) and the sequence answers of every frame past the warm-up are calibrated on ``SEQUENCE_FEATURES``.
        Refused in one line (nothing written) when a target cannot be reached. ``progress``: a progress bar (rate;
        ETA when the number of frames, ``total``, is known)."""
        from tqdm.auto import tqdm

        hood = self.hood(hood)
        unknown = ((dataclasses.replace(f, sequence=f"unknown:{f.sequence}"), set()) for f in unknown_frames)
        pending: deque[set[str]] = deque()

        def tagged():  # each frame's positives travel beside it through the stream
            for f, good in itertools.chain(zip(frames, positives, strict=True), unknown):
                pending.append(good)
                yield f

        feats, right, seq_feats, seq_right, unknown_answer, seq_unknown = [], [], [], [], [], []
        names = VERIFIED_FEATURES if self.verifier else FEATURES
        self._warned_verify = True  # the calibration in place is being replaced: no word on whether it applies
        # one frame in memory at a time; answered as live queries are (verified when on)
        for a in tqdm(self.stream(tagged(), 1, sequence=sequence, method=method, hood=hood), desc="calibrate",
                      unit="frame", total=total, disable=not progress):
            good = pending.popleft()
            feats.append([a.decision["evidence"][name] for name in names])
            right.append(a.matches[0].path in good)
            unknown_answer.append(not good)
            if a.sequence is not None and not a.sequence["decision"]["warming_up"]:
                seq_feats.append([a.sequence["decision"]["evidence"][name] for name in SEQUENCE_FEATURES])
                seq_right.append(a.sequence["match"]["path"] in good)
                seq_unknown.append(not good)
        cal = calibrate(np.array(feats), np.array(right), precision, hood, unknown=np.array(unknown_answer),
                        names=names, reject_unknown=reject_unknown)
        seq = None
        if sequence:
            if not seq_feats:
                raise ValueError(f"--sequence {sequence}: no query set has more than {sequence - 1} frames, so no "
                                 "sequence answer is past its warm-up")
            seq = calibrate(np.array(seq_feats), np.array(seq_right), precision, hood, unknown=np.array(seq_unknown),
                            names=SEQUENCE_FEATURES, what="sequence", reject_unknown=reject_unknown)
            seq.sequence_length, seq.sequence_method = sequence, method
        for c in (cal, seq) if self.verifier else ():  # read verified answers: log_inliers, a sequence's agree
            if c is not None:
                c.verify, c.verify_features = self.verifier.k, self.verifier.kind
        self.index.manifest = update_manifest(self.index.root, calibration=cal.to_dict(),
                                              sequence_calibration=seq.to_dict() if seq else None)
        return cal, seq

    def tracker(self, length: int, method: str = "seqslam", hood: Neighbourhood | None = None) -> Tracker:
        """A sequence tracker over this index (see ``Tracker``), with the index's sequence calibration when it was
        made for this ``length`` and ``method``."""
        cal = self._verified_alike(self.sequence_calibration)
        if cal is not None and (cal.sequence_length, cal.sequence_method) != (length, method):
            if not getattr(self, "_warned_seq", False):
                warn(f"{self.index.root}: its sequence calibration was made for {cal.sequence_method} L="
                     f"{cal.sequence_length}, not {method} L={length}: sequence answers are uncalibrated (run "
                     f"`edgevpr calibrate --sequence {length}`)")
                self._warned_seq = True
            cal = None
        return Tracker(self.index, length, method, cal, self.hood(hood), self.allowed)

    def stream(self, source, k: int = 5, knobs: dict | None = None, prior: GeoPrior | None = None,
               sequence: int = 0, method: str = "seqslam", hood: Neighbourhood | None = None,
               live: bool | None = None, max_fps: float | None = None, realtime: bool = False):
        """A source -> a ``pipeline.Pipeline``: iterate it for one ``Answer`` per frame, as soon as that frame's
        decision exists (``name``, source ``time`` and latency ``ms`` set); its ``stats`` say what was read, answered
        and dropped. ``source``: a path or URL, a list of them (``inputs.Stream``: folders, lists, manifests,
        videos, cameras, streams) or any iterable of ``inputs.Frame`` in capture order (a generator that never ends
        is fine). With ``sequence`` > 0 each answer also carries the sequence answer over the frames so far
        (causal), which becomes its headline; a frame of another capture sequence starts the tracking afresh.
        ``live``/``max_fps``/``realtime``: see ``Pipeline``. The one streaming loop behind ``localize``, ``serve``
        and ``calibrate``."""
        from .inputs import Stream
        from .pipeline import Pipeline

        if isinstance(source, (str, os.PathLike)):
            source = Stream([source])
        elif isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
            source = Stream(list(source))
        return Pipeline(self, source, k, knobs, prior, sequence, method, live=live, max_fps=max_fps, hood=hood,
                        realtime=realtime)


def _names(images: list[Image.Image]) -> list[str]:
    return [getattr(im, "filename", "") or f"query {i}" for i, im in enumerate(images)]


class Sequences:
    """Sequence state over a stream of frames: one ``Tracker`` per capture sequence, started afresh when a frame of
    another sequence (video, folder, list) arrives; ``length`` 0: off."""

    def __init__(self, localizer: Localizer, length: int, method: str = "seqslam",
                 hood: Neighbourhood | None = None) -> None:
        self.loc, self.length, self.method, self.hood = localizer, length, method, hood
        self.tracker: Tracker | None = None
        self.current: str | None = None

    def push(self, frame, desc: np.ndarray, answer: Answer) -> Answer:
        """A frame, its descriptor [D] and single-frame answer -> the answer, with its sequence answer when on."""
        if self.length:
            if self.tracker is None or frame.sequence != self.current or self.tracker.index is not self.loc.index:
                # a new capture sequence, or a new index generation (ids renumbered): the tracking starts afresh
                self.tracker = self.loc.tracker(self.length, self.method, self.hood)
                self.current = frame.sequence
            answer.sequence = self.tracker.push(desc, answer.matches[0].id if answer.matches else None)
        return answer


@dataclass
class Answer:
    """One query's answer: ``matches`` (top-k, best first), ``decision`` (see ``Localizer.answer``) and, in a
    sequence, ``sequence`` (see ``Tracker.push``), whose answer is then the headline. From a stream also the
    frame's ``name``, its ``time`` on the source's clock (None: the source has none) and the latency ``ms`` from
    reading the frame to its answer."""

    matches: list[Match]
    decision: dict
    sequence: dict | None = None
    name: str = ""
    time: float | None = None
    ms: float | None = None

    def headline(self) -> dict:
        """The answer to act on: {"source": "sequence" or "frame", "match" (a match dict, or None), "decision"}.
        The sequence answer when a sequence is on (warming up until it has its L frames: never known then), else
        the single frame's top-1."""
        if self.sequence is not None:
            return {"source": "sequence", "match": self.sequence["match"], "decision": self.sequence["decision"]}
        return {"source": "frame", "match": match_dicts(self.matches[:1])[0] if self.matches else None,
                "decision": self.decision}

    def to_dict(self) -> dict:
        return {"headline": self.headline(), "matches": match_dicts(self.matches), "decision": self.decision,
                **({"sequence": self.sequence} if self.sequence is not None else {})}

    def to_record(self) -> dict:
        """The answer as one line of ``localize --json-lines`` (``SCHEMA_VERSION``, the JSON Schema in
        edgevpr/schemas/localize.schema.json): strict JSON, so a number that is not finite (an order gain the
        filter does not measure) is null and numpy scalars are plain numbers."""
        return _plain({"schema_version": SCHEMA_VERSION, "type": "frame", "frame": self.name, "time": self.time,
                       "ms": self.ms, **self.to_dict()})


#: the version of ``Answer.to_record`` and the summary line of ``localize --json-lines``: raised when a field
#: changes meaning or goes away (new fields may appear within a version)
SCHEMA_VERSION = 1


def _plain(x):
    """A nest of dicts, lists, numpy scalars and arrays -> the same in plain JSON types, non-finite floats -> None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    return x if x is None or isinstance(x, str) else str(x)


class Tracker:
    """Sequence matching over a live stream against an index (causal: an answer uses only frames up to it).

    ``seqslam``: the last ``length`` frames' similarity rows are searched as ``sequence.seqslam`` does for its
    newest query; since that search only looks back, this equals offline ``seqslam`` over the whole stream at
    every frame (tested). ``filter``: the Bayes filter ``sequence.SequenceFilter`` (``length``: its warm-up), whose
    ``probability`` is the posterior mass of the chosen position. Database route segments come from
    ``PlaceIndex.segments`` (folders, coordinate jumps).

    Each sequence answer carries a decision like a single frame's: the position estimate from the best trajectory
    ends in the match's neighbourhood, the evidence (``decision.evidence`` over the ranking of trajectory scores,
    with ``margin_z`` and ``hub``, plus ``order_gain``: ``sequence.order_gain``, the frames' own order against every
    other order of them, NaN for the filter; and, for reading only, ``agree``: whether the single frame's top-1 lies
    in the sequence match's neighbourhood, and ``steady``: ``decision.steadiness`` of its last matches) and, with a
    sequence calibration, the calibrated confidence and known/unknown; an answer whose order gain is not above
    ``ORDER_GAIN_MIN`` is never known. Until ``length`` frames have been seen the
    answer is ``warming_up`` and never known."""

    METHODS = ("seqslam", "filter")
    #: the trajectory index tables are kept (``sequence.trajectory_lines``, 4 bytes x velocities and phases each)
    #: while database size x steps stays within this; larger indexes recompute them per frame
    KEEP_LINES = 4_000_000

    def __init__(self, index: PlaceIndex, length: int, method: str = "seqslam",
                 calibration: Calibration | None = None, hood: Neighbourhood | None = None,
                 allowed: np.ndarray | None = None, normalisation: str | None = None) -> None:
        if method not in self.METHODS:
            raise ValueError(f"sequence method {method!r}: choose from {', '.join(self.METHODS)}")
        if length < 1:
            raise ValueError(f"sequence length {length}: must be >= 1")
        self.index, self.length, self.method, self.calibration = index, length, method, calibration
        self.blocked = None  # database frames answers may not come from (excluded sessions) [N] bool
        if allowed is not None:
            self.blocked = np.ones(len(index), bool)
            self.blocked[allowed] = False
        self.coords = index.coordinates()
        self.hood = hood or Neighbourhood.default(self.coords)
        self.segments = index.segments()
        # the search's normalisation: the map's own choice (``PlaceIndex.route_shape``) unless given; the order
        # test's rows are always row z-scores, so its gain means the same on every map (and to a calibration)
        self.normalisation = normalisation or index.route_shape()["normalisation"]
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"sequence normalisation {self.normalisation!r}: choose from {', '.join(NORMALISATIONS)}")
        self.rows: deque[np.ndarray] = deque(maxlen=length)  # a fixed-size ring: constant cost per frame
        self.rows_z: deque[np.ndarray] = deque(maxlen=length)
        self.answers: deque[int] = deque(maxlen=length)  # the last sequence matches (``steady``)
        self.frames = 0
        self._lines: dict[int, list] = {}
        self.filter = SequenceFilter(len(index), db_segments=self.segments) if method == "filter" else None

    def push(self, desc: np.ndarray, frame_top: int | None = None) -> dict:
        """One frame's descriptor [D] and its single-frame top-1 id -> {"method", "frames" (used), "match"
        (database match), "score", "decision"}."""
        sim = self.index.similarities(desc[None])[0]
        if self.blocked is not None:  # an excluded session's frames score as the least similar image
            sim = np.where(self.blocked, sim[~self.blocked].min(), sim)
        self.frames += 1
        if self.filter is not None:
            self.filter.update(sim)
            scores = self.filter.belief
        else:  # rows are normalised once, as they arrive (the normalisation is per row)
            self.rows_z.append(normalise(sim[None], DEFAULT_NORMALISATION)[0])
            self.rows.append(self.rows_z[-1] if self.normalisation == DEFAULT_NORMALISATION else
                             normalise(sim[None], self.normalisation)[0])
            steps = len(self.rows)
            if steps not in self._lines and len(self.index) * steps <= self.KEEP_LINES:
                self._lines[steps] = trajectory_lines(len(self.index), steps, SEQSLAM_VELOCITIES, self.segments)
            scores = trajectory_scores(np.stack(self.rows), self.length, SEQSLAM_VELOCITIES, self.segments,
                                       self._lines.get(steps))
        if self.blocked is not None:
            scores = np.where(self.blocked, -np.inf, scores)
        # the top DECISION_DEPTH, best first, ties by id (what a stable full sort gives) at O(N), not O(N log N)
        cand = np.arange(len(scores))
        if len(scores) > DECISION_DEPTH:  # every score tied with the DECISION_DEPTH-th stays a candidate
            cand = np.nonzero(scores >= -np.partition(-scores, DECISION_DEPTH - 1)[DECISION_DEPTH - 1])[0]
        ids = cand[np.lexsort((cand, -scores[cand]))][:DECISION_DEPTH]
        ids = ids[np.isfinite(scores[ids])]
        j = int(ids[0])
        ev = evidence(scores[ids], ids, self.coords, self.hood, self.index.hubs(self.hood))
        ev["agree"] = float(frame_top is not None and bool(self.hood.near(self.coords, j, np.array([frame_top]))[0]))
        self.answers.append(j)
        ev["steady"] = steadiness(list(self.answers), self.coords, self.hood, self.length)
        ev["order_gain"] = float("nan")
        if self.filter is None:
            zs, lines = np.stack(self.rows_z), self._lines.get(len(self.rows))
            own = float(scores[j]) if self.normalisation == DEFAULT_NORMALISATION else float(np.max(
                trajectory_scores(zs, self.length, SEQSLAM_VELOCITIES, self.segments, lines)))
            ev["order_gain"] = order_gain(zs, own, self.length, self.segments, lines)
        warming, cal = self.frames < self.length, self.calibration
        if warming:
            said = {"confidence": None, "known": False, "threshold": cal.known_from if cal else None}
        elif cal is not None:
            said = cal.decide(ev)
        else:
            said = {"confidence": None, "known": None, "threshold": None}
        if not warming and self.filter is None and ev["order_gain"] <= ORDER_GAIN_MIN and said["known"] is not False:
            # the match does not move with the frames: as good in another order (a hub, a static match, chance)
            said = {**said, "known": False if cal is not None else None,
                    "reason": "no temporal order: the match scores as well with the frames in another order"}
        pos = position(scores[ids], ids, self.coords, self.hood, DECISION_DEPTH) if said["known"] is not False \
            else None
        decision = {"position": pos, "score": ev["margin"], **said, "evidence": ev, "warming_up": warming}
        match = Match(1, j, float(sim[j]), *self.index.rows([j])[j])
        return {"method": self.method, "frames": min(self.frames, self.length), "length": self.length,
                "normalisation": None if self.filter is not None else self.normalisation,
                "match": asdict(match), "score": float(scores[j]), "decision": decision}
