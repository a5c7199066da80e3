"""Every published VPR architecture at its evaluation size on this CPU, side by side in one run.

    python benchmarks/published.py [--repeats 3]

The architectures are built by the importers from the full-size key/shape lists of the real releases
(../shared/fixtures/published/published_shapes.json) with random weights: the real weights cannot be fetched here,
and speed, size and FLOPs do not depend on the weight values. Reported per model: parameters, GFLOPs
(torch.utils.flop_counter), fp32 ms/img at batch 1 (median of --repeats after a warm-up), descriptor bytes (float32).
For TeTRA-BoQ also its int8 CPU path (edgevpr's int8 GEMM ternary layers), its int8 ONNX export (onnxruntime), and
the bytes of its binary descriptor. Writes benchmarks/results/published.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from edgevpr.deploy.export import OnnxModel, export_onnx
from edgevpr.eval.efficiency import count_params, gflops, latency
from edgevpr.models.model import build_model
from edgevpr.models.ternary import to_int8
from edgevpr.published import convert
from edgevpr.utils import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT.parent / "shared" / "fixtures" / "published" / "published_shapes.json"
LAYOUTS = {"megaloc": "megaloc", "salad": "salad", "boq_dinov2": "boq", "boq_resnet50": "boq", "mixvpr_4096": "mixvpr",
           "cosplace_resnet50_2048": "cosplace", "tetra_boq": "tetra", "tetra_salad": "tetra"}


def published_model(layout: str):
    """The edgevpr model of a full-size published layout, random weights, eval mode."""
    shapes = json.loads(SHAPES.read_text())[layout]
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    torch.manual_seed(0)
    return build_model(convert(LAYOUTS[layout], sd, layout).config).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per model (default 3)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "published"), help="output stem")
    args = ap.parse_args()
    rows = []
    for layout in LAYOUTS:
        model = published_model(layout)
        size = model.image_size
        with torch.inference_mode():
            ms = latency(model, size, 1, warmup=1, repeats=args.repeats)["ms_per_img"]
        row = {"model": layout, "image_size": list(size), "params_M": count_params(model)["params"] / 1e6,
               "gflops": gflops(model, size), "fp32_ms": ms, "desc_dim": model.out_dim,
               "desc_bytes": 4 * model.out_dim}
        if layout == "tetra_boq":
            with tempfile.TemporaryDirectory() as d:
                onnx = OnnxModel(export_onnx(model, Path(d) / "t.onnx", int8=True))
                row["onnx_int8_ms"] = latency(onnx, size, 1, warmup=1, repeats=args.repeats)["ms_per_img"]
            with torch.inference_mode():
                row["int8_cpu_ms"] = latency(to_int8(model), size, 1, warmup=1, repeats=args.repeats)["ms_per_img"]
            row["binary_bytes"] = model.out_dim // 8
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    write_json(Path(args.out + ".json"), {"threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows})
    lines = [f"# Published VPR architectures on this CPU ({torch.get_num_threads()} threads, batch 1, random weights "
             "in the released shapes)", "",
             "| model | input | params (M) | GFLOPs | fp32 ms/img | descriptor | bytes (float32) | notes |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        notes = ""
        if "int8_cpu_ms" in r:
            notes = (f"int8 CPU path {r['int8_cpu_ms']:.0f} ms ({r['fp32_ms'] / r['int8_cpu_ms']:.2f}x), int8 ONNX "
                     f"{r['onnx_int8_ms']:.0f} ms ({r['fp32_ms'] / r['onnx_int8_ms']:.2f}x); binary descriptor "
                     f"{r['binary_bytes']} bytes")
        lines.append(f"| {r['model']} | {r['image_size'][0]}x{r['image_size'][1]} | {r['params_M']:.1f} | "
                     f"{r['gflops']:.1f} | {r['fp32_ms']:.0f} | {r['desc_dim']} | {r['desc_bytes']} | {notes} |")
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
