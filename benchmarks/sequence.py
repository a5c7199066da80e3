"""Single-frame vs sequence matching, offline (SeqSLAM search) and online (Bayes filter), on held-out places.

    python benchmarks/sequence.py [--models pixels-patchnorm effnet-lite0-gem runs/gp-nordland/best]

For each model: Nordland 2000-2499 (winter vs summer, +-1 frame, dark frames dropped) and Gardens Point 70-99
(night_right vs day_right, +-2 frames): R@1 of the single frame, of `seqslam` (edgevpr.deploy.sequence; it only
looks back, so it is also what `localize --sequence L` answers live) and of the online `SequenceFilter`, at
L = 5, 10, 20 (the filter has no length: one column), with the matching time per query (similarities given;
embedding excluded, it is the same for all). The filter's temperature is chosen per model on validation places
(Nordland 1500-1999), never on the held-out ones. Writes benchmarks/results/sequence.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from heldout import ROOT, data_root

from edgevpr.data.datasets import VPRDataset, open_dataset
from edgevpr.deploy.sequence import SequenceFilter, seqslam
from edgevpr.eval.extract import extract
from edgevpr.models.model import load_model
from edgevpr.utils import default_cache_dir, write_json, write_text

LENGTHS = (5, 10, 20)
TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0)


def similarities(model, ds: VPRDataset) -> np.ndarray:
    """[Q, N] cosine similarities of the queries (capture order) to the database (route order)."""
    def desc(paths):
        return extract(model, paths, 32, default_cache_dir(), False, 0, "cpu", None, progress=False).descriptors

    return desc(ds.q_paths) @ desc(ds.db_paths).T


def hit_rate(best: np.ndarray, ds: VPRDataset) -> float:
    return float(np.mean([b in set(p.tolist()) for b, p in zip(best, ds.positives, strict=True) if len(p)]))


def run_filter(s: np.ndarray, temperature: float) -> tuple[np.ndarray, float]:
    f = SequenceFilter(s.shape[1], temperature=temperature)
    t0 = time.perf_counter()
    best = np.array([f.update(row)[0] for row in s])
    return best, (time.perf_counter() - t0) * 1000 / len(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["pixels-patchnorm", "effnet-lite0-gem",
                                                    str(ROOT / "runs" / "gp-nordland" / "best")],
                    help="models (default: pixels-patchnorm, the default preset, the fine-tuned runs/gp-nordland)")
    args = ap.parse_args()
    data = data_root()
    gp, nl = data / "gardens_point", data / "nordland_64x32"
    val = open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1, frames=(1500, 2000), drop_dark=10)
    sets = [open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1, frames=(2000, 2500), drop_dark=10),
            open_dataset(gp / "day_right", gp / "night_right", aligned_tolerance=2, frames=(70, 100))]
    res: dict = {"lengths": list(LENGTHS), "models": {}}
    for spec in args.models:
        model = load_model(spec).eval()
        name = model.name if not spec.startswith(str(ROOT)) else spec.removeprefix(str(ROOT) + "/")
        sv = similarities(model, val)
        t_best = max(TEMPERATURES, key=lambda t: hit_rate(run_filter(sv, t)[0], val))
        out = {"filter_temperature": t_best, "sets": {}}
        for ds in sets:
            s = similarities(model, ds)
            row = {"queries": int(sum(len(p) > 0 for p in ds.positives)), "single": hit_rate(s.argmax(1), ds)}
            for length in LENGTHS:
                t0 = time.perf_counter()
                best, _ = seqslam(s, length=length)
                row[f"seqslam_{length}"] = hit_rate(best, ds)
                row[f"seqslam_{length}_ms"] = (time.perf_counter() - t0) * 1000 / len(s)
            best, ms = run_filter(s, t_best)
            row["filter"], row["filter_ms"] = hit_rate(best, ds), ms
            out["sets"][ds.name] = row
            print(name, ds.name, row, flush=True)
        res["models"][name] = out
    write_json(ROOT / "benchmarks" / "results" / "sequence.json", res)
    lines = ["# Sequence matching on held-out places (`python benchmarks/sequence.py`)", "",
             "R@1; offline = SeqSLAM search over the last L frames (local contrast window 10, velocities 0.8-1.25), "
             "online = Bayes filter (temperature chosen on Nordland 1500-1999); ms = matching time per query, "
             "similarities given. Nordland: 464 queries (steps of 0.002); Gardens Point: 30 (steps of 0.033).", "",
             "| model | set | single | " + " | ".join(f"offline L={n}" for n in LENGTHS) + " | online filter | "
             "ms/query offline L=10 / online |", "|---|---|---:|" + "---:|" * len(LENGTHS) + "---:|---:|"]
    for name, out in res["models"].items():
        for ds_name, r in out["sets"].items():
            lines.append(f"| {name} | {ds_name} ({r['queries']} q) | {r['single']:.3f} | " +
                         " | ".join(f"{r[f'seqslam_{n}']:.3f}" for n in LENGTHS) +
                         f" | {r['filter']:.3f} (T={out['filter_temperature']}) | {r['seqslam_10_ms']:.1f} / "
                         f"{r['filter_ms']:.2f} |")
    write_text(ROOT / "benchmarks" / "results" / "sequence.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
