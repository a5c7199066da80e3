"""Learned verification against SIFT and the model's own features: R@1 unverified -> verified at K = 5/10/25, the
cost split into extraction, matching and fitting (one thread and two), and the adaptive gate.

    python benchmarks/verification_learned.py [--model effnet-lite0-gem] [--methods sift,tokens,aliked,disk]

Sets (database Gardens Point day_right 0-99; Nordland summer): validation Gardens Point night_right 0-49 (the fusion
weight and the gate level are chosen there, per method); held out: night_right 50-99, day_left 0-99 and Nordland
winter 2000-2099 (64x32 thumbnails: the learned extractors find few keypoints there; the table says how many
queries were verifiable). Each query's top 25 by similarity is verified once; K = 5/10/25 re-rank its first K.
Fusion: similarity + w log(1 + inliers), w from ``WEIGHTS`` (ties: the lower weight).

Cost (ms): per query, extracting its features; per candidate pair, matching and the MAGSAC++ fit; per database image
once, its features (kept at ``index build`` or cached: not paid per query). Measured at one thread and at two on the
first 20 night queries with K = 10 (each library's pool set by ``edgevpr.threads``). PyTorch only: learned
features have no onnxruntime path (docs/methods.md says why).

The gate: verify only answers whose unverified ``margin_z`` is below a level (``--verify-below``); the level is the
lowest on validation whose R@1 is within 0.01 of verifying every answer; held out: share verified, R@1, and the mean
cost per frame beside the model's own embedding time (one thread). Writes
benchmarks/results/verification_learned.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from heldout import ROOT, data_root, gardens_point_queries
from sequence import similarities

from edgevpr import threads
from edgevpr.data.datasets import open_dataset
from edgevpr.data.images import load_image
from edgevpr.deploy.decision import DECISION_DEPTH, Coordinates, Neighbourhood, evidence
from edgevpr.deploy.verify import Verifier, fit, matches, verifier_for
from edgevpr.models.model import load_model
from edgevpr.utils import write_json, write_text

KS = (5, 10, 25)
WEIGHTS = (0.05, 0.1, 0.2, 0.5, 2.0)
GATES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)
TIMED_QUERIES = 20


#: keypoints per image for the learned methods (``--max-keypoints``)
KEYPOINTS = {"n": 1024}


def make_verifier(method: str, model) -> Verifier:
    if method in ("aliked", "disk"):
        from edgevpr.deploy.learned import LearnedLocal

        return Verifier.with_learned(LearnedLocal(method, KEYPOINTS["n"]), k=max(KS))
    return verifier_for(model, model.transform(), max(KS), method)


def run_set(ds, scores: np.ndarray, top: np.ndarray, v: Verifier) -> dict:
    """Inliers [Q, 25] (-1: query not verifiable) and the time split of one verifier on one set."""
    db_t, cands = 0.0, sorted({int(j) for j in top.ravel()})
    t0 = time.perf_counter()
    for j in cands:
        v.db_features(str(ds.db_paths[j]))
    db_t = time.perf_counter() - t0
    counts, q_t, m_t, f_t = np.full(top.shape, -1), 0.0, 0.0, 0.0
    for i, row in enumerate(top):
        t0 = time.perf_counter()
        q = v.features_of(load_image(ds.q_paths[i]))
        q_t += time.perf_counter() - t0
        if len(q.desc) < v.min_features:
            continue
        for c, j in enumerate(row):
            d = v.db_features(str(ds.db_paths[j]))
            t0 = time.perf_counter()
            a, b = matches(q, d, v.ratio, v.matcher)
            t1 = time.perf_counter()
            counts[i, c] = fit(q.xy[a], d.xy[b], v.threshold_px)
            m_t, f_t = m_t + t1 - t0, f_t + time.perf_counter() - t1
    n, pairs = len(top), max(1, int((counts >= 0).sum()))
    return {"counts": counts, "verifiable": float((counts[:, 0] >= 0).mean()),
            "ms": {"query_features": q_t * 1000 / n, "match_per_pair": m_t * 1000 / pairs,
                   "fit_per_pair": f_t * 1000 / pairs, "db_features_per_image": db_t * 1000 / max(1, len(cands))}}


def early_stopped(counts: np.ndarray, k: int, certain: int | None) -> tuple[np.ndarray, float]:
    """Inliers [Q, >= k] as ``Verifier.certain`` leaves them (candidates after the first with >= ``certain`` inliers
    not verified: 0) and the share of the k pairs per verifiable query matched."""
    out = counts[:, :k].copy()
    if certain is None:
        return out, 1.0
    done = []
    for row in out:
        hit = np.flatnonzero(row >= certain)
        if len(hit) and row[0] >= 0:
            row[hit[0] + 1:] = 0
        done.append(hit[0] + 1 if len(hit) else k)
    ok = counts[:, 0] >= 0
    return out, float(np.mean(np.asarray(done)[ok]) / k) if ok.any() else 1.0


def certain_level(counts: np.ndarray, top: np.ndarray, ds, w: float) -> int | None:
    """The early stop chosen on validation: one more inlier than any wrong candidate had, where the weight makes
    it safe (``Verifier.__post_init__``); else None."""
    wrong = [c for i in range(len(top)) for j, c in zip(top[i], counts[i], strict=True)
             if c >= 0 and j not in set(ds.positives[i].tolist())]
    level = int(max(wrong, default=0)) + 1
    return level if w * np.log1p(level) > 2.0 else None


def rerank_r1(scores, top, counts, ds, k: int, w: float, verify: np.ndarray | None = None) -> float:
    """R@1 after re-ranking the first ``k`` of each verifiable query (``verify`` [Q] bool: only those)."""
    hits = n = 0
    for i in range(len(top)):
        pos = set(ds.positives[i].tolist())
        if not pos:
            continue
        n += 1
        first = top[i, 0]
        if k and counts[i, 0] >= 0 and (verify is None or verify[i]):
            fused = scores[i, :k] + w * np.log1p(counts[i, :k])
            first = top[i, int(np.argmax(fused))]
        hits += int(first in pos)
    return hits / max(1, n)


def margin_z(s_full: np.ndarray) -> np.ndarray:
    """Per query the unverified ``margin_z`` (the decision's evidence; neighbourhood +-2 ids) [Q]."""
    nan = np.full(s_full.shape[1], np.nan)
    coords, hood = Coordinates(nan, nan, nan, nan), Neighbourhood(radius_m=None, frames=2)
    out = []
    for row in s_full:
        ids = np.argsort(-row)[:DECISION_DEPTH]
        out.append(evidence(row[ids], ids, coords, hood)["margin_z"])
    return np.asarray(out)


def timed(method: str, model, ds, top: np.ndarray, n_threads: int) -> dict:
    """ms per query (features + K=10 matches + fits, database features cached first) at ``n_threads``."""
    threads.configure(n_threads)
    v = make_verifier(method, model)
    part = top[:TIMED_QUERIES, :10]
    for j in sorted({int(j) for j in part.ravel()}):
        v.db_features(str(ds.db_paths[j]))
    class Sub:  # the first TIMED_QUERIES queries
        q_paths, db_paths = ds.q_paths[:TIMED_QUERIES], ds.db_paths
    r = run_set(Sub, None, part, v)
    return {"query_features": r["ms"]["query_features"], "match_k10": r["ms"]["match_per_pair"] * 10,
            "fit_k10": r["ms"]["fit_per_pair"] * 10}


def score(out: dict, sets: dict, sims: dict) -> None:
    """One method's inliers per set (``out["sets"][name]["counts"]``) -> its weight, K, gate and early stop chosen on
    validation, and per set R@1 at each K, with the gate and with the early stop (written into ``out``)."""
    s, scores, top, mz = sims["validation: gardens_point night 0-49"]
    val = sets["validation: gardens_point night 0-49"]
    counts = np.asarray(out["sets"]["validation: gardens_point night 0-49"]["counts"])
    grid = {(k, w): rerank_r1(scores, top, counts, val, k, w) for k in KS for w in WEIGHTS}
    full = max(grid.values())
    # among the (K, w) at the best validation R@1: the fewest pairs matched (K times the early stop's share, which
    # a larger weight makes safe), then the smaller K and weight: equal accuracy for less work
    def cost(kw):
        k, w = kw
        return k * early_stopped(counts, k, certain_level(counts, top, val, w))[1], k, w

    k_best, w = min((kw for kw, r in grid.items() if r == full), key=cost)
    gate = next((g for g in GATES if rerank_r1(scores, top, counts, val, k_best, w, mz < g) >= full - 0.01), None)
    certain = certain_level(counts, top, val, w)
    out |= {"weight": w, "k": k_best, "gate": gate, "certain": certain,
            "validation_grid": {f"K={k} w={w}": r for (k, w), r in grid.items()}}
    for name, ds in sets.items():
        s, scores, top, mz = sims[name]
        r = out["sets"][name]
        c = np.asarray(r["counts"])
        r["r1"] = {f"K={k}": rerank_r1(scores, top, c, ds, k, w) for k in (0, *KS)}
        stopped, share = early_stopped(c, k_best, certain)
        r["early_stop"] = {"share_of_pairs": share, "r1": rerank_r1(scores, top, stopped, ds, k_best, w)}
        if gate is not None:
            on = mz < gate
            r["gate"] = {"share_verified": float(on.mean()), "r1": rerank_r1(scores, top, c, ds, k_best, w, on)}
        r["counts"] = c.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0-gem", help="model (default effnet-lite0-gem)")
    ap.add_argument("--methods", default="sift,tokens,aliked,disk",
                    help="verifiers, comma-separated (default sift,tokens,aliked,disk)")
    ap.add_argument("--limit", type=int, default=0, help="queries per set, for a quick look (default 0: all)")
    ap.add_argument("--max-keypoints", type=int, default=1024,
                    help="learned features: keypoints per image (default 1024, the runtime's)")
    ap.add_argument("--timing-only", action="store_true",
                    help="measure the cost alone again (a quiet machine) for --methods already in the results file "
                         "(default off)")
    ap.add_argument("--rescore", action="store_true",
                    help="choose and score again from the inliers in the results file (no verification run) "
                         "(default off)")
    ap.add_argument("--keep", action="store_true",
                    help="add to the methods already in the results file instead of starting anew (default off)")
    args = ap.parse_args()
    KEYPOINTS["n"] = args.max_keypoints
    data = data_root()
    nl = data / "nordland_64x32"
    model = load_model(args.model).eval()
    threads.configure(2)

    sets = {"validation: gardens_point night 0-49": gardens_point_queries(data, "night_right", 0, 50),
            "gardens_point night 50-99": gardens_point_queries(data, "night_right", 50, 100),
            "gardens_point day_left 0-99": gardens_point_queries(data, "day_left", 0, 100),
            "nordland winter 2000-2099 (64x32)": open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1,
                                                              frames=(2000, 2100))}
    if args.limit:
        for ds in sets.values():
            ds.q_paths, ds.positives = ds.q_paths[:args.limit], ds.positives[:args.limit]
    sims = {}
    for name, ds in sets.items():
        s = similarities(model, ds)
        top = np.argsort(-s, axis=1)[:, :max(KS)]
        sims[name] = (s, np.take_along_axis(s, top, 1), top, margin_z(s))
    t0 = time.perf_counter()
    x = model.transform().array(load_image(sets["gardens_point night 50-99"].q_paths[0]))[None]
    import torch

    threads.configure(1)
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        for _ in range(3):
            model(xt)
        t0 = time.perf_counter()
        for _ in range(20):
            model(xt)
    embed_ms = (time.perf_counter() - t0) * 1000 / 20
    threads.configure(2)
    out_file = ROOT / "benchmarks" / "results" / "verification_learned.json"
    if args.rescore:
        res = json.loads(out_file.read_text())
        for out in res["methods"].values():
            score(out, sets, sims)
        write_json(out_file, res)
        return write_report(res)
    if args.timing_only:
        res = json.loads(out_file.read_text())
        res["embed_ms_one_thread"] = embed_ms
        for method in args.methods.split(","):
            res["methods"][method]["timing"] = {n: timed(method, model, sets["gardens_point night 50-99"], sims[
                "gardens_point night 50-99"][2], n) for n in (1, 2)}
            res["methods"][method]["timing_quiet"] = True
        write_json(out_file, res)
        return write_report(res)
    res = {"model": model.name, "embed_ms_one_thread": embed_ms, "methods": {}}
    if args.keep and out_file.is_file():
        res["methods"] = json.loads(out_file.read_text())["methods"]
    for method in args.methods.split(","):
        v = make_verifier(method, model)
        out = {"method": v.method, "sets": {}}
        for name, ds in sets.items():
            s, scores, top, mz = sims[name]
            r = run_set(ds, scores, top, v)
            out["sets"][name] = r
            print(method, name, "verifiable", r["verifiable"], r["ms"], flush=True)
        score(out, sets, sims)
        out["timing"] = {n: timed(method, model, sets["gardens_point night 50-99"], sims[
            "gardens_point night 50-99"][2], n) for n in (1, 2)}
        threads.configure(2)
        res["methods"][method] = out
        write_json(out_file, res)
    write_report(res)


#: held-out sets whose stream cost the report states
ADAPTIVE_SETS = ("gardens_point night 50-99", "gardens_point day_left 0-99")


def adaptive_ms(out: dict, t: dict, name: str) -> float:
    """Mean verification ms per frame of a stream of set ``name`` (database features stored): the gate's share of
    frames pays the query's features and the early stop's share of the K pairs (matching + fitting, from the K = 10
    timing ``t``)."""
    r = out["sets"][name]
    share = r["gate"]["share_verified"] if r.get("gate") else 1.0
    pairs = r["early_stop"]["share_of_pairs"] * out["k"]
    return share * (t["query_features"] + pairs * (t["match_k10"] + t["fit_k10"]) / 10)


def write_report(res: dict) -> None:
    """The results as a table for people (``verification_learned.md``)."""
    names = list(next(iter(res["methods"].values()))["sets"])
    lines = [f"# Learned verification (`python benchmarks/verification_learned.py`, {res['model']})", "",
             "Each query's top 25 by similarity verified once; R@1 re-ranking its first K by similarity + w "
             "log(1 + inliers), K, w, the early stop and the gate chosen on validation (night 0-49) per method: the "
             "best R@1, then the fewest pairs matched. Database Gardens Point day_right 0-99 / Nordland summer.", "",
             "| method | set | queries | verifiable | R@1 K=0 | K=5 | K=10 | K=25 | gate: share verified / R@1 | "
             "early stop: share of pairs / R@1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for m, out in res["methods"].items():
        for name in names:
            r = out["sets"][name]
            g = r.get("gate")
            lines.append(f"| {m} | {name} | {len(r['counts'])} | {r['verifiable']:.2f} | " + " | ".join(
                f"{r['r1'][f'K={k}']:.2f}" for k in (0, *KS)) + " | " +
                (f"{g['share_verified']:.2f} / {g['r1']:.2f}" if g else "no level reaches the full gain") + " | " +
                (f"{r['early_stop']['share_of_pairs']:.2f} / {r['early_stop']['r1']:.2f}" if out.get("certain")
                 else "not safe at this weight") + " |")
    lines += ["", f"Cost on this CPU, ms (GP night 50-99; the model's own embedding: "
              f"{res['embed_ms_one_thread']:.1f} ms per frame on one thread, torch):", "",
              "| method | what | w / K / gate / early stop | threads | query features | matching (K=10) | "
              "fitting (K=10) | total per verified query | database features per image (once) | adaptive mean per "
              "frame: gate + early stop, night 50-99 / day_left |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for m, out in res["methods"].items():
        db = out["sets"]["gardens_point night 50-99"]["ms"]["db_features_per_image"]
        for n, t in out["timing"].items():
            what = out["method"].split("; similarity")[0]  # the fusion's weight is the next column's, chosen here
            lines.append(f"| {m} | {what} | {out['weight']} / {out['k']} / {out['gate']} / "
                         f"{out.get('certain')} | {n} | "
                         f"{t['query_features']:.0f} | {t['match_k10']:.0f} | {t['fit_k10']:.0f} | "
                         f"{t['query_features'] + t['match_k10'] + t['fit_k10']:.0f} | {db:.0f} | " +
                         " / ".join(f"{adaptive_ms(out, t, name):.0f}" for name in ADAPTIVE_SETS) + " |")
    if "disk" not in res["methods"]:
        lines += ["", "DISK + LightGlue: not in this file yet. A run over the same sets did not finish within a "
                  "working "
                  "session on this shared 2-core machine: DISK took 1.5 s per 640 px image and LightGlue 0.5-1.0 s "
                  "per pair at 1024 keypoints in a first measurement (`--methods disk --keep` adds it)."]
    write_text(ROOT / "benchmarks" / "results" / "verification_learned.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
