"""TinyVPR ablation on held-out places: MS only, + contrastive distillation, + alignment, full method.

    python benchmarks/tinyvpr.py [--runs runs/tinyvpr]

Needs the four runs of configs/tinyvpr/{ms,posneg,align,full}.yaml in RUNS/<name> (same student, data, budget)
and the teacher they name. Reports each run's held-out R@1 (Gardens Point 70-99 night_right vs day_right,
Nordland 2000-2499 winter vs summer; benchmarks/heldout.py) after its 600 steps and at its best validation step
(step 0, the untrained student, counts), the teacher's and the untrained student's, and
the teacher/student parameter and latency ratios (batch 1 and 16, measured alternately in one run).
Writes benchmarks/results/tinyvpr.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from heldout import ROOT, data_root, held_out_sets, recall1
from heldout_runs import summarize

from edgevpr.eval.efficiency import count_params, latency
from edgevpr.models.model import load_model
from edgevpr.train.loop import load_config
from edgevpr.utils import write_json, write_text

OUT = ROOT / "benchmarks" / "results"
ABLATION = (("ms", "Multi-Similarity only"), ("posneg", "+ positive-negative contrastive distillation"),
            ("align", "+ cross-attention feature alignment"), ("full", "full: confusion-aware MS + both"))


def latency_ratio(teacher, student, t_size, s_size, batch: int, rounds: int = 5) -> dict:
    """Median ms/img of each, timed alternately (same machine state for both)."""
    t_ms, s_ms = [], []
    for _ in range(rounds):
        t_ms.append(latency(teacher, t_size, batch, warmup=1, repeats=3)["ms_per_img"])
        s_ms.append(latency(student, s_size, batch, warmup=1, repeats=3)["ms_per_img"])
    t, s = statistics.median(t_ms), statistics.median(s_ms)
    return {"batch": batch, "teacher_ms": t, "student_ms": s, "ratio": t / s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "tinyvpr")
    args = ap.parse_args()
    data = data_root()
    sets = held_out_sets(data, day_left=False)
    names = [ds.name for ds in sets]
    conf = load_config(ROOT / "configs" / "tinyvpr" / "full.yaml")
    teacher = load_model(ROOT / conf["teacher"]["model"]).eval()
    t_size = tuple(conf["teacher"]["image_size"])
    torch.manual_seed(conf["seed"])
    student0 = load_model(conf["model"]).eval()
    s_size = tuple(conf["data"]["image_size"])
    rows = {"teacher": {"recall@1": recall1(teacher, sets, t_size)},
            "student, untrained": {"recall@1": recall1(student0, sets, s_size)}}
    for key, _ in ABLATION:
        run = args.runs / key
        if not (run / "final").exists():
            raise FileNotFoundError(f"{run / 'final'}: run `edgevpr train --config configs/tinyvpr/{key}.yaml "
                                    f"--out {run}` first")
        rows[key] = summarize(run, "final", s_size, sets)
        rows[key]["best"] = summarize(run, "best", s_size, sets)["recall@1"]
    pt, ps = count_params(teacher)["params"], count_params(student0)["params"]
    speed = [latency_ratio(teacher, student0, t_size, s_size, b) for b in (1, 16)]
    res = {"teacher": {"model": conf["teacher"]["model"], "params": pt, "image_size": list(t_size)},
           "student": {"model": conf["model"]["name"], "params": ps, "image_size": list(s_size)},
           "param_ratio": pt / ps, "latency": speed, "threads": torch.get_num_threads(), "rows": rows}
    write_json(OUT / "tinyvpr.json", res)
    md = ["# TinyVPR on held-out places (`python benchmarks/tinyvpr.py`)", "",
          f"Teacher: {conf['teacher']['model']} ({pt / 1e6:.2f}M parameters, {t_size[0]} px). Student: "
          f"{conf['model']['name']} ({ps / 1e6:.2f}M parameters, {s_size[0]} px): **{pt / ps:.1f}x fewer "
          "parameters**; latency (median ms/img, alternated, "
          f"{torch.get_num_threads()} threads): "
          + "; ".join(f"batch {s['batch']}: teacher {s['teacher_ms']:.1f}, student {s['student_ms']:.1f} "
                      f"(**{s['ratio']:.1f}x**)" for s in speed) + ".", "",
          "Same student, data (Gardens Point 0-59 + Nordland 0-1499), budget (600 steps, 16 places x 2 images) "
          "and validation places for every row; the model kept is the best on validation (step 0 counts).", "",
          "Held-out R@1 after the 600 steps (final), and of the model kept at the best validation step (best).", "",
          "| model | " + " | ".join(f"{n} final" for n in names) + " | best step (val R@1) | "
          + " | ".join(f"{n} best" for n in names) + " |", "|---|" + "---:|" * (2 * len(names) + 1)]
    labels = dict(ABLATION)
    for key, r in rows.items():
        final = " | ".join(f"{r['recall@1'][n]:.3f}" for n in names)
        if "best" not in r:
            md.append(f"| {labels.get(key, key)} | {final} | | " + " | ".join("" for _ in names) + " |")
            continue
        best = " | ".join(f"{r['best'][n]:.3f}" for n in names)
        md.append(f"| {labels[key]} | {final} | {r['best_step']} ({r['best_val_R@1']:.3f}) | {best} |")
    write_text(OUT / "tinyvpr.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
