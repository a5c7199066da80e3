"""Token pruning on this CPU: DINOv2-S/14 + WeiAD at 322 px, latency vs keep ratio, side by side in one run.

    python benchmarks/pruning.py [--size 322] [--repeats 5] [--block 3]

Backbone + head ms/img (batch 1, median of --repeats after warm-up) and GFLOPs for keep ratios 1.0, 0.75, 0.5,
0.3 with each pruning method at the same block (random weights: timing does not depend on them). The
unpruned model (keep ratio 1.0) is the reference of the ratios. Writes benchmarks/results/pruning.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from edgevpr.eval.efficiency import gflops, latency
from edgevpr.models.model import load_model
from edgevpr.utils import write_json, write_text

OUT = Path(__file__).parent / "results"
RATIOS = (1.0, 0.75, 0.5, 0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=322)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=3)
    args = ap.parse_args()
    size = (args.size, args.size)
    rows: dict = {}
    for method in ("weitop", "random", "evit", "tome"):
        torch.manual_seed(0)
        model = load_model({"backbone": {"name": "dinov2_vits14", "weights": None,
                                         "pruning": {"block": args.block, "method": method}},
                            "aggregator": {"name": "weiad"}, "image_size": list(size)})
        for rho in RATIOS:
            if rho == 1.0 and method != "weitop":
                continue  # keep ratio 1.0 is the same unpruned model for every method
            key = "unpruned" if rho == 1.0 else f"{method} {rho}"
            rows[key] = {"keep_ratio": rho, "method": method if rho < 1 else "none",
                         "ms_per_img_b1": latency(model, size, 1, warmup=2, repeats=args.repeats,
                                                  keep_ratio=rho)["ms_per_img"],
                         "gflops": gflops(model, size, keep_ratio=rho)}
            print(key, rows[key])
    ref = rows["unpruned"]["ms_per_img_b1"]
    for r in rows.values():
        r["time_ratio"] = r["ms_per_img_b1"] / ref
    write_json(OUT / "pruning.json", {"image_size": list(size), "block": args.block,
                                      "threads": torch.get_num_threads(), "rows": rows})
    md = [f"# Token pruning after block {args.block} of DINOv2-S/14 + WeiAD at {args.size} px "
          "(`python benchmarks/pruning.py`)", "",
          f"{torch.get_num_threads()} CPU threads, batch 1, measured side by side in one run; "
          "ratio = ms / unpruned ms.",
          "", "| method | keep ratio | ms/img | x unpruned | GFLOPs |", "|---|---:|---:|---:|---:|"]
    md += [f"| {r['method']} | {r['keep_ratio']:.2f} | {r['ms_per_img_b1']:.1f} | {r['time_ratio']:.2f} | "
           f"{r['gflops']:.2f} |" for r in rows.values()]
    write_text(OUT / "pruning.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
