"""The edge model on this CPU, every variant side by side in one run: DINOv2-S/14 + GeM at 224 px (random weights).

    python benchmarks/edge.py [--repeats 10]

Variants: PyTorch fp32; PyTorch bf16 (autocast); onnxruntime fp32; onnxruntime int8 of the ternary model (TAT-VPR
linears, dynamic int8 activations) unpruned, and with WeiToP pruning after block 3 at keep 0.5 / 0.3, and after
block 1 at keep 0.5 (where pruning happens). Each variant runs in its own fresh process (the onnxruntime ones
without torch, as on a device), which reports ms/img at batch 1 and 8 (median of --repeats after warm-up) and its
peak RSS. Reported beside them: speed-up over PyTorch fp32 and over onnxruntime fp32, GOPs per image (FLOP counter
on the PyTorch model at the variant's keep ratio), the share of this CPU's int8 GEMM peak (577 GOP/s, DESIGN.md)
that GOPs / time reaches, and the model file bytes. Writes benchmarks/results/edge.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
INT8_PEAK_GOPS = 577.0
BASE = {"backbone": {"name": "dinov2_vits14", "weights": None, "init_values": 1.0}, "aggregator": {"name": "gem"},
        "image_size": [224, 224]}


def worker(kind: str, path: str, repeats: int) -> dict:
    """Time one variant in this (fresh) process: ms/img at batch 1 and 8, peak RSS."""
    if kind.startswith("onnx"):
        from edgevpr.deploy.onnx_model import OnnxModel

        model = OnnxModel(path)
        run = model.run
    else:
        import torch

        from edgevpr.models.model import load_model

        model = load_model(path).eval()
        bf16 = kind == "torch-bf16"

        def run(x):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return model(torch.from_numpy(x)).float().numpy()

    out = {}
    for b in (1, 8):
        x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
        for _ in range(2):
            run(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(x)
            times.append((time.perf_counter() - t0) * 1000 / b)
        out[f"ms_b{b}"] = float(np.median(times))
    with open("/proc/self/status") as f:  # VmHWM: this process image's peak (ru_maxrss would carry the parent's)
        out["peak_rss_mb"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10, help="timed forwards per batch size (default 10)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats)))
        return

    import torch

    from edgevpr.deploy.export import export_onnx
    from edgevpr.eval.efficiency import gflops
    from edgevpr.models.model import load_model, save_model
    from edgevpr.utils import write_json, write_text

    torch.manual_seed(0)
    fp32 = load_model(BASE)
    variants = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_model(fp32, d / "fp32")
        ops = gflops(fp32, (224, 224))
        variants["PyTorch fp32"] = ("torch", d / "fp32", ops)
        variants["PyTorch bf16 (autocast)"] = ("torch-bf16", d / "fp32", ops)
        variants["onnxruntime fp32"] = ("onnx", export_onnx(fp32, d / "fp32.onnx"), ops)
        for block, keep in ((3, 1.0), (3, 0.5), (3, 0.3), (1, 0.5)):
            cfg = {**BASE, "backbone": {**BASE["backbone"], "pruning": {"block": block, "method": "weitop"}},
                   "ternary": {}}
            torch.manual_seed(0)
            tern = load_model(cfg)
            tern.load_state_dict({**tern.state_dict(), **fp32.state_dict()})
            label = "onnxruntime int8 ternary" + ("" if keep == 1.0 else f" + WeiToP keep {keep} after block {block}")
            path = export_onnx(tern, d / f"t{block}_{keep}.onnx", knobs={"keep_ratio": keep}, int8=True)
            variants[label] = ("onnx-int8", path, gflops(tern, (224, 224), keep_ratio=keep))
        rows = []
        for label, (kind, path, g) in variants.items():
            r = subprocess.run([sys.executable, __file__, "--worker", kind, str(path), "--repeats", str(args.repeats)],
                               capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            size = path.stat().st_size if path.is_file() else (path / "model.safetensors").stat().st_size
            rows.append({"variant": label, **res, "gops": g, "bytes": size})
            print(rows[-1], flush=True)
    base_t, base_o = rows[0], rows[2]
    for r in rows:
        for b in (1, 8):
            r[f"speedup_torch_b{b}"] = base_t[f"ms_b{b}"] / r[f"ms_b{b}"]
            r[f"speedup_ort_b{b}"] = base_o[f"ms_b{b}"] / r[f"ms_b{b}"]
            r[f"peak_share_b{b}"] = r["gops"] / (r[f"ms_b{b}"] / 1000) / INT8_PEAK_GOPS
    write_json(ROOT / "benchmarks" / "results" / "edge.json", {"threads": torch.get_num_threads(), "rows": rows})
    lines = [f"# The edge model on this CPU ({torch.get_num_threads()} threads; DINOv2-S/14 + GeM, 224 px, random "
             "weights; each variant in a fresh process)", "",
             "| variant | ms/img b1 / b8 | speed-up vs PyTorch fp32 b1 / b8 | vs onnxruntime fp32 b1 / b8 | "
             "GOP/img | % of int8 GEMM peak b1 / b8 | model bytes | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms_b1']:.1f} / {r['ms_b8']:.1f} | {r['speedup_torch_b1']:.2f}x / "
                     f"{r['speedup_torch_b8']:.2f}x | {r['speedup_ort_b1']:.2f}x / {r['speedup_ort_b8']:.2f}x | "
                     f"{r['gops']:.2f} | {100 * r['peak_share_b1']:.0f}% / {100 * r['peak_share_b8']:.0f}% | "
                     f"{r['bytes'] / 2**20:.1f} MiB | {r['peak_rss_mb']:.0f} |")
    write_text(ROOT / "benchmarks" / "results" / "edge.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
