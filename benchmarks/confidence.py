"""How well each confidence estimator tells right from wrong answers, in the form of Zaffar et al. (CVPR 2024).

    python benchmarks/confidence.py [--model effnet-lite0-gem] [--precision 0.9] [--sequence 10]
                                    [--maps gardens_point nordland] [--name confidence]

Two maps, each calibrated on validation queries and judged on held-out ones (no place or photo in both):

* Gardens Point: database day_right 0-99; calibration night_right and day_left 0-49 pooled, plus 200 Nordland
  summer frames (0-1990, every 10th) as photos of places the map does not hold; test night_right and day_left 50-99
  plus 200 other Nordland frames (5-1995, every 10th).
* Nordland: database summer 1500-2499 (dark frames dropped); calibration winter 1500-1999 plus Gardens Point
  night_right and day_left 0-49 as unknown places; test winter 2000-2499 plus Gardens Point 50-99.

Per estimator: AUC-PR (average precision) of "the answer is right" on the test answers, unknown-place answers
counting as wrong, on each test set (with the unknown-place answers) and on all of them pooled. Estimators: top-1
cosine, the margin over the best other place, SUE (the spatial spread of the top-10 poses, lower = surer; database
ids here, as these maps carry no coordinates), SD (the top-1 z-scored within its top-100), and the fused,
calibrated probability (``edgevpr.deploy.decision.calibrate``). For the fused one also: held-out ECE (10 bins,
with a 90% interval from a block bootstrap over stretches of 50 answers) and Brier, the precision of its "known"
answers at the target precision (the threshold also rejects 0.95 of the calibration's unknown-place answers,
``decision.REJECT_UNKNOWN``), and the fraction of unknown-place queries rejected.

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
    FEATURES,
    SEQUENCE_FEATURES,
    VERIFIED_FEATURES,
    Coordinates,
    Neighbourhood,
    calibrate,
    evidence,
    expected_calibration_error,
    steadiness,
    verified_evidence,
)
from edgevpr.deploy.sequence import SEQSLAM_VELOCITIES, row_z, trajectory_scores
from edgevpr.deploy.verify import verifier_for
from edgevpr.eval.extract import extract
from edgevpr.models.model import load_model
from edgevpr.utils import default_cache_dir, write_json, write_text

ESTIMATORS = {"top-1 cosine": "top1", "margin": "margin", "SUE (spread)": "log_spread", "SD (z-score)": "top1_z"}
BLOCK = 50  # answers per stretch of the ECE's block bootstrap
VERIFIED_ESTIMATORS = {**ESTIMATORS, "inliers": "log_inliers"}
SEQ_ESTIMATORS = {"top-1 trajectory": "top1", "margin": "margin", "SUE (spread)": "log_spread",
                  "SD (z-score)": "top1_z", "agreement": "agree", "steadiness": "steady"}


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
            length: int = 0, verify: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One capture sequence of queries [Q, D] against a database [N, D] -> (evidence [A, F], answer right [A]);
    positives[i] empty: an unknown place (always wrong). ``length`` 0: single frames (A = Q, ``FEATURES``); L > 0:
    the sequence answers past the warm-up (A = Q - L + 1, ``SEQUENCE_FEATURES``), computed as ``Tracker`` does.
    ``verify``: (Verifier, query paths, database paths): each frame's answer re-ranked as ``Localizer`` does;
    single frames get ``VERIFIED_FEATURES``, sequences' ``agree`` reads the verified frame top-1."""
    nan = np.full(len(db), np.nan)
    coords = Coordinates(nan, nan, nan, nan)
    s = q @ db.T
    norm, seg = row_z(s), np.zeros(len(db), np.int64)
    feats, right, matches = [], [], []
    for i in range(len(q)):
        top = np.argsort(-s[i])[:DECISION_DEPTH]
        sc, check = s[i, top], None
        if verify:
            top, sc, check = verified(verify[0], verify[1][i], sc, top, verify[2])
        if not length:
            ev = evidence(sc, top, coords, hood)
            if verify:
                ev["log_inliers"] = verified_evidence(check)
            feats.append([ev[f] for f in (VERIFIED_FEATURES if verify else FEATURES)])
            right.append(int(top[0]) in set(positives[i]))
            continue
        t = trajectory_scores(norm[max(0, i - length + 1):i + 1], length, SEQSLAM_VELOCITIES, seg)
        ids = np.argsort(-t, kind="stable")[:DECISION_DEPTH]
        ids = ids[np.isfinite(t[ids])]
        matches.append(int(ids[0]))
        if i < length - 1:  # warm-up: its matches feed ``steady`` only
            continue
        ev = evidence(t[ids], ids, coords, hood)
        ev["agree"] = float(hood.near(coords, int(ids[0]), np.array([top[0]]))[0])
        ev["steady"] = steadiness(matches[-length:], coords, hood, length)
        feats.append([ev[f] for f in SEQUENCE_FEATURES])
        right.append(int(ids[0]) in set(positives[i]))
    return np.array(feats), np.array(right)


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


def evaluate(name: str, model, db_paths, cal_sets, test_sets, hood: Neighbourhood, target: float,
             length: int = 0, verifier=None) -> dict:
    """cal_sets / test_sets: lists of (label, query paths, positives per query; [] = unknown place), each one
    capture sequence. ``verifier``: single-frame answers verified (``answers``)."""
    db = descriptors(model, db_paths)
    names, estimators = (SEQUENCE_FEATURES, SEQ_ESTIMATORS) if length else \
        (VERIFIED_FEATURES, VERIFIED_ESTIMATORS) if verifier else (FEATURES, ESTIMATORS)

    def pooled(sets):
        parts = [answers(descriptors(model, paths), db, pos, hood, length,
                         (verifier, paths, db_paths) if verifier else None) for _, paths, pos in sets]
        unknown = np.concatenate([np.full(len(p[1]), len(pos) > 0 and not any(pos)) for p, (_, _, pos)
                                  in zip(parts, sets, strict=True)])
        label = np.concatenate([np.full(len(p[1]), lab) for p, (lab, _, _) in zip(parts, sets, strict=True)])
        block = np.concatenate([k * 10_000 + np.arange(len(p[1])) // BLOCK for k, p in enumerate(parts)])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), unknown, label, block

    xc, yc, uc, _, _ = pooled(cal_sets)
    xt, yt, ut, lt, bt = pooled(test_sets)
    cal = calibrate(xc, yc, target, hood, unknown=uc, names=names, refuse=False)
    p = np.array([cal.probability(dict(zip(names, row, strict=True))) for row in xt])

    def auc(sel) -> dict:
        out = {}
        for label, feat in estimators.items():
            score = xt[sel, names.index(feat)] * (-1 if feat == "log_spread" else 1)
            out[label] = float(average_precision_score(yt[sel], score))
        out["fused (calibrated)"] = float(average_precision_score(yt[sel], p[sel]))
        return out

    known_sets = [lab for lab, _, pos in test_sets if any(pos)]
    row = {"sequence_length": length, "calibration_answers": int(len(yc)), "calibration_right": int(yc.sum()),
           "test_answers": int(len(yt)), "test_right": int(yt.sum()), "test_unknown": int(ut.sum()),
           "auc_pr": auc(np.ones(len(yt), bool)),
           "auc_pr_by_set": {lab: auc((lt == lab) | ut) for lab in known_sets} if len(known_sets) > 1 else {}}
    known = p >= cal.threshold
    row.update({"ece": expected_calibration_error(p, yt)[0], "ece_ci90": ece_interval(p, yt, bt),
                "brier": float(np.mean((p - yt) ** 2)),
                "threshold": cal.threshold if np.isfinite(cal.threshold) else None,
                "target_reached_on_calibration": bool(np.isfinite(cal.threshold)),
                "calibration_best_precision": cal.precision,
                "calibration_unknown_rejected": cal.unknown_rejected,
                "known_precision": float(yt[known].mean()) if known.any() else None,
                "known_share_of_known_places": float(known[~ut].mean()),
                "unknown_rejected": float((~known[ut]).mean()), "calibration_ece": cal.ece})
    print(name, f"L={length}", row, flush=True)
    return row


def table(res: dict, length: int) -> list[str]:
    """The markdown rows of one mode (single frames: length 0, or sequences of ``length``)."""
    rows = []
    for name, r in res["maps"].items():
        r = r[f"L={length}"]
        est = list(r["auc_pr"])
        if not rows:
            rows = ["| map / test set | answers (right / unknown) | " + " | ".join(est) +
                    " | ECE (90% interval) | Brier | known precision | unknown rejected | "
                    "known places answered 'known' |",
                    "|---|---|" + "---:|" * (len(est) + 5)]
        kp = "-" if r["known_precision"] is None else f"{r['known_precision']:.3f}"
        if not r["target_reached_on_calibration"]:
            kp = f"refused (calibration reaches at most {r['calibration_best_precision']:.3f}: nothing 'known')"
        rows.append(f"| **{name}** (all) | {r['test_answers']} ({r['test_right']} / {r['test_unknown']}) | " +
                    " | ".join(f"{r['auc_pr'][e]:.3f}" for e in est) +
                    f" | {r['ece']:.3f} ({r['ece_ci90'][0]:.3f}-{r['ece_ci90'][1]:.3f}) | {r['brier']:.3f} | {kp} | "
                    f"{r['unknown_rejected']:.3f} | "
                    f"{r['known_share_of_known_places']:.3f} |")
        for lab, a in r["auc_pr_by_set"].items():
            rows.append(f"| {name}: {lab} + unknown | | " + " | ".join(f"{a[e]:.3f}" for e in est) +
                        " | | | | | |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0-gem", help="model (default effnet-lite0-gem)")
    ap.add_argument("--precision", type=float, default=0.9, help="target precision of 'known' (default 0.9)")
    ap.add_argument("--sequence", type=int, default=10, help="sequence length L of the sequence rows (default 10)")
    ap.add_argument("--maps", nargs="+", choices=["gardens_point", "nordland"], default=["gardens_point", "nordland"],
                    help="maps to evaluate (default both)")
    ap.add_argument("--name", default="confidence", help="results file stem in benchmarks/results (default confidence)")
    ap.add_argument("--verify", type=int, default=0, metavar="K",
                    help="each frame's answer verified over its top K on the model's own local features "
                         "(--verify-with auto), the inliers one more estimator of single frames (default 0: off)")
    args = ap.parse_args()
    data = data_root()
    gp, nl = data / "gardens_point", data / "nordland_64x32"
    model = load_model(args.model).eval()
    verifier = verifier_for(model, model.transform(), args.verify) if args.verify else None

    def gp_queries(folder, a, b):  # against the whole day_right database: +-2 frames
        ds = open_dataset(gp / "day_right", gp / folder, aligned_tolerance=2)
        return folder, [ds.q_paths[i] for i in range(a, b)], [ds.positives[i].tolist() for i in range(a, b)]

    def unknown(label, paths):
        return label, list(paths), [[] for _ in paths]

    nl_summer = sorted((nl / "summer").glob("*.png"))
    val = open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1, frames=(1500, 2500), drop_dark=10)
    cut = int(np.searchsorted([int(p.stem.split("-")[1]) for p in val.q_paths], 20000))  # winter 2000- (test)
    nl_q = [("winter", val.q_paths[:cut], [p.tolist() for p in val.positives[:cut]]),
            ("winter", val.q_paths[cut:], [p.tolist() for p in val.positives[cut:]])]
    gp_night = sorted((gp / "night_right").glob("*.jpg"))
    gp_left = sorted((gp / "day_left").glob("*.jpg"))
    res: dict = {"model": model.name, "target_precision": args.precision, "maps": {m: {} for m in args.maps}}
    if verifier:
        res["verified"] = {"k": verifier.k, "features": verifier.kind, "method": verifier.method}
    for length in (0, args.sequence):
        if "gardens_point" in args.maps:
            res["maps"]["gardens_point"][f"L={length}"] = evaluate(
                "gardens_point", model, sorted((gp / "day_right").glob("*.jpg")),
                [gp_queries("night_right", 0, 50), gp_queries("day_left", 0, 50),
                 unknown("nordland", nl_summer[0:2000:10])],
                [gp_queries("night_right", 50, 100), gp_queries("day_left", 50, 100),
                 unknown("nordland", nl_summer[5:2000:10])],
                Neighbourhood(radius_m=None, frames=2), args.precision, length, verifier)
        if "nordland" in args.maps:
            res["maps"]["nordland"][f"L={length}"] = evaluate(
                "nordland", model, val.db_paths,
                [nl_q[0], unknown("gp night", gp_night[:50]), unknown("gp day_left", gp_left[:50])],
                [nl_q[1], unknown("gp night", gp_night[50:]), unknown("gp day_left", gp_left[50:])],
                Neighbourhood(radius_m=None, frames=1), args.precision, length, verifier)
    results = ROOT / "benchmarks" / "results"
    write_json(results / f"{args.name}.json", res)
    command = " ".join(["python benchmarks/confidence.py", *sys.argv[1:]])
    verified = f", verified ({verifier.method}, K = {verifier.k})" if verifier else ""
    lines = [f"# Confidence estimators on held-out answers (`{command}`, {res['model']})", "",
             "AUC-PR of 'the answer is right' (unknown-place answers count as wrong), on each map's test answers "
             "pooled and per test set (with the unknown-place answers); the fused estimator is the calibrated "
             f"probability, fitted on the calibration split; target precision {args.precision}. No Corridor data "
             "here.", "", f"## Single frames{verified}", "", *table(res, 0), "",
             f"## Sequences of {args.sequence} frames (answers past the warm-up){verified}", "",
             *table(res, args.sequence)]
    write_text(results / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
