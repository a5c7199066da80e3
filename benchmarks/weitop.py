"""WeiToP vs general-vision pruning on one trained model: held-out R@1 at each keep ratio.

    python benchmarks/weitop.py runs/weitop/cpu-weiad [--which best] [--size H W]

The run's model (trained with the WeiToP scorer after block 3) is evaluated on the held-out places of
benchmarks/heldout.py at keep ratios 1.0, 0.75, 0.5, 0.3 with each pruning method at the same block: its learned
scorer (weitop), random, EViT (CLS attention) and ToMe (merging); keep ratio 1.0 is the unpruned model.
Writes benchmarks/results/weitop.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from heldout import ROOT, data_root, held_out_sets, recall1

from edgevpr.models.model import load_model
from edgevpr.utils import write_json, write_text

OUT = ROOT / "benchmarks" / "results"
RATIOS = (1.0, 0.75, 0.5, 0.3)
METHODS = ("weitop", "random", "evit", "tome")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--which", default="best", choices=["best", "final"])
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="default: the model's image size")
    args = ap.parse_args()
    sets = held_out_sets(data_root(), day_left=False)
    model = load_model(args.run / args.which)
    if getattr(model.backbone, "pruner", None) is None:
        raise SystemExit(f"{args.run / args.which}: the model has no token pruner (backbone.pruning)")
    size = tuple(args.size) if args.size else model.image_size
    rows: dict = {"unpruned": recall1(model, sets, size, keep_ratio=1.0)}
    for method in METHODS:
        model.backbone.pruner.method = method  # same block, same trained weights; only the selection differs
        for rho in RATIOS[1:]:
            rows[f"{method} {rho}"] = recall1(model, sets, size, keep_ratio=rho)
            print(method, rho, rows[f"{method} {rho}"])
    write_json(OUT / "weitop.json", {"run": str(args.run), "model": args.which, "image_size": list(size), "rows": rows})
    names = [ds.name for ds in sets]
    md = [f"# Pruning methods on one trained model ({args.run}/{args.which}, {size[0]} px; "
          "`python benchmarks/weitop.py`)", "", "| method, keep ratio | " + " | ".join(names) + " |",
          "|---|" + "---:|" * len(names)]
    md += [f"| {k} | " + " | ".join(f"{v[n]:.3f}" for n in names) + " |" for k, v in rows.items()]
    write_text(OUT / "weitop.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
