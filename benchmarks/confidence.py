"""How well each confidence estimator tells right from wrong answers, in the form of Zaffar et al. (CVPR 2024).

    python benchmarks/confidence.py [--model effnet-lite0-gem] [--precision 0.9]

Two maps, each calibrated on validation queries and judged on held-out ones (no place or photo in both):

* Gardens Point: database day_right 0-99; calibration night_right and day_left 0-49 pooled, plus 200 Nordland
  summer frames (0-1990, every 10th) as photos of places the map does not hold; test night_right and day_left 50-99
  plus 200 other Nordland frames (5-1995, every 10th).
* Nordland: database summer 1500-2499 (dark frames dropped); calibration winter 1500-1999 plus Gardens Point
  night_right and day_left 0-49 as unknown places; test winter 2000-2499 plus Gardens Point 50-99.

Per estimator (single frame; sequences have no confidence of their own yet): AUC-PR (average precision) of
"the top-1 is right" on the test answers, unknown-place answers counting as wrong. Estimators: top-1 cosine, the
margin over the best other place, SUE (the spatial spread of the top-10 poses, lower = surer; database ids here,
as these maps carry no coordinates), SD (the top-1 z-scored within its top-100), and the fused, calibrated
probability (``edgevpr.deploy.decision.calibrate``). For the fused one also: held-out ECE (10 bins) and Brier,
the precision of its "known" answers at the target precision, and the fraction of unknown-place queries rejected.
No Corridor data is available here. Writes benchmarks/results/confidence.{json,md}.
"""

from __future__ import annotations

import argparse

import numpy as np
from heldout import ROOT, data_root
from sklearn.metrics import average_precision_score

from edgevpr.data.datasets import open_dataset
from edgevpr.deploy.decision import (
    DECISION_DEPTH,
    FEATURES,
    Coordinates,
    Neighbourhood,
    calibrate,
    evidence,
    expected_calibration_error,
)
from edgevpr.eval.extract import extract
from edgevpr.models.model import load_model
from edgevpr.utils import default_cache_dir, write_json, write_text

ESTIMATORS = {"top-1 cosine": "top1", "margin": "margin", "SUE (spread)": "log_spread", "SD (z-score)": "top1_z"}


def descriptors(model, paths) -> np.ndarray:
    return extract(model, list(paths), 32, default_cache_dir(), False, 0, "cpu", None, progress=False).descriptors


def answers(q: np.ndarray, db: np.ndarray, positives: list, hood: Neighbourhood) -> tuple[np.ndarray, np.ndarray]:
    """Queries [Q, D] against a database [N, D] -> (evidence [Q, F], top-1 right [Q]); positives[i] empty: an
    unknown place (always wrong)."""
    nan = np.full(len(db), np.nan)
    coords = Coordinates(nan, nan, nan, nan)
    s = q @ db.T
    top = np.argsort(-s, axis=1)[:, :DECISION_DEPTH]
    feats, right = [], []
    for i in range(len(q)):
        ev = evidence(s[i, top[i]], top[i], coords, hood)
        feats.append([ev[f] for f in FEATURES])
        right.append(int(top[i, 0]) in set(positives[i]))
    return np.array(feats), np.array(right)


def evaluate(name: str, model, db_paths, cal_sets, test_sets, hood: Neighbourhood, target: float) -> dict:
    """cal_sets / test_sets: lists of (query paths, positives per query; [] = unknown place)."""
    db = descriptors(model, db_paths)

    def pooled(sets):
        parts = [answers(descriptors(model, paths), db, pos, hood) for paths, pos in sets]
        unknown = np.concatenate([[len(p) == 0 for p in pos] for _, pos in sets])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), unknown

    xc, yc, uc = pooled(cal_sets)
    xt, yt, ut = pooled(test_sets)
    cal = calibrate(xc, yc, target, hood, unknown=int(uc.sum()), refuse=False)  # `calibrate` would refuse
    p = np.array([cal.probability(dict(zip(FEATURES, row, strict=True))) for row in xt])
    row = {"calibration_answers": int(len(yc)), "calibration_right": int(yc.sum()), "test_answers": int(len(yt)),
           "test_right": int(yt.sum()), "test_unknown": int(ut.sum()), "auc_pr": {}}
    for label, feat in ESTIMATORS.items():
        score = xt[:, FEATURES.index(feat)] * (-1 if feat == "log_spread" else 1)
        row["auc_pr"][label] = float(average_precision_score(yt, score))
    row["auc_pr"]["fused (calibrated)"] = float(average_precision_score(yt, p))
    known = p >= cal.threshold
    row.update({"ece": expected_calibration_error(p, yt)[0], "brier": float(np.mean((p - yt) ** 2)),
                "threshold": cal.threshold if np.isfinite(cal.threshold) else None,
                "target_reached_on_calibration": bool(np.isfinite(cal.threshold)),
                "calibration_best_precision": cal.precision,
                "known_precision": float(yt[known].mean()) if known.any() else None,
                "known_share_of_known_places": float(known[~ut].mean()),
                "unknown_rejected": float((~known[ut]).mean()), "calibration_ece": cal.ece})
    print(name, row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0-gem", help="model (default effnet-lite0-gem)")
    ap.add_argument("--precision", type=float, default=0.9, help="target precision of 'known' (default 0.9)")
    args = ap.parse_args()
    data = data_root()
    gp, nl = data / "gardens_point", data / "nordland_64x32"
    model = load_model(args.model).eval()

    def gp_queries(folder, a, b):  # against the whole day_right database: +-2 frames
        ds = open_dataset(gp / "day_right", gp / folder, aligned_tolerance=2)
        return [ds.q_paths[i] for i in range(a, b)], [ds.positives[i].tolist() for i in range(a, b)]

    def unknown(paths):
        return list(paths), [[] for _ in paths]

    nl_summer = sorted((nl / "summer").glob("*.png"))
    res: dict = {"model": model.name, "target_precision": args.precision, "maps": {}}
    res["maps"]["gardens_point"] = evaluate(
        "gardens_point", model, sorted((gp / "day_right").glob("*.jpg")),
        [gp_queries("night_right", 0, 50), gp_queries("day_left", 0, 50), unknown(nl_summer[0:2000:10])],
        [gp_queries("night_right", 50, 100), gp_queries("day_left", 50, 100), unknown(nl_summer[5:2000:10])],
        Neighbourhood(radius_m=None, frames=2), args.precision)
    val = open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1, frames=(1500, 2500), drop_dark=10)
    cut = int(np.searchsorted([int(p.stem.split("-")[1]) for p in val.q_paths], 20000))  # winter 2000- (test)
    nl_q = [(val.q_paths[:cut], [p.tolist() for p in val.positives[:cut]]),
            (val.q_paths[cut:], [p.tolist() for p in val.positives[cut:]])]
    gp_night = sorted((gp / "night_right").glob("*.jpg"))
    gp_left = sorted((gp / "day_left").glob("*.jpg"))
    res["maps"]["nordland"] = evaluate(
        "nordland", model, val.db_paths, [nl_q[0], unknown(gp_night[:50] + gp_left[:50])],
        [nl_q[1], unknown(gp_night[50:] + gp_left[50:])], Neighbourhood(radius_m=None, frames=1), args.precision)
    write_json(ROOT / "benchmarks" / "results" / "confidence.json", res)
    est = [*ESTIMATORS, "fused (calibrated)"]
    lines = [f"# Confidence estimators on held-out answers (`python benchmarks/confidence.py`, {res['model']})", "",
             "AUC-PR of 'the top-1 is right' (unknown-place answers count as wrong); the fused estimator is the "
             f"calibrated probability, fitted on the calibration split; target precision {args.precision}. "
             "Single frame only; no Corridor data here.", "",
             "| map | test answers (right / unknown) | " + " | ".join(est) + " | ECE | Brier | known precision | "
             "unknown rejected | known places answered 'known' |",
             "|---|---|" + "---:|" * (len(est) + 5)]
    for name, r in res["maps"].items():
        kp = "-" if r["known_precision"] is None else f"{r['known_precision']:.3f}"
        if not r["target_reached_on_calibration"]:
            kp = f"refused (calibration reaches at most {r['calibration_best_precision']:.3f}: nothing 'known')"
        lines.append(f"| {name} | {r['test_answers']} ({r['test_right']} / {r['test_unknown']}) | " +
                     " | ".join(f"{r['auc_pr'][e]:.3f}" for e in est) +
                     f" | {r['ece']:.3f} | {r['brier']:.3f} | {kp} | {r['unknown_rejected']:.3f} | "
                     f"{r['known_share_of_known_places']:.3f} |")
    write_text(ROOT / "benchmarks" / "results" / "confidence.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
