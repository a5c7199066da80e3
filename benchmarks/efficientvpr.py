"""EfficientVPR vs SALAD and BoQ heads on the same DINOv2-S/14 at 322 px, side by side in one run.

    python benchmarks/efficientvpr.py [--size 322] [--repeats 5]

For each model: latency (ms/img, batch 1, median of --repeats after warm-up), GFLOPs (torch's counter),
trainable parameters under its usual recipe (EfficientVPR: prompts + head, backbone frozen; SALAD: last 4
blocks + head; BoQ: last 2 blocks + head) and descriptor bytes (fp32). Random weights (timing, FLOPs and
sizes do not depend on them). Writes benchmarks/results/efficientvpr.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from edgevpr.eval.efficiency import gflops, latency
from edgevpr.models.model import load_model
from edgevpr.train.loop import set_trainable
from edgevpr.utils import write_json, write_text

OUT = Path(__file__).parent / "results"
DINO_S = {"name": "dinov2_vits14", "weights": None}
MODELS = {
    "EfficientVPR (SceneVPT + MsIA + OLE + SGFS)": (
        {"backbone": {**DINO_S, "prompts": {"mode": "scene", "num": 32}}, "aggregator": {"name": "efficientvpr"}},
        {"mode": "match", "patterns": [r"^backbone\.prompts\.", r"^aggregator\."]}),
    "SALAD (64 x 128 + 256)": (
        {"backbone": DINO_S, "aggregator": {"name": "salad", "num_clusters": 64, "cluster_dim": 128, "token_dim": 256}},
        {"mode": "tail", "stages": 4}),
    "BoQ (proj 384, 64 queries, 2 layers, row 32)": (
        {"backbone": {**DINO_S, "final_norm": False},
         "aggregator": {"name": "boq", "proj_dim": 384, "num_queries": 64, "num_layers": 2, "row_dim": 32}},
        {"mode": "tail", "stages": 2}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=322)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    size = (args.size, args.size)
    rows = {}
    for label, (cfg, trainable) in MODELS.items():
        model = load_model({**cfg, "image_size": list(size)})
        set_trainable(model, trainable["mode"], trainable.get("stages", 2), trainable.get("patterns"))
        rows[label] = {
            "ms_per_img_b1": latency(model, size, 1, warmup=2, repeats=args.repeats)["ms_per_img"],
            "gflops": gflops(model, size),
            "trainable_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "descriptor_dim": model.out_dim, "descriptor_bytes_fp32": 4 * model.out_dim,
        }
        print(label, rows[label])
    write_json(OUT / "efficientvpr.json", {"image_size": list(size), "threads": torch.get_num_threads(), "rows": rows})
    md = [f"# EfficientVPR vs SALAD and BoQ on DINOv2-S/14 at {args.size} px (`python benchmarks/efficientvpr.py`)",
          "", f"{torch.get_num_threads()} CPU threads, batch 1, random weights, measured in one run.", "",
          "| model | ms/img | GFLOPs | trainable params (M) | descriptor dim | bytes/descriptor (fp32) |",
          "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {k} | {r['ms_per_img_b1']:.1f} | {r['gflops']:.2f} | {r['trainable_params_m']:.2f} | "
           f"{r['descriptor_dim']} | {r['descriptor_bytes_fp32']} |" for k, r in rows.items()]
    write_text(OUT / "efficientvpr.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
