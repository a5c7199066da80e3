"""Held-out R@1 of finished training runs, side by side (the real-data comparison of a method issue).

    python benchmarks/heldout_runs.py --name efficientvpr runs/efficientvpr/cpu runs/weitop/cpu-salad
        [--size 112] [--which best|final]

For each run folder: its best (or final) model on the held-out places of benchmarks/heldout.py at --size (default:
the run's training size), with the run's steps, best step, first/last training loss and trainable-parameter
count. Writes benchmarks/results/<name>_heldout.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from heldout import ROOT, data_root, held_out_sets, recall1

from edgevpr.models.model import load_model
from edgevpr.utils import write_json, write_text

OUT = ROOT / "benchmarks" / "results"


def summarize(run: Path, which: str, size: tuple[int, int] | None, sets: list) -> dict:
    conf = json.loads((run / "config.json").read_text())
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    size = size or tuple(conf["data"]["image_size"] or load_model(run / which).image_size)
    best = json.loads((run / "best" / "step.json").read_text()) if (run / "best" / "step.json").exists() else {}
    return {"run": str(run), "model": which, "steps": conf["steps"], "best_step": best.get("step"),
            "best_val_R@1": best.get("val_R@1"), "first_loss": float(rows[0]["loss"]),
            "last_loss": float(rows[-1]["loss"]), "image_size": list(size),
            "recall@1": recall1(load_model(run / which), sets, size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    ap.add_argument("--which", default="best", choices=["best", "final"])
    args = ap.parse_args()
    sets = held_out_sets(data_root(), day_left=False)
    res = {r.name: summarize(r, args.which, tuple(args.size) if args.size else None, sets) for r in args.runs}
    write_json(OUT / f"{args.name}_heldout.json", res)
    names = [ds.name for ds in sets]
    md = [f"# {args.name}: held-out R@1 of training runs (`python benchmarks/heldout_runs.py`)", "",
          "| run | size | steps | best step | val R@1 | loss first -> last | " + " | ".join(names) + " |",
          "|---|---|---:|---:|---:|---:|" + "---:|" * len(names)]
    for k, r in res.items():
        val = "" if r["best_val_R@1"] is None else f"{r['best_val_R@1']:.3f}"
        md.append(f"| {k} | {r['image_size'][0]}x{r['image_size'][1]} | {r['steps']} | {r['best_step']} | {val} | "
                  f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
                  + " | ".join(f"{r['recall@1'][n]:.3f}" for n in names) + " |")
    write_text(OUT / f"{args.name}_heldout.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
