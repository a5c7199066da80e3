"""TAT-VPR on ../shared/data: the ternary student vs its fp32 twin, same recipe and budget, held-out R@1.

    python benchmarks/tat_vpr.py [--runs runs/tat-vpr]

The runs of configs/tat-vpr/cpu-stage1-fp32, cpu-stage1, cpu-stage2-fp32, cpu-stage2 and the stage-1 control
cpu-stage2-fp32-nodistill (`make methods` trains them into --runs) evaluated at 160 px on places no run trained or
validated on: Gardens Point 70-99 (night_right vs day_right, +-2 frames) and Nordland 2000-2499 (winter vs summer,
+-1 frame, dark frames dropped). Stage-2 models are their best validation checkpoints; the ternary one at
sparsity 0, 0.4 and 0.6, also through the int8 path. Writes benchmarks/results/tat_vpr.{json,md} and tat_vpr_curves.png.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from heldout import ROOT, data_root, held_out_sets, recall1

from edgevpr.eval.report import line_plot
from edgevpr.models.model import load_model
from edgevpr.models.ternary import to_int8
from edgevpr.utils import write_json, write_text

OUT = ROOT / "benchmarks" / "results"
RUNS = ("cpu-stage1-fp32", "cpu-stage1", "cpu-stage2-fp32", "cpu-stage2", "cpu-stage2-fp32-nodistill")
SIZE = (160, 160)


def curve(run: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(key)]
    return np.array([int(r["step"]) for r in rows]), np.array([float(r[key]) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "tat-vpr")
    args = ap.parse_args()
    data = data_root()
    missing = [n for n in RUNS if not (args.runs / n / "final").exists()]
    if missing:
        raise SystemExit(f"{args.runs}: no finished run {', '.join(missing)} (train them: make methods)")
    sets = held_out_sets(data, day_left=False)
    res: dict = {"image_size": list(SIZE)}
    teacher = load_model(ROOT / "runs" / "gp-nordland" / "best")  # the stage-1 teacher, at its own size
    res["teacher"] = {"best": recall1(teacher, sets, teacher.image_size), "image_size": list(teacher.image_size)}
    for name in ("cpu-stage1-fp32", "cpu-stage1"):
        res[name] = {"final_gem": recall1(load_model(args.runs / name / "final"), sets, SIZE)}
    fp32, tern = load_model(args.runs / "cpu-stage2-fp32" / "best"), load_model(args.runs / "cpu-stage2" / "best")
    res["cpu-stage2-fp32"] = {"best": recall1(fp32, sets, SIZE)}
    nodistill = load_model(args.runs / "cpu-stage2-fp32-nodistill" / "best")
    res["cpu-stage2-fp32-nodistill"] = {"best": recall1(nodistill, sets, SIZE)}
    res["cpu-stage2"] = {f"best_s{s}": recall1(tern, sets, SIZE, sparsity=s) for s in (0.0, 0.4, 0.6)}
    res["cpu-stage2"]["best_int8_s0.0"] = recall1(to_int8(load_model(args.runs / "cpu-stage2" / "best")), sets, SIZE)
    for name in RUNS:
        res[name]["best_step"] = json.loads((args.runs / name / "best" / "step.json").read_text())["step"] \
            if (args.runs / name / "best" / "step.json").exists() else None
    write_json(OUT / "tat_vpr.json", res)
    line_plot(OUT / "tat_vpr_curves.png",
              [(*curve(args.runs / n, "loss/token_distill"), f"{n} token MSE") for n in RUNS[:2]]
              + [(*curve(args.runs / n, "loss/ms"), f"{n} MS loss") for n in RUNS[2:]],
              xlabel="step", ylabel="training loss")
    names = [ds.name for ds in sets]
    md = ["# TAT-VPR on ../shared/data (`python benchmarks/tat_vpr.py`)", "",
          f"Held-out R@1 at {SIZE[0]} px (places no run trained or validated on). Curves: tat_vpr_curves.png.", "",
          "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def line(label: str, r: dict) -> str:
        return f"| {label} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |"

    md.append(line(f"teacher (fine-tuned EfficientNet-lite0, {teacher.image_size[0]} px)", res["teacher"]["best"]))
    md.append(line("stage 1 fp32 twin (GeM on distilled tokens)", res["cpu-stage1-fp32"]["final_gem"]))
    md.append(line("stage 1 ternary (GeM on distilled tokens, s=0)", res["cpu-stage1"]["final_gem"]))
    md.append(line("stage 2 fp32 twin + BoQ", res["cpu-stage2-fp32"]["best"]))
    md.append(line("stage 2 fp32 + BoQ without stage 1 (random blocks)", res["cpu-stage2-fp32-nodistill"]["best"]))
    for s in (0.0, 0.4, 0.6):
        md.append(line(f"stage 2 ternary + BoQ, sparsity {s}", res["cpu-stage2"][f"best_s{s}"]))
    md.append(line("stage 2 ternary + BoQ, int8 path, sparsity 0", res["cpu-stage2"]["best_int8_s0.0"]))
    write_text(OUT / "tat_vpr.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
