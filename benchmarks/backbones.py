"""Every registered backbone x aggregator pair at 224 px, measured side by side in one run.

For each backbone the forward pass is timed once (batch 1, warm-up, median of repeats) and each head is
timed on that backbone's real tokens; a pair's latency is the sum of the two measured parts, its GFLOPs
the sum of the two counted parts. Weights are random (timing and FLOPs do not depend on them).

    python benchmarks/backbones.py [--size 224] [--repeats 5] [--only dinov2_vits14,efficientnet_lite0]
Writes benchmarks/results/backbones.json and backbones.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from edgevpr.models.aggregators import AGGREGATORS, HeadContext
from edgevpr.models.backbones import BACKBONES
from edgevpr.utils import write_json, write_text

OUT = Path(__file__).parent / "results"


def timed(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", help="comma-separated backbone names")
    args = ap.parse_args()
    torch.manual_seed(0)
    names = args.only.split(",") if args.only else BACKBONES.names()
    x = torch.randn(1, 3, args.size, args.size)
    rows = []
    for bname in names:
        bb = BACKBONES.get(bname)().eval()
        size = args.size - args.size % bb.stride if hasattr(bb, "vit") else args.size
        xb = x[..., :size, :size]
        tokens = bb(xb)
        b_ms, b_gf = timed(lambda bb=bb, xb=xb: bb(xb), args.repeats), flops(lambda bb=bb, xb=xb: bb(xb))
        b_params = sum(p.numel() for p in bb.parameters())
        print(f"{bname:20s} {b_ms:8.1f} ms  {b_gf:6.2f} GFLOPs  grid {tokens.grid}", flush=True)
        ctx = HeadContext(bb.out_dim, bb.has_cls, tokens.grid)
        for aname in AGGREGATORS.names():
            try:
                head = AGGREGATORS.get(aname)(ctx).eval()
            except ValueError as e:
                rows.append({"backbone": bname, "aggregator": aname, "skipped": str(e)})
                continue
            h_ms = timed(lambda head=head, t=tokens: head(t), args.repeats)
            h_gf = flops(lambda head=head, t=tokens: head(t))
            rows.append({"backbone": bname, "aggregator": aname, "image_px": size, "grid": list(tokens.grid),
                         "ms_per_img": b_ms + h_ms, "backbone_ms": b_ms, "head_ms": h_ms,
                         "gflops": b_gf + h_gf,
                         "params_m": (b_params + sum(p.numel() for p in head.parameters())) / 1e6,
                         "descriptor_dim": head.out_dim})
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "batch_size": 1, "repeats": args.repeats, "size": args.size}
    write_json(OUT / "backbones.json", {"meta": meta, "rows": rows})
    lines = [f"# Backbone x aggregator at {args.size} px (batch 1, {meta['threads']} threads, torch {meta['torch']})",
             "", "Latency = measured backbone forward + measured head forward on its tokens (median of "
             f"{args.repeats}). Random weights. Produced by `python benchmarks/backbones.py`.", "",
             "| backbone | head | px | grid | ms/img | (backbone + head) | GFLOPs | params (M) | dim |",
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['backbone']} | {r['aggregator']} | | | n/a | {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['backbone']} | {r['aggregator']} | {r['image_px']} | {r['grid'][0]}x{r['grid'][1]} | "
                         f"{r['ms_per_img']:.1f} | {r['backbone_ms']:.1f} + {r['head_ms']:.1f} | {r['gflops']:.2f} | "
                         f"{r['params_m']:.1f} | {r['descriptor_dim']} |")
    write_text(OUT / "backbones.md", "\n".join(lines) + "\n")
    print(f"wrote {OUT / 'backbones.md'}")


if __name__ == "__main__":
    main()
