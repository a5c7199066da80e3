"""SceneVPT's gate after training: the range of alpha = sigmoid(s' - gamma) over prompts, blocks and images.

    python benchmarks/scenevpt_alpha.py [--run runs/efficientvpr/cpu-nodistill]

For the model at step 0 (the run's starting point) and after training (``final/``), on 30 held-out Gardens Point
night photos (frames 70-99) at the model's size: alpha's min/max, its spread across the prompts of one block and
image (mean of per-block std), and across images for one prompt (mean of per-prompt std). Writes
benchmarks/results/scenevpt_alpha.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from heldout import ROOT, data_root

from edgevpr.data.images import load_image
from edgevpr.models.model import load_model
from edgevpr.train.loop import load_config
from edgevpr.utils import write_json, write_text


def alphas(model, images) -> torch.Tensor:
    """[B, blocks - 1, N_p] gate values of a SceneVPT model on images."""
    x = torch.stack([model.transform()(im) for im in images])
    bb = model.backbone
    with torch.no_grad():
        t, _ = bb.embed(x)
        return bb.prompts.run(bb.vit.blocks, t, bb.num_prefix)[1]


def stats(a: torch.Tensor) -> dict:
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()),
            "std_across_prompts": float(a.std(-1).mean()), "std_across_images": float(a.std(0).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "efficientvpr" / "cpu-nodistill"), help="training run")
    args = ap.parse_args()
    run = Path(args.run)
    conf = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else \
        load_config(ROOT / "configs" / "efficientvpr" / "cpu-nodistill.yaml")
    images = [load_image(data_root() / "gardens_point" / "night_right" / f"Image{i:03d}.jpg") for i in range(70, 100)]
    torch.manual_seed(conf.get("seed", 0))
    rows = {"step 0": stats(alphas(load_model(conf["model"]), images)),
            "trained": stats(alphas(load_model(run / "final"), images))}
    write_json(ROOT / "benchmarks" / "results" / "scenevpt_alpha.json", {"run": str(run), **rows})
    lines = [f"# SceneVPT gate alpha on 30 Gardens Point night photos ({run.name})", "",
             "| model | min | max | mean | std across prompts | std across images |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['min']:.4f} | {v['max']:.4f} | {v['mean']:.4f} | {v['std_across_prompts']:.5f} | "
              f"{v['std_across_images']:.5f} |" for k, v in rows.items()]
    write_text(ROOT / "benchmarks" / "results" / "scenevpt_alpha.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
