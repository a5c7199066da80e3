"""Geometric verification with a model's own local features beside SIFT, on the same candidates of the same model.

    python benchmarks/verification_tokens.py --model runs/weitop/cpu-weiad-nodistill/best
    python benchmarks/verification_tokens.py --model effnet-lite0-gem --name verification_cnn

Issue 27 asks for the ViT models' own patch tokens where they exist if that measures better than SIFT; a CNN's
feature map is the same kind of evidence. Local features here (``deploy.embed.patch_tokens``, as
``--verify-with tokens`` takes them): a ViT's patch tokens at full keep ratio (a 10x10 grid at 160 px for the
hybrid ViT) or a CNN's stride-16 feature map (``CNNBackbone.local_map``: 14x14 at 224 px for EfficientNet-lite0),
at the cell centres (``deploy.verify.patch_features``), mutual nearest neighbours (with or without Lowe's ratio
test), and a MAGSAC++ fundamental matrix (0.5 cell); SIFT as in ``benchmarks/verification.py``. Candidates
re-ranked by similarity + w log(1 + inliers) over the top K. Costs: matching + MAGSAC per query for K = 25 with
every image's features at hand (SIFT: the query's SIFT too), and apart the forward pass for the local features per
image (a deployment takes the query's from the pass that makes its descriptor, ``Localizer.embed_local``; SIFT's
database features are likewise one-time).

Places held out from the model's training (the hybrid ViT: Gardens Point 0-59, Nordland 0-1499; the ImageNet CNN:
all): K, w and the ratio are chosen on the mean R@1 of two validation sets, one of each map kind (Nordland winter
1500-1999 and Gardens Point night 60-79), and reported on Nordland 2000-2499, Gardens Point night 80-99 and day_left
60-99, beside the library's fixed K and w. Nordland's database is summer 1500-2499, Gardens Point's day_right 0-99.
Writes benchmarks/results/NAME.{json,md} (default verification_tokens).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from heldout import ROOT, data_root
from verification import KS, Verifier, candidates, inlier_table, recall

from edgevpr.data.datasets import open_dataset
from edgevpr.data.images import load_image
from edgevpr.deploy.embed import patch_tokens
from edgevpr.deploy.localize import open_model
from edgevpr.deploy.verify import TOKEN_K, TOKEN_WEIGHT, Features, inliers, patch_features
from edgevpr.utils import write_json, write_text

WEIGHTS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
RATIOS = (0.8, 1.0)


class TokenFeatures:
    """Patch-token Features per image path (``deploy.embed.patch_tokens``, as ``--verify-with tokens`` takes
    them), computed on first use and kept."""

    def __init__(self, model) -> None:
        self.model, self.tf, self.cache = model, model.transform(), {}

    def __call__(self, path) -> Features:
        key = str(path)
        if key not in self.cache:
            got = patch_tokens(self.model, self.tf.array(load_image(path))[None])
            if got is None:
                raise ValueError(f"{self.model.name}: no local features of its own to verify with")
            self.cache[key] = patch_features(got[0][0], got[1])
        return self.cache[key]


def token_forward_ms(ds, top: np.ndarray, feats: TokenFeatures) -> float:
    """Computes (and keeps) the tokens of every query and candidate -> ms per image of that forward pass (a
    deployment would take the query's from the pass that makes its descriptor)."""
    paths = [str(p) for p in ds.q_paths] + [str(ds.db_paths[j]) for j in sorted({int(j) for j in top.ravel()})]
    todo = [p for p in paths if p not in feats.cache]
    t0 = time.perf_counter()
    for p in todo:
        feats(p)
    return (time.perf_counter() - t0) * 1000 / max(1, len(todo))


def token_table(ds, top: np.ndarray, feats: TokenFeatures, ratio: float) -> tuple[np.ndarray, float]:
    """Token inliers [Q, depth] of each query against its candidates (tokens already computed), and the ms/query
    of matching and MAGSAC (K = depth)."""
    out, t = np.zeros(top.shape, np.int64), 0.0
    for i, row in enumerate(top):
        t0 = time.perf_counter()
        q = feats(ds.q_paths[i])
        out[i] = [inliers(q, feats(ds.db_paths[j]), threshold_px=0.5, ratio=ratio) for j in row]
        t += time.perf_counter() - t0
    return out, t * 1000 / len(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/weitop/cpu-weiad-nodistill/best",
                    help="a model with its own local features: a torch ViT's patch tokens, a torch CNN's or a CNN "
                         "ONNX export's stride-16 map (default runs/weitop/cpu-weiad-nodistill/best)")
    ap.add_argument("--name", default="verification_tokens",
                    help="results file stem in benchmarks/results (default verification_tokens)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = data_root()
    gp, nl = data / "gardens_point", data / "nordland_64x32"
    model = open_model(args.model).eval()

    def part(ds, keep):
        ds.q_paths = [ds.q_paths[i] for i in keep]
        ds.positives = [ds.positives[i] for i in keep]
        return ds

    def nordland(lo, hi):
        ds = open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1, frames=(1500, 2500), drop_dark=10)
        stem = [int(p.stem.split("-")[1]) for p in ds.q_paths]
        return part(ds, [i for i, s in enumerate(stem) if lo * 10 <= s < hi * 10])

    def gp_set(folder, a, b):
        return part(open_dataset(gp / "day_right", gp / folder, aligned_tolerance=2), range(a, b))

    sets = {"validation: nordland 1500-1999": nordland(1500, 2000),
            "validation: gardens_point night 60-79": gp_set("night_right", 60, 80),
            "nordland 2000-2499": nordland(2000, 2500), "gardens_point night 80-99": gp_set("night_right", 80, 100),
            "gardens_point day_left 60-99": gp_set("day_left", 60, 100)}
    feats, sift = TokenFeatures(model), Verifier()
    tables = {}
    for name, ds in sets.items():
        scores, top = candidates(model, ds)
        forward_ms = token_forward_ms(ds, top, feats)
        tok = {r: token_table(ds, top, feats, r) for r in RATIOS}
        s_counts, s_ok, s_ms, _ = inlier_table(ds, top, sift)
        tables[name] = (ds, scores, top, tok, (s_counts, s_ok, s_ms), forward_ms)
        print(name, {r: round(ms) for r, (_, ms) in tok.items()}, "ms/query; SIFT verifiable", s_ok.mean(), flush=True)

    def r1(name, how, k, w, ratio=RATIOS[0]):
        ds, scores, top, tok, (s_counts, s_ok, _), _ = tables[name]
        counts, ok = (tok[ratio][0], np.ones(len(top), bool)) if how == "tokens" else (s_counts, s_ok)
        return recall(scores, top, counts, ok, ds, k, w)

    val = [n for n in sets if n.startswith("validation")]
    choice = {}
    for how, ratios in (("tokens", RATIOS), ("sift", (RATIOS[0],))):
        grid = {(k, w, r): float(np.mean([r1(n, how, k, w, r)[0] for n in val]))
                for k in KS for w in WEIGHTS for r in ratios}
        choice[how] = max(grid, key=lambda kwr: (grid[kwr], -kwr[0], -kwr[1], kwr[2]))  # ties: fewer, lower
        choice[f"{how}_grid"] = {f"K={k} w={w} ratio={r}": v for (k, w, r), v in grid.items()}
    res = {"model": model.name, "chosen": {h: dict(zip(("k", "weight", "ratio"), choice[h], strict=True))
                                           for h in ("tokens", "sift")}, "sets": {}}
    for name, (ds, _, _, tok, (_, s_ok, s_ms), forward_ms) in tables.items():
        tk, tw, tr = choice["tokens"]
        sk, sw, _ = choice["sift"]
        res["sets"][name] = {"queries": len(ds.q_paths), "R@1/R@5 off": r1(name, "tokens", 0, 0.0),
                             "R@1/R@5 tokens": r1(name, "tokens", tk, tw, tr), "tokens ms/query (K=25)": tok[tr][1],
                             **{f"R@1/R@5 tokens, library w, K={k}": r1(name, "tokens", k, TOKEN_WEIGHT, 1.0)
                                for k in KS},
                             "token forward ms/img": forward_ms,
                             "R@1/R@5 sift": r1(name, "sift", sk, sw), "sift verifiable": float(s_ok.mean()),
                             "sift ms/query (K=25)": s_ms}
    res["validation_grids"] = {h: choice[f"{h}_grid"] for h in ("tokens", "sift")}
    write_json(ROOT / "benchmarks" / "results" / f"{args.name}.json", res)
    ct, cs = res["chosen"]["tokens"], res["chosen"]["sift"]
    command = " ".join(["python benchmarks/verification_tokens.py", *sys.argv[1:]])
    lines = [f"# Verification with the model's own local features vs SIFT (`{command}`, {res['model']})", "",
             f"Chosen on the mean R@1 of the two validation sets: tokens K = {ct['k']}, w = {ct['weight']}, ratio "
             f"{ct['ratio']}; SIFT K = {cs['k']}, w = {cs['weight']}. Places held out from the model's training. "
             f"'library w': what `--verify K --verify-with tokens` does (w = {TOKEN_WEIGHT}, mutual check alone; the "
             f"`--verify` help recommends K = {TOKEN_K}).", "",
             "| set | queries | R@1 / R@5 unverified | own features | own features, library w, K = "
             f"{' / '.join(map(str, KS))} | SIFT (verifiable) | ms/query tokens / SIFT (K=25) | token forward ms/img |",
             "|---|---:|---|---|---|---|---:|---:|"]
    for name, r in res["sets"].items():
        f = lambda v: f"{v[0]:.3f} / {v[1]:.3f}"  # noqa: E731
        lines.append(f"| {name} | {r['queries']} | {f(r['R@1/R@5 off'])} | {f(r['R@1/R@5 tokens'])} | "
                     f"{' ; '.join(f(r[f'R@1/R@5 tokens, library w, K={k}']) for k in KS)} | "
                     f"{f(r['R@1/R@5 sift'])} ({r['sift verifiable']:.2f}) | "
                     f"{r['tokens ms/query (K=25)']:.0f} / {r['sift ms/query (K=25)']:.0f} | "
                     f"{r['token forward ms/img']:.0f} |")
    write_text(ROOT / "benchmarks" / "results" / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
