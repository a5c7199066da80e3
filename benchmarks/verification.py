"""Geometric verification re-ranking with SIFT: R@1 / R@5 and ms per query for K = 0 (off) / 10 / 25, and the
fusion weight. SIFT is what `--verify-with auto` uses for a model without local features of its own (a ViT's ONNX
export, SeqSLAM pixels); a model's own features are measured by benchmarks/verification_tokens.py.

    python benchmarks/verification.py [--model effnet-lite0-gem]

The fusion weight and the default K are chosen on validation queries (Gardens Point night_right 0-69 against the
whole day_right database) and reported on held-out ones: night_right 70-99 and day_left 0-99 (viewpoint change)
against day_right, and Nordland winter 2000-2499 against summer 2000-2499 (64x32 thumbnails: too small for local
features, so verification falls back to the similarity order there; the table says how often). ms/query is the
verification alone (query features, matching and MAGSAC for K candidates; database features cached after first
use, their one-time cost reported apart), beside the single-frame search. Writes
benchmarks/results/verification.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from heldout import ROOT, data_root, gardens_point_queries
from sequence import similarities

from edgevpr.data.datasets import open_dataset
from edgevpr.data.images import load_image
from edgevpr.deploy.verify import Verifier, inliers, local_features
from edgevpr.models.model import load_model
from edgevpr.utils import write_json, write_text

KS = (10, 25)
WEIGHTS = (0.01, 0.02, 0.05, 0.1, 0.2, 1.0)


def candidates(model, ds, depth: int = max(KS)):
    """Per query: similarity-ranked top-``depth`` (scores, ids), and whether each id is a positive."""
    s = similarities(model, ds)
    top = np.argsort(-s, axis=1)[:, :depth]
    return np.take_along_axis(s, top, 1), top


def inlier_table(ds, top: np.ndarray, v: Verifier) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Inliers [Q, depth] of each query against its candidates (-1: query not verifiable), which queries were
    verifiable, ms/query for K = max(KS) and the ms per database image's features (one-time)."""
    t0 = time.perf_counter()
    for j in sorted({int(j) for j in top.ravel()}):
        v.db_features(str(ds.db_paths[j]))
    db_ms = (time.perf_counter() - t0) * 1000 / max(1, len({int(j) for j in top.ravel()}))
    out, ok, t = np.full(top.shape, -1), np.zeros(len(top), bool), 0.0
    for i, row in enumerate(top):
        t1 = time.perf_counter()
        q = local_features(load_image(ds.q_paths[i]), v.max_side, v.features)
        if len(q.desc) >= v.min_features:
            ok[i] = True
            out[i] = [inliers(q, v.db_features(str(ds.db_paths[j]))) for j in row]
        t += time.perf_counter() - t1
    return out, ok, t * 1000 / len(top), db_ms


def recall(scores, top, counts, ok, ds, k: int, weight: float) -> tuple[float, float]:
    """R@1, R@5 after re-ranking the first k candidates (k = 0: similarity order)."""
    r1 = r5 = 0
    n = 0
    for i in range(len(top)):
        pos = set(ds.positives[i].tolist())
        if not pos:
            continue
        n += 1
        order = np.arange(top.shape[1])
        if k and ok[i]:
            fused = scores[i, :k] + weight * np.log1p(counts[i, :k])
            order = np.r_[np.argsort(-fused, kind="stable"), np.arange(k, top.shape[1])]
        ranked = top[i, order]
        r1 += int(ranked[0] in pos)
        r5 += int(bool(set(ranked[:5].tolist()) & pos))
    return r1 / n, r5 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0-gem", help="model (default effnet-lite0-gem)")
    args = ap.parse_args()
    data = data_root()
    nl = data / "nordland_64x32"
    model = load_model(args.model).eval()
    v = Verifier()

    sets = {"validation: gardens_point night 0-69": gardens_point_queries(data, "night_right", 0, 70),
            "gardens_point night 70-99": gardens_point_queries(data, "night_right", 70, 100),
            "gardens_point day_left 0-99": gardens_point_queries(data, "day_left", 0, 100),
            "nordland 2000-2499": open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1,
                                               frames=(2000, 2500), drop_dark=10)}
    tables = {}
    for name, ds in sets.items():
        scores, top = candidates(model, ds)
        counts, ok, ms, db_ms = inlier_table(ds, top, v)
        tables[name] = (ds, scores, top, counts, ok, ms, db_ms)
        print(name, "verifiable", ok.mean(), "ms/query", ms, flush=True)
    ds, scores, top, counts, ok, _, _ = tables["validation: gardens_point night 0-69"]
    grid = {(k, w): recall(scores, top, counts, ok, ds, k, w)[0] for k in KS for w in WEIGHTS}
    best_k, best_w = max(grid, key=lambda kw: (grid[kw], -kw[0], -kw[1]))  # ties: fewer candidates, lower weight
    res = {"model": model.name, "chosen": {"k": best_k, "weight": best_w}, "validation_grid":
           {f"K={k} w={w}": r for (k, w), r in grid.items()}, "sets": {}}
    for name, (ds, scores, top, counts, ok, ms, db_ms) in tables.items():
        row = {"queries": int(sum(len(p) > 0 for p in ds.positives)), "verifiable": float(ok.mean()),
               "ms_per_query_verify_k25": ms, "ms_per_db_image_features": db_ms}
        for k in (0, *KS):
            row[f"K={k}"] = recall(scores, top, counts, ok, ds, k, best_w)
        res["sets"][name] = row
    write_json(ROOT / "benchmarks" / "results" / "verification.json", res)
    lines = [f"# Geometric verification re-ranking (`python benchmarks/verification.py`, {res['model']})", "",
             "SIFT (RootSIFT, <= 1000 points at <= 640 px) + mutual NN with ratio test 0.8 + MAGSAC++ fundamental "
             f"matrix; candidates re-ranked by similarity + w log(1 + inliers). Chosen on validation: K = {best_k}, "
             f"w = {best_w} (ties: fewer candidates, lower weight).", "",
             "| set | queries | verifiable | R@1 / R@5 K=0 | K=10 | K=25 | verify ms/query (K=25) | "
             "db features ms/img |",
             "|---|---:|---:|---|---|---|---:|---:|"]
    for name, r in res["sets"].items():
        lines.append(f"| {name} | {r['queries']} | {r['verifiable']:.2f} | " +
                     " | ".join(f"{r[f'K={k}'][0]:.3f} / {r[f'K={k}'][1]:.3f}" for k in (0, *KS)) +
                     f" | {r['ms_per_query_verify_k25']:.0f} | {r['ms_per_db_image_features']:.0f} |")
    lines += ["", "Validation R@1 by K and w: " + ", ".join(f"K={k} w={w}: {r:.3f}" for (k, w), r in grid.items())]
    write_text(ROOT / "benchmarks" / "results" / "verification.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
