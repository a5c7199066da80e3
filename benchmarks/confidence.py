"""How well each confidence estimator tells right from wrong answers, in the form of Zaffar et al. (CVPR 2024).

    python benchmarks/confidence.py [--model effnet-lite0-gem] [--precision 0.9] [--sequence 10]
                                    [--maps gardens_point nordland] [--nordland-places 0 2500] [--name confidence]

Two maps; every place's queries are held out once (cross-validation by stretches of the route): each fold's test
answers get the probability of a calibration fitted on the other folds' places alone, and the figures pool the
test answers of all folds, with each fold's own ECE and unknown rejection in a table of their own.

* Gardens Point: database day_right 0-99; two folds, places 0-49 and 50-99: night_right and day_left of the
  held-out half plus 200 Nordland summer frames as photos of places the map does not hold (5-1995 every 10th with
  places 50-99, 0-1990 with 0-49) are the test answers, the other half's the calibration.
* Nordland: database the summer route, places 0-2499 (dark frames dropped; ``--nordland-places`` for a model
  trained on part of it); five folds of 500 places, each one capture sequence of winter queries, plus Gardens Point
  night_right and day_left in five blocks of 20 frames as unknown places (block k held out with stretch k). Every
  place once held out: 2500 places, where one stretch of 500 moved the sequence ECE by up to 0.07 (the stretches'
  share of right sequence answers runs from 0.16 to 0.45).

Per estimator: AUC-PR (average precision) of "the answer is right" on the test answers, unknown-place answers
counting as wrong, on each test set (with the unknown-place answers) and on all of them pooled. Estimators: top-1
cosine, the margin over the best other place, SUE (the spatial spread of the top-10 poses, lower = surer; database
ids here, as these maps carry no coordinates), SD (the top-1 z-scored within its top-100), and the fused,
calibrated probability (``edgevpr.deploy.decision.calibrate``). For the fused one also: held-out ECE (10 bins,
with a 90% interval from a block bootstrap over stretches of 50 answers) and Brier, the precision of its "known"
answers at the target precision (the threshold also rejects 0.95 of the calibration's unknown-place answers at 90%
confidence, ``decision.REJECT_UNKNOWN``), and the fraction of unknown-place queries rejected.

With sequences (``--sequence L``, default 10): each query set (and each unknown-place set) is streamed as one
capture sequence, as ``localize --sequence`` does (row z-scores, SeqSLAM trajectories over the last L frames);
the answer is the sequence match, the estimators are the same statistics over the ranking of trajectory scores
plus ``agree`` (the frame's own top-1 in the sequence match's neighbourhood) and ``steady`` (the streak of smooth
steps of the sequence match over the last L-1 frames, ``decision.steadiness``), fused by the sequence calibration.
The first L-1 frames of each sequence are warm-up (never known) and left out.
With ``--verify K``: each frame's answer is re-ranked by geometric verification over its top K on the model's own
local features, as ``localize --verify K`` does; for single frames ``inliers`` (log(1 + the top-1's inliers)) is one
more estimator and one more feature of the fused one (``decision.VERIFIED_FEATURES``), for sequences ``agree``
reads the verified frame top-1 (as ``Tracker`` does behind a verifying ``Localizer``).
No Corridor data is available here. Writes benchmarks/results/NAME.{json,md} (default confidence).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from heldout import ROOT, data_root
from sklearn.metrics import average_precision_score

from edgevpr.data.datasets import open_dataset
from edgevpr.data.images import load_image
from edgevpr.deploy.decision import (
    DECISION_DEPTH,
    EARLIER_FEATURES,
    EARLIER_SEQUENCE_FEATURES,
    FEATURES,
    SEQUENCE_FEATURES,
    VERIFIED_FEATURES,
    Coordinates,
    Neighbourhood,
    calibrate,
    evidence,
    expected_calibration_error,
    hubness,
    steadiness,
    verified_evidence,
)
from edgevpr.deploy.sequence import (
    ORDER_GAIN_MIN,
    SEQSLAM_VELOCITIES,
    map_normalisation,
    normalise,
    order_gain,
    route_coherence,
    row_z,
    trajectory_lines,
    trajectory_scores,
)
from edgevpr.deploy.verify import verifier_for
from edgevpr.eval.extract import extract
from edgevpr.models.model import load_model
from edgevpr.utils import default_cache_dir, write_json, write_text

ESTIMATORS = {"margin": "margin", "SUE (spread)": "log_spread", "SD (z-score)": "top1_z", "hub": "hub"}
BLOCK = 50  # answers per stretch of the ECE's block bootstrap
NORDLAND_FOLD = 500  # places per held-out stretch of the Nordland route
VERIFIED_ESTIMATORS = {**ESTIMATORS, "inliers": "log_inliers", "inlier margin": "inlier_margin"}
SEQ_ESTIMATORS = {"margin (z)": "margin_z", "order gain": "order_gain", "hub": "hub"}
LOWER_IS_SURER = ("log_spread", "hub")


def descriptors(model, paths) -> np.ndarray:
    return extract(model, list(paths), 32, default_cache_dir(), False, 0, "cpu", None, progress=False).descriptors


_VERIFIED: dict = {}  # (query path, map) -> (verified top-``DECISION_DEPTH`` ids, scores, check): once per run


def verified(v, path, scores: np.ndarray, top: np.ndarray, db_paths) -> tuple[np.ndarray, np.ndarray, dict]:
    """A query's similarity-ranked ids ``top`` [M] and their scores [M] -> the same re-ranked by ``v`` over its top
    K, as ``Localizer.answer`` does, and the verification record."""
    key = (str(path), str(db_paths[0]), len(db_paths))  # a photo can be a query of one map, unknown to another
    if key not in _VERIFIED:
        top, scores, n = top.copy(), scores.copy(), min(v.k, len(top))
        order, check = v.rerank(load_image(path), scores[:n], [str(db_paths[j]) for j in top[:n]])
        top[:n], scores[:n] = top[:n][order], scores[:n][order]
        _VERIFIED[key] = top, scores, check
    return _VERIFIED[key]


def answers(q: np.ndarray, db: np.ndarray, positives: list, hood: Neighbourhood,
            length: int = 0, verify: tuple | None = None, names: tuple[str, ...] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """One capture sequence of queries [Q, D] against a database [N, D] -> (evidence [A, F], answer right [A]);
    positives[i] empty: an unknown place (always wrong). ``length`` 0: single frames (A = Q, ``FEATURES``); L > 0:
    the sequence answers past the warm-up (A = Q - L + 1, ``SEQUENCE_FEATURES``), computed as ``Tracker`` does,
    with the map's hubs as ``PlaceIndex.hubs`` measures them (``map_probe``). ``names``: the evidence columns
    (default as above). ``verify``: (Verifier, query paths, database paths): each frame's answer re-ranked as
    ``Localizer`` does; single frames get ``VERIFIED_FEATURES``, sequences' ``agree`` reads the verified frame
    top-1."""
    nan = np.full(len(db), np.nan)
    coords = Coordinates(nan, nan, nan, nan)
    names = names or (SEQUENCE_FEATURES if length else VERIFIED_FEATURES if verify else FEATURES)
    s = q @ db.T
    hubs = map_hubs(db, hood)
    seg = np.zeros(len(db), np.int64)
    # as ``Tracker``: the search on the map's own normalisation, the order test on row z-scores
    zs = row_z(s)
    norm = zs if not length else normalise(s, map_choice(db))
    lines = {t: trajectory_lines(len(db), t, SEQSLAM_VELOCITIES, seg) for t in range(1, length + 1)}
    feats, right, matches = [], [], []
    for i in range(len(q)):
        top = np.argsort(-s[i])[:DECISION_DEPTH]
        sc, check = s[i, top], None
        if verify:
            top, sc, check = verified(verify[0], verify[1][i], sc, top, verify[2])
        if not length:
            ev = evidence(sc, top, coords, hood, hubs)
            if verify:
                ev |= verified_evidence(check, top, coords, hood)
            feats.append([ev[f] for f in names])
            right.append(int(top[0]) in set(positives[i]))
            continue
        rows = norm[max(0, i - length + 1):i + 1]
        t = trajectory_scores(rows, length, SEQSLAM_VELOCITIES, seg, lines[len(rows)])
        ids = np.argsort(-t, kind="stable")[:DECISION_DEPTH]
        ids = ids[np.isfinite(t[ids])]
        matches.append(int(ids[0]))
        if i < length - 1:  # warm-up: its matches feed ``steady`` only
            continue
        ev = evidence(t[ids], ids, coords, hood, hubs)
        ev["agree"] = float(hood.near(coords, int(ids[0]), np.array([top[0]]))[0])
        ev["steady"] = steadiness(matches[-length:], coords, hood, length)
        z_rows = zs[max(0, i - length + 1):i + 1]
        own = float(np.max(trajectory_scores(z_rows, length, SEQSLAM_VELOCITIES, seg, lines[len(rows)])))
        ev["order_gain"] = order_gain(z_rows, own, length, seg, lines[len(rows)])
        feats.append([ev[f] for f in names])
        right.append(int(ids[0]) in set(positives[i]))
    return np.array(feats), np.array(right)


_CHOICES: dict = {}  # (database size, first row) -> the map's sequence normalisation: once per map and run


def map_choice(db: np.ndarray) -> str:
    """A map's sequence normalisation as ``PlaceIndex.route_shape`` chooses it, over ``db`` [N, D]."""
    key = (len(db), db[0].tobytes())
    if key not in _CHOICES:
        coherence, _ = route_coherence(lambda x: x @ db.T, lambda ids: db[ids], np.zeros(len(db), np.int64))
        _CHOICES[key] = map_normalisation(coherence)
    return _CHOICES[key]


_HUBS: dict = {}  # (database size, first row, neighbourhood) -> hubs: once per map and run


def map_hubs(db: np.ndarray, hood: Neighbourhood) -> np.ndarray:
    """A map's k-occurrence [N] as ``PlaceIndex.hubs`` measures it (``decision.hubness``), by exact inner-product
    search over ``db`` [N, D]."""
    key = (len(db), db[0].tobytes(), hood.radius_m, hood.frames)
    if key not in _HUBS:
        nan = np.full(len(db), np.nan)

        def search(x, k):
            sim = x @ db.T
            ids = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sim, ids, 1), ids

        _HUBS[key] = hubness(search, lambda ids: db[ids], Coordinates(nan, nan, nan, nan), hood, len(db))
    return _HUBS[key]


def ece_interval(p: np.ndarray, right: np.ndarray, block: np.ndarray, draws: int = 1000) -> list[float]:
    """The 90% interval of the ECE of answers p [A] / right [A] by a block bootstrap: the answers' stretches of
    ``BLOCK`` consecutive answers (block [A], their ids) are drawn with replacement, because neighbouring answers
    (sequence answers share L-1 frames) are not independent."""
    ids = np.unique(block)
    members = [np.flatnonzero(block == b) for b in ids]
    rng = np.random.default_rng(0)
    eces = [expected_calibration_error(p[idx], right[idx])[0]
            for idx in (np.concatenate([members[k] for k in rng.integers(0, len(ids), len(ids))])
                        for _ in range(draws))]
    return [float(v) for v in np.percentile(eces, [5, 95])]


_ANSWERS: dict = {}  # (set label, first path, length, sequence length, verified) -> answers(): once per run


def set_answers(model, db_paths, qset, hood: Neighbourhood, length: int, verifier,
                names: tuple[str, ...] | None = None) -> tuple:
    """One capture sequence (label, query paths, positives) -> ``answers`` of it, computed once per run (a set is
    calibration in some folds and test in one)."""
    label, paths, pos = qset
    key = (label, str(paths[0]), len(paths), str(db_paths[0]), len(db_paths), length, verifier is not None, names)
    if key not in _ANSWERS:
        _ANSWERS[key] = answers(descriptors(model, paths), descriptors(model, db_paths), pos, hood, length,
                                (verifier, paths, db_paths) if verifier else None, names)
    return _ANSWERS[key]


def evaluate(name: str, model, db_paths, folds: list, hood: Neighbourhood, target: float,
             length: int = 0, verifier=None) -> dict:
    """folds: list of (held-out label, calibration sets, test sets), every place a test query in exactly one fold;
    a set is (label, query paths, positives per query; [] = unknown place), one capture sequence. Each fold's test
    answers get the probability of a calibration fitted on that fold's calibration sets alone; the figures are over
    all folds' test answers pooled, plus the ECE of each fold. ``verifier``: answers verified (``answers``)."""
    names, estimators = (SEQUENCE_FEATURES, SEQ_ESTIMATORS) if length else \
        (VERIFIED_FEATURES, VERIFIED_ESTIMATORS) if verifier else (FEATURES, ESTIMATORS)

    def auc_pr(x, y, p) -> dict:  # per estimator (a wider spread: less sure) and the fused probability
        out = {lab: float(average_precision_score(y, x[:, names.index(feat)] * (-1 if feat in LOWER_IS_SURER else 1)))
               for lab, feat in estimators.items()}
        return out | {"fused (calibrated)": float(average_precision_score(y, p))}

    def pooled(sets, offset=0):
        parts = [set_answers(model, db_paths, s, hood, length, verifier) for s in sets]
        unknown = np.concatenate([np.full(len(p[1]), len(pos) > 0 and not any(pos)) for p, (_, _, pos)
                                  in zip(parts, sets, strict=True)])
        label = np.concatenate([np.full(len(p[1]), lab) for p, (lab, _, _) in zip(parts, sets, strict=True)])
        block = np.concatenate([offset + k * 10_000 + np.arange(len(p[1])) // BLOCK for k, p in enumerate(parts)])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), unknown, label, block

    xt, yt, ut, lt, bt, p, known, per_fold, cals = [], [], [], [], [], [], [], [], []
    for f, (held, cal_sets, test_sets) in enumerate(folds):
        xc, yc, uc, _, _ = pooled(cal_sets)
        x, y, u, lab, blk = pooled(test_sets, offset=f * 1_000_000)
        cal = calibrate(xc, yc, target, hood, unknown=uc, names=names, refuse=False)
        pf = np.array([cal.probability(dict(zip(names, r, strict=True))) for r in x])
        for acc, v in zip((xt, yt, ut, lt, bt, p, known), (x, y, u, lab, blk, pf, pf >= cal.threshold), strict=True):
            acc.append(v)
        cals.append(cal)
        per_fold.append({"held_out": held, "calibration_answers": int(len(yc)), "calibration_right": int(yc.sum()),
                         "test_answers": int(len(y)), "test_right": int(y.sum()), "test_unknown": int(u.sum()),
                         "mean_probability": float(pf.mean()), "ece": expected_calibration_error(pf, y)[0],
                         "unknown_rejected": float((pf[u] < cal.threshold).mean()) if u.any() else None,
                         "calibration_unknown_rejected": cal.unknown_rejected,
                         "threshold": cal.threshold if np.isfinite(cal.threshold) else None, "auc_pr": auc_pr(x, y, pf),
                         "calibration_best_precision": cal.precision, "calibration_ece": cal.ece})
    xt, yt, ut, lt, bt, p, known = (np.concatenate(v) for v in (xt, yt, ut, lt, bt, p, known))

    known_sets = sorted({lab for _, _, sets in folds for lab, _, pos in sets if any(pos)})
    reached = [bool(np.isfinite(c.threshold)) for c in cals]
    row = {"sequence_length": length, "folds": per_fold,
           "test_answers": int(len(yt)), "test_right": int(yt.sum()), "test_unknown": int(ut.sum()),
           "auc_pr": auc_pr(xt, yt, p),
           "auc_pr_by_set": {lab: auc_pr(xt[sel], yt[sel], p[sel]) for lab in known_sets
                             for sel in [(lt == lab) | ut]} if len(known_sets) > 1 else {},
           "ece": expected_calibration_error(p, yt)[0], "ece_ci90": ece_interval(p, yt, bt),
           "brier": float(np.mean((p - yt) ** 2)),
           "folds_target_reached": int(sum(reached)),
           "calibration_best_precision": max(c.precision for c in cals),
           "known_precision": float(yt[known].mean()) if known.any() else None,
           "known_share_of_known_places": float(known[~ut].mean()),
           "unknown_rejected": float((~known[ut]).mean())}
    print(name, f"L={length}", row, flush=True)
    return row


#: Evidence sets the transfer protocol compares (single frames, sequences): the earlier sets, and the sets whose
#: every piece carries its own null. The shipped sets are ``decision.FEATURES`` and ``decision.SEQUENCE_FEATURES``.
TRANSFER_SETS = {0: {"earlier (margin, top-1, SD, SUE)": EARLIER_FEATURES,
                     "shipped (margin, SD, SUE, hub)": FEATURES,
                     "null-carrying (margin z, hub)": ("margin_z", "hub")},
                 1: {"earlier (+ agree, steady)": EARLIER_SEQUENCE_FEATURES,
                     "shipped (margin z, order gain, hub)": SEQUENCE_FEATURES}}


def precision_interval(right: int, n: int, confidence: float = 0.9) -> list[float]:
    """Two-sided Clopper-Pearson interval of a share ``right`` of ``n`` at ``confidence``."""
    from scipy.stats import beta

    a = (1 - confidence) / 2
    return [float(beta.ppf(a, right, n - right + 1)) if right else 0.0,
            float(beta.ppf(1 - a, right + 1, n - right)) if right < n else 1.0]


def judge(cal, names: tuple[str, ...], parts: list, length: int) -> dict:
    """A calibration applied to test sets -> the figures of the decision as the runtime makes it: P, 'known' =
    ``Calibration.decide`` (P >= known_from, inside the calibration's range) and, for sequences, an order gain
    above ``ORDER_GAIN_MIN``. parts: (label, kind "known" or "foreign", evidence [A, F + 1] with order_gain last,
    right [A])."""
    p, known, right, rows, block = [], [], [], {}, []
    for k, (label, kind, x, y) in enumerate(parts):
        said = [cal.decide(dict(zip(names, r[:len(names)], strict=True))) for r in x]
        pk = np.array([d["confidence"] for d in said])
        kn = np.array([d["known"] for d in said], bool)
        if length:
            kn &= x[:, -1] > ORDER_GAIN_MIN
        p.append(pk), known.append(kn), right.append(y), block.append(k * 10_000 + np.arange(len(y)) // BLOCK)
        r = rows.setdefault(label, {"kind": kind, "answers": 0, "right": 0, "known": 0, "known_right": 0, "p": []})
        r["answers"] += len(y)
        r["right"] += int(y.sum())
        r["known"] += int(kn.sum())
        r["known_right"] += int((kn & y).sum())
        r["p"] += pk.tolist()
    p, known, right, block = (np.concatenate(v) for v in (p, known, right, block))
    for r in rows.values():
        r["mean_p"] = float(np.mean(r.pop("p")))
        r["known_share"] = r["known"] / r["answers"]
    nk = int(known.sum())
    return {"answers": int(len(right)), "right": int(right.sum()),
            "ece": expected_calibration_error(p, right)[0],
            "ece_ci90": ece_interval(p, right, block), "brier": float(np.mean((p - right) ** 2)),
            "known": nk, "known_precision": float(right[known].mean()) if nk else None,
            "known_precision_ci90": precision_interval(int(right[known].sum()), nk) if nk else None,
            "known_from": cal.known_from if np.isfinite(cal.threshold) else None, "sets": rows}


def transfer(model, maps: dict, scenarios: list, target: float, lengths: tuple[int, ...]) -> dict:
    """The transfer protocol: each scenario calibrates on one map's answers (its known-place sets and one kind of
    foreign set) and judges the decision on answers it never saw: another map, other places, foreign scenes of
    another kind. maps: name -> (database paths, Neighbourhood); scenario: (name, calibration map, calibration
    sets, test map, test sets), a set being (label, paths, positives per query; [] = foreign), one capture
    sequence. Per evidence set of ``TRANSFER_SETS`` and mode (single frames, sequences of L)."""
    out = {}
    for length in lengths:
        for set_name, names in TRANSFER_SETS[bool(length)].items():
            cols = (*names, "order_gain") if length else (*names, "margin")
            for sc_name, cal_map, cal_sets, test_map, test_sets in scenarios:
                def parts(mp, sets, length=length, cols=cols):
                    db, hood = maps[mp]
                    return [(lab, "known" if any(pos) else "foreign",
                             *set_answers(model, db, (lab, paths, pos), hood, length, None, cols))
                            for lab, paths, pos in sets]
                cp = parts(cal_map, cal_sets)
                xc = np.concatenate([x[:, :len(names)] for _, _, x, _ in cp])
                yc = np.concatenate([y for *_, y in cp])
                uc = np.concatenate([np.full(len(y), kind == "foreign") for _, kind, _, y in cp])
                cal = calibrate(xc, yc, target, maps[cal_map][1], unknown=uc, names=names, refuse=False)
                row = judge(cal, names, parts(test_map, test_sets), length)
                row["calibration"] = {"answers": int(len(yc)), "right": int(yc.sum()), "foreign": int(uc.sum()),
                                      "target_reached": bool(np.isfinite(cal.threshold))}
                out.setdefault(f"L={length}", {}).setdefault(set_name, {})[sc_name] = row
                print(model.name, f"L={length}", set_name, sc_name, {k: v for k, v in row.items() if k != "sets"},
                      flush=True)
    return out


def transfer_table(res: dict, target: float) -> list[str]:
    """Markdown: per mode and evidence set one row per scenario, then its test sets."""
    lines = []
    for mode, sets in res.items():
        what = "Single frames" if mode == "L=0" else f"Sequences of {mode[2:]} frames (past the warm-up)"
        for set_name, rows in sets.items():
            lines += ["", f"### {what}: evidence {set_name}", "",
                      "| calibrated on -> judged on | answers (right) | ECE (90% interval) | known: precision (90% "
                      "interval), count | per test set: share right / mean P / share 'known' |",
                      "|---|---:|---:|---|---|"]
            for sc, r in rows.items():
                if r["known_precision"] is None:
                    kp = "nothing 'known'" + ("" if r["calibration"]["target_reached"] else
                                               f" (target {target} not reached on calibration)")
                else:
                    lo, hi = r["known_precision_ci90"]
                    kp = f"{r['known_precision']:.3f} ({lo:.3f}-{hi:.3f}), {r['known']}"
                per = "; ".join(f"{lab}{' (foreign)' if v['kind'] == 'foreign' else ''}: "
                                f"{v['right'] / v['answers']:.2f} / {v['mean_p']:.2f} / "
                                f"**{v['known_share']:.3f}** ({v['known']} of {v['answers']})"
                                for lab, v in r["sets"].items())
                lines.append(f"| {sc} | {r['answers']} ({r['right']}) | {r['ece']:.3f} ({r['ece_ci90'][0]:.3f}-"
                             f"{r['ece_ci90'][1]:.3f}) | {kp} | {per} |")
    return lines


def table(res: dict, length: int) -> list[str]:
    """The markdown rows of one mode (single frames: length 0, or sequences of ``length``), then each fold's."""
    rows, folds = [], ["", "| map: held out | answers (right / unknown) | mean confidence | share right | ECE | "
                       "unknown rejected (calibration) |", "|---|---|---:|---:|---:|---:|"]
    for name, r in res["maps"].items():
        r = r[f"L={length}"]
        est = list(r["auc_pr"])
        if not rows:
            rows = ["| map / test set | answers (right / unknown) | " + " | ".join(est) +
                    " | ECE (90% interval) | Brier | known precision | unknown rejected | "
                    "known places answered 'known' |",
                    "|---|---|" + "---:|" * (len(est) + 5)]
        n = len(r["folds"])
        kp = "-" if r["known_precision"] is None else f"{r['known_precision']:.3f}"
        if not r["folds_target_reached"]:
            kp = f"refused (calibration reaches at most {r['calibration_best_precision']:.3f}: nothing 'known')"
        elif r["folds_target_reached"] < n:
            kp += f" ({n - r['folds_target_reached']} of {n} folds refused)"
        rows.append(f"| **{name}** (all, {n} folds) | {r['test_answers']} ({r['test_right']} / "
                    f"{r['test_unknown']}) | " +
                    " | ".join(f"{r['auc_pr'][e]:.3f}" for e in est) +
                    f" | {r['ece']:.3f} ({r['ece_ci90'][0]:.3f}-{r['ece_ci90'][1]:.3f}) | {r['brier']:.3f} | {kp} | "
                    f"{r['unknown_rejected']:.3f} | "
                    f"{r['known_share_of_known_places']:.3f} |")
        for lab, a in r["auc_pr_by_set"].items():
            rows.append(f"| {name}: {lab} + unknown | | " + " | ".join(f"{a[e]:.3f}" for e in est) +
                        " | | | | | |")
        folds += [f"| {name}: {f['held_out']} | {f['test_answers']} ({f['test_right']} / {f['test_unknown']}) | "
                  f"{f['mean_probability']:.3f} | {f['test_right'] / f['test_answers']:.3f} | {f['ece']:.3f} | "
                  f"{f['unknown_rejected']:.3f} ({f['calibration_unknown_rejected']:.3f}) |"
                  for f in r["folds"]]
    return rows + folds


def run_transfer(model, gp, nl, route, stretches: list, target: float, length: int, out, command: str) -> None:
    """The transfer protocol on the two maps (``transfer``), written to OUT.{json,md}."""
    def stream(label, paths):
        return label, list(paths), [[] for _ in paths]

    gp_ds = {f: open_dataset(gp / "day_right", gp / f, aligned_tolerance=2) for f in ("night_right", "day_left")}
    nl_summer, nl_winter = sorted((nl / "summer").glob("*.png")), sorted((nl / "winter").glob("*.png"))

    def gp_known(a, b):
        return [(f, ds.q_paths[a:b], [ds.positives[i].tolist() for i in range(a, b)]) for f, ds in gp_ds.items()]

    gp_seen = [stream("nordland summer", nl_summer[0:100]), stream("nordland summer", nl_summer[1000:1100])]
    gp_unseen = [stream("nordland winter", nl_winter[500:600]), stream("nordland winter", nl_winter[1500:1600])]
    nl_seen = [stream("gardens point night", sorted((gp / "night_right").glob("*.jpg")))]
    nl_unseen = [stream(f"gardens point {f}", sorted((gp / f).glob("*.jpg"))) for f in ("day_left", "day_right")]
    half = len(stretches) // 2
    maps = {"gardens point": (sorted((gp / "day_right").glob("*.jpg")), Neighbourhood(radius_m=None, frames=2)),
            "nordland": (route.db_paths, Neighbourhood(radius_m=None, frames=1))}
    scenarios = [
        ("Gardens Point -> Nordland", "gardens point", gp_known(0, 100) + gp_seen, "nordland",
         stretches + nl_seen + nl_unseen),
        ("Nordland -> Gardens Point", "nordland", stretches + nl_seen, "gardens point",
         gp_known(0, 100) + gp_seen + gp_unseen),
        ("Gardens Point 0-49 -> 50-99, foreign of another season", "gardens point", gp_known(0, 50) + gp_seen,
         "gardens point", gp_known(50, 100) + gp_unseen),
        ("Gardens Point 50-99 -> 0-49, foreign of another season", "gardens point", gp_known(50, 100) + gp_seen,
         "gardens point", gp_known(0, 50) + gp_unseen),
        ("Nordland first half -> second, foreign of another kind", "nordland", stretches[:half] + nl_seen,
         "nordland", stretches[half:] + nl_unseen),
        ("Nordland second half -> first, foreign of another kind", "nordland", stretches[half:] + nl_seen,
         "nordland", stretches[:half] + nl_unseen)]
    res = {"model": model.name, "target_precision": target, "sequence_length": length,
           "scenarios": transfer(model, maps, scenarios, target, (0, length))}
    write_json(out.with_suffix(".json"), res)
    lines = [f"# The decision where it was not tuned (`{command}`, {model.name})", "",
             "Each row calibrates on one map's answers (its known-place query sets and one kind of foreign photo: "
             "Nordland summer for Gardens Point, Gardens Point night for Nordland) and judges the decision on answers "
             "the calibration never saw: the other map, or the other places of the same map with foreign streams of "
             "a kind it never saw (Nordland winter; Gardens Point by day). Every set is one capture sequence. "
             f"'known' as the runtime says it (P >= max(threshold, 0.5), inside the calibration's range; sequences "
             f"also an order gain above {ORDER_GAIN_MIN}); target precision {target}. Per test set: the share of "
             "right answers, the mean P and the share answered 'known' (for a foreign set: wrongly).",
             *transfer_table(res["scenarios"], target)]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0-gem", help="model (default effnet-lite0-gem)")
    ap.add_argument("--precision", type=float, default=0.9, help="target precision of 'known' (default 0.9)")
    ap.add_argument("--sequence", type=int, default=10, help="sequence length L of the sequence rows (default 10)")
    ap.add_argument("--maps", nargs="+", choices=["gardens_point", "nordland"], default=["gardens_point", "nordland"],
                    help="maps to evaluate (default both)")
    ap.add_argument("--nordland-places", nargs=2, type=int, default=[0, 2500], metavar=("FROM", "TO"),
                    help="the Nordland map's places (database and held-out queries), in folds of "
                         f"{NORDLAND_FOLD}; a model trained on Nordland 0-1499 takes 1500 2500 (default 0 2500)")
    ap.add_argument("--name", default="confidence", help="results file stem in benchmarks/results (default confidence)")
    ap.add_argument("--verify", type=int, default=0, metavar="K",
                    help="each frame's answer verified over its top K on the model's own local features "
                         "(--verify-with auto), the inliers one more estimator of single frames (default 0: off)")
    ap.add_argument("--protocol", choices=["both", "transfer", "in-distribution"], default="both",
                    help="transfer: calibrate on one map and judge on the other, on other places and on foreign "
                         "scenes of unseen kinds (NAME_transfer.{json,md}); in-distribution: every place held out "
                         "once on its own map (NAME.{json,md}) (default both)")
    args = ap.parse_args()
    lo, hi = args.nordland_places
    if lo < 0 or hi > 2500 or (hi - lo) % NORDLAND_FOLD or hi - lo < 2 * NORDLAND_FOLD:
        ap.error(f"--nordland-places {lo} {hi}: need 0 <= FROM < TO <= 2500 spanning at least two folds of "
                 f"{NORDLAND_FOLD} places")
    data = data_root()
    gp, nl = data / "gardens_point", data / "nordland_64x32"
    model = load_model(args.model).eval()
    verifier = verifier_for(model, model.transform(), args.verify) if args.verify else None

    def gp_queries(folder, a, b):  # against the whole day_right database: +-2 frames
        ds = open_dataset(gp / "day_right", gp / folder, aligned_tolerance=2)
        return folder, [ds.q_paths[i] for i in range(a, b)], [ds.positives[i].tolist() for i in range(a, b)]

    def unknown(label, paths):
        return label, list(paths), [[] for _ in paths]

    def two_halves(sets_a, sets_b):  # Gardens Point: places 0-49 and 50-99, each held out once
        return [("places 50-99", sets_a, sets_b), ("places 0-49", sets_b, sets_a)]

    nl_summer = sorted((nl / "summer").glob("*.png"))
    route = open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1, frames=(lo, hi), drop_dark=10)
    place = np.array([int(p.stem.split("-")[1]) // 10 for p in route.q_paths])
    stretches = [("winter", [route.q_paths[i] for i in idx], [route.positives[i].tolist() for i in idx])
                 for a in range(lo, hi, NORDLAND_FOLD)
                 for idx in [np.flatnonzero((place >= a) & (place < a + NORDLAND_FOLD))]]
    gp_night = sorted((gp / "night_right").glob("*.jpg"))
    gp_left = sorted((gp / "day_left").glob("*.jpg"))
    n_folds = len(stretches)
    step = len(gp_night) // n_folds
    unknown_blocks = [[unknown("gp night", gp_night[k * step:(k + 1) * step]),
                       unknown("gp day_left", gp_left[k * step:(k + 1) * step])] for k in range(n_folds)]
    nl_folds = [(f"winter {lo + k * NORDLAND_FOLD}-{lo + (k + 1) * NORDLAND_FOLD - 1}",
                 [s for j, s in enumerate(stretches) if j != k] +
                 [u for j, b in enumerate(unknown_blocks) if j != k for u in b],
                 [stretches[k], *unknown_blocks[k]]) for k in range(n_folds)]
    results = ROOT / "benchmarks" / "results"
    command = " ".join(["python benchmarks/confidence.py", *sys.argv[1:]])
    if args.protocol != "in-distribution":
        run_transfer(model, gp, nl, route, stretches, args.precision, args.sequence, results / f"{args.name}_transfer",
                     command)
    if args.protocol == "transfer":
        return
    res: dict = {"model": model.name, "target_precision": args.precision, "nordland_places": [lo, hi],
                 "maps": {m: {} for m in args.maps}}
    if verifier:
        res["verified"] = {"k": verifier.k, "features": verifier.kind, "method": verifier.method}
    for length in (0, args.sequence):
        if "gardens_point" in args.maps:
            res["maps"]["gardens_point"][f"L={length}"] = evaluate(
                "gardens_point", model, sorted((gp / "day_right").glob("*.jpg")),
                two_halves([gp_queries("night_right", 0, 50), gp_queries("day_left", 0, 50),
                            unknown("nordland", nl_summer[0:2000:10])],
                           [gp_queries("night_right", 50, 100), gp_queries("day_left", 50, 100),
                            unknown("nordland", nl_summer[5:2000:10])]),
                Neighbourhood(radius_m=None, frames=2), args.precision, length, verifier)
        if "nordland" in args.maps:
            res["maps"]["nordland"][f"L={length}"] = evaluate(
                "nordland", model, route.db_paths, nl_folds, Neighbourhood(radius_m=None, frames=1),
                args.precision, length, verifier)
    write_json(results / f"{args.name}.json", res)
    verified = f", verified ({verifier.method}, K = {verifier.k})" if verifier else ""
    lines = [f"# Confidence estimators on held-out answers (`{command}`, {res['model']})", "",
             "AUC-PR of 'the answer is right' (unknown-place answers count as wrong), on each map's test answers "
             "pooled and per test set (with the unknown-place answers); the fused estimator is the calibrated "
             "probability. Every place is held out once: each fold's test answers get the probability of a "
             "calibration fitted on the other folds' places alone, and the figures pool all folds' test answers "
             f"(each fold's own ECE below each table); target precision {args.precision}. No Corridor data here.", "",
             f"## Single frames{verified}", "", *table(res, 0), "",
             f"## Sequences of {args.sequence} frames (answers past the warm-up){verified}", "",
             *table(res, args.sequence)]
    write_text(results / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
