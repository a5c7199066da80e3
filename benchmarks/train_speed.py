"""Training steps/s with and without the cached frozen prefix, side by side in one run.

    python benchmarks/train_speed.py [--steps 10] [--model effnet-lite0-gem] [--size 224]
Trains the last 2 backbone stages + head on Gardens Point places 0-29 (3 images per place, 8 places per
batch) from ../shared/data or EDGEVPR_DATA. Steps/s is over the whole run, setup and the cache's
filling included (cached steps compute the prefix of images not yet seen).
Writes benchmarks/results/train_speed.json and train_speed.md.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch
from heldout import data_root

from edgevpr.train.loop import train
from edgevpr.utils import write_json, write_text

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="effnet-lite0-gem")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    gp = data_root() / "gardens_point"
    conf = {"model": args.model, "steps": args.steps, "checkpoint_every": 10**9,
            "data": {"places": [{"aligned": [str(gp / f) for f in ("day_left", "day_right", "night_right")],
                                 "stop": 30}], "places_per_batch": 8, "images_per_place": 3,
                     "image_size": [args.size, args.size]},
            "trainable": {"mode": "tail", "stages": 2}}
    rows = {}
    for cached in (False, True):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train({**conf, "data": {**conf["data"], "cache_frozen": cached}}, d, progress=False)
            rows["cached" if cached else "uncached"] = {"seconds": time.perf_counter() - t0,
                                                        "steps_per_s": args.steps / (time.perf_counter() - t0)}
            with open(Path(d) / "metrics.csv") as f:
                rows["cached" if cached else "uncached"]["final_loss"] = float(list(csv.DictReader(f))[-1]["loss"])
    speedup = rows["cached"]["steps_per_s"] / rows["uncached"]["steps_per_s"]
    meta = {"model": args.model, "size": args.size, "steps": args.steps, "threads": torch.get_num_threads(),
            "batch": "8 places x 3 images", "trainable": "last 2 stages + head"}
    write_json(OUT / "train_speed.json", {"meta": meta, "rows": rows, "speedup": speedup})
    md = [f"# Training speed, {args.model} at {args.size} px, {meta['batch']}, {meta['trainable']}, "
          f"{args.steps} steps (`python benchmarks/train_speed.py`)", "",
          "| prefix | seconds (incl. setup) | steps/s | final loss |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {v['seconds']:.1f} | {v['steps_per_s']:.3f} | {v['final_loss']:.4f} |" for k, v in rows.items()]
    md += ["", f"Speed-up of caching: {speedup:.2f}x (the 30 places x 3 images are all embedded during the run, "
           "so longer runs gain more)."]
    write_text(OUT / "train_speed.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
