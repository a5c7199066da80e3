"""Fine-tuning the offline-pretrained default model on ../shared/data: held-out Recall@1 before and after.

    python benchmarks/finetune.py [CONFIG ...] [--runs runs/finetune] [--report-only]

Trains each CPU recipe (default: every configs/cpu-finetune/*.yaml but base.yaml) with the training stack,
keeps the checkpoint with the best validation R@1 (Gardens Point places 60-69, Nordland 1500-1999; step 0,
the untouched model, included), and evaluates it and the starting model on places no recipe saw:
Gardens Point 70-99 (night_right and day_left vs day_right, +-2 frames) and Nordland 2000-2499 (winter vs
summer, +-1 frame, dark frames dropped), all at 224 px. The recipe to ship is the one with the best
validation R@1, never chosen by the held-out numbers. A run already in --runs is resumed or reused.
Writes benchmarks/results/finetune.{json,md} and finetune_curves.png (results of recipes run earlier kept).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from heldout import ROOT, data_root, held_out_sets, recall1

from edgevpr.eval.report import line_plot
from edgevpr.models.model import load_model
from edgevpr.train.loop import load_config, train
from edgevpr.utils import write_json, write_text

OUT = ROOT / "benchmarks" / "results"
SIZE = (224, 224)


def run_recipe(config: Path, runs: Path, sets: list) -> dict:
    conf = load_config(config)
    out = runs / config.stem
    t0 = time.perf_counter()
    if not (out / "final").exists():
        train(conf, out, resume=(out / "checkpoints" / "latest.json").exists())
    seconds = time.perf_counter() - t0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = json.loads((out / "best" / "step.json").read_text())
    return {"config": str(config.relative_to(ROOT)), "steps": conf["steps"], "train_seconds_this_call": seconds,
            "best_step": best["step"], "best_val_R@1": best["val_R@1"],
            "before": recall1(load_model(conf["model"]), sets, SIZE),
            "after": recall1(load_model(out / "best"), sets, SIZE),
            "final": recall1(load_model(out / "final"), sets, SIZE),
            "curve": [{k: float(v) for k, v in r.items() if v != ""} for r in rows]}


def report(results: dict) -> str:
    ship = max(results, key=lambda k: results[k]["best_val_R@1"])
    names = list(next(iter(results.values()))["before"])
    md = ["# Fine-tuning effnet-lite0-gem on ../shared/data (`python benchmarks/finetune.py`)", "",
          "Held-out R@1 at 224 px on places no recipe trained or validated on. 'after' is the checkpoint with the",
          "best validation R@1 (Gardens Point 60-69 + Nordland 1500-1999; step 0 counts), 'final' the last step.",
          "", "| recipe | steps | train s | best step | val R@1 | "
          + " | ".join(f"{n} before / after / final" for n in names) + " |",
          "|---|---:|---:|---:|---:|" + "---:|" * len(names)]
    for k, r in results.items():
        cells = [f"{r['before'][n]:.3f} / **{r['after'][n]:.3f}** / {r['final'][n]:.3f}" for n in names]
        md.append(f"| {k}{' (shipped)' if k == ship else ''} | {r['steps']} | {r['train_seconds_this_call']:.0f} | "
                  f"{r['best_step']} | "
                  f"{r['best_val_R@1']:.3f} | " + " | ".join(cells) + " |")
    missing = sorted(p.stem for p in (ROOT / "configs" / "cpu-finetune").glob("*.yaml")
                     if p.stem != "base" and p.stem not in results)
    md += ["", f"Shipped as configs/cpu-gp-nordland.yaml: **{ship}** (highest validation R@1)."]
    if missing:
        md += ["", f"Recipes in configs/cpu-finetune/ without results yet (not run to the end): {', '.join(missing)}."]
    md += ["", "Learning curves: finetune_curves.png (validation R@1), finetune_loss.png (training loss).",
           "Validation R@1 (mean of the 3 sets) by step:", ""]
    for k, r in results.items():
        pts = [f"{int(c['step'])}: {c['val_R@1']:.3f}" for c in r["curve"] if "val_R@1" in c]
        md.append(f"- {k}: " + ", ".join(pts))
    md.append("")
    return "\n".join(md)


def plot(results: dict) -> None:
    val = [(np.array([c["step"] for c in r["curve"] if "val_R@1" in c]),
            np.array([c["val_R@1"] for c in r["curve"] if "val_R@1" in c]), k) for k, r in results.items()]
    line_plot(OUT / "finetune_curves.png", val, xlabel="step", ylabel="validation R@1 (mean of 3 sets)")
    loss = [(np.array([c["step"] for c in r["curve"] if "loss" in c]),
             np.array([c["loss"] for c in r["curve"] if "loss" in c]), k) for k, r in results.items()]
    line_plot(OUT / "finetune_loss.png", loss, xlabel="step", ylabel="training loss (MS)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", type=Path)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "finetune")
    ap.add_argument("--report-only", action="store_true", help="re-render the report from finetune.json")
    args = ap.parse_args()
    data = data_root()
    path = OUT / "finetune.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.report_only:
        configs = args.configs or sorted(p for p in (ROOT / "configs" / "cpu-finetune").glob("*.yaml")
                                         if p.stem != "base")
        sets = held_out_sets(data)
        for c in configs:
            results[c.stem] = run_recipe(c.resolve(), args.runs, sets)
            write_json(path, results)
            print(c.stem, json.dumps({k: results[c.stem][k] for k in ("best_step", "before", "after")}))
    plot(results)
    write_text(OUT / "finetune.md", report(results))
    print(report(results))


if __name__ == "__main__":
    main()
