"""The edge model on this CPU, every variant side by side in one run: DINOv2-S/14 + GeM at 224 px (random weights).

    python benchmarks/edge.py [--repeats 10]
    python benchmarks/edge.py --student runs/tat-vpr/cpu-edge/best=runs/weitop/cpu-weiad-nodistill/best

Variants: PyTorch fp32; PyTorch bf16 (autocast); onnxruntime fp32; onnxruntime int8 of the ternary model (TAT-VPR
linears, dynamic int8 activations) unpruned, and with WeiToP pruning after block 3 at keep 0.5 / 0.3, and after
block 1 at keep 0.5 (where pruning happens). Each variant runs in its own fresh process (the onnxruntime ones
without torch, as on a device), which reports ms/img at batch 1 and 8 (median of --repeats after warm-up) and its
peak RSS; --rounds rounds of every variant in turn, the median over rounds reported (batch-1 times of one file
varied up to 2x between minutes here). Reported beside them: speed-up over PyTorch fp32 and over onnxruntime
fp32, GOPs per image (FLOP counter on the PyTorch model at the variant's keep ratio), the share of this CPU's int8
GEMM peak (577 GOP/s, DESIGN.md) that GOPs / time reaches, and the model file bytes.
Writes benchmarks/results/edge.{json,md}.
--student RUN=FP32_TWIN: the same for a trained composed student at its own input size (PyTorch fp32 and
onnxruntime fp32 of its separately trained fp32 twin; int8 of the ternary student unpruned and at keep 0.5 / 0.3 at
its pruning block); writes benchmarks/results/edge_student.{json,md}.
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


def worker(kind: str, path: str, repeats: int, size: tuple[int, int]) -> dict:
    """Time one variant in this (fresh) process at ``size`` (H, W): ms/img at batch 1 and 8, peak RSS."""
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
        x = np.random.default_rng(0).standard_normal((b, 3, *size)).astype(np.float32)
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


def default_variants(d: Path) -> tuple[dict, tuple[int, int], str]:
    """DINOv2-S + GeM at 224 px, random weights: label -> (kind, path, GOPs); size; the table's subject."""
    import torch

    from edgevpr.deploy.export import export_onnx
    from edgevpr.eval.efficiency import gflops
    from edgevpr.models.model import load_model, save_model

    torch.manual_seed(0)
    fp32 = load_model(BASE)
    save_model(fp32, d / "fp32")
    ops = gflops(fp32, (224, 224))
    variants = {"PyTorch fp32": ("torch", d / "fp32", ops), "PyTorch bf16 (autocast)": ("torch-bf16", d / "fp32", ops),
                "onnxruntime fp32": ("onnx", export_onnx(fp32, d / "fp32.onnx"), ops)}
    for block, keep in ((3, 1.0), (3, 0.5), (3, 0.3), (1, 0.5)):
        cfg = {**BASE, "backbone": {**BASE["backbone"], "pruning": {"block": block, "method": "weitop"}},
               "ternary": {}}
        torch.manual_seed(0)
        tern = load_model(cfg)
        tern.load_state_dict({**tern.state_dict(), **fp32.state_dict()})
        label = "onnxruntime int8 ternary" + ("" if keep == 1.0 else f" + WeiToP keep {keep} after block {block}")
        path = export_onnx(tern, d / f"t{block}_{keep}.onnx", knobs={"keep_ratio": keep}, int8=True)
        variants[label] = ("onnx-int8", path, gflops(tern, (224, 224), keep_ratio=keep))
    return variants, (224, 224), "DINOv2-S/14 + GeM, 224 px, random weights"


def student_variants(d: Path, student: Path, twin: Path) -> tuple[dict, tuple[int, int], str]:
    """A trained composed student and its fp32 twin: label -> (kind, path, GOPs); size; the table's subject."""
    from edgevpr.deploy.export import export_onnx
    from edgevpr.eval.efficiency import gflops
    from edgevpr.models.model import load_model

    fp32, tern = load_model(twin).eval(), load_model(student).eval()
    size = tuple(tern.image_size)
    block = tern.config["backbone"]["pruning"]["block"]
    ops = gflops(fp32, size)
    variants = {"PyTorch fp32 twin": ("torch", twin, ops),
                "onnxruntime fp32 twin": ("onnx", export_onnx(fp32, d / "fp32.onnx"), ops)}
    for keep in (1.0, 0.5, 0.3):
        pruned = "" if keep == 1.0 else f" + WeiToP keep {keep} after block {block}"
        label = f"onnxruntime int8 ternary student{pruned}"
        path = export_onnx(tern, d / f"t{keep}.onnx", knobs={"keep_ratio": keep}, int8=True)
        variants[label] = ("onnx-int8", path, gflops(tern, size, keep_ratio=keep))
    return variants, size, f"{student} (trained composed student) and its fp32 twin {twin}, {size[0]} px"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10, help="timed forwards per batch size (default 10)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="fresh processes per variant, in alternating rounds; the median is reported (default 3)")
    ap.add_argument("--student", metavar="RUN=FP32_TWIN", default=None,
                    help="time a trained composed student against its fp32 twin instead (default: no, DINOv2-S)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, nargs=2, default=(224, 224), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats, tuple(args.size))))
        return

    import torch

    from edgevpr.utils import write_json, write_text

    name = "edge_student" if args.student else "edge"
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if args.student:
            student, _, twin = args.student.partition("=")
            if not twin:
                ap.error("--student needs RUN=FP32_TWIN (the separately trained fp32 twin's run)")
            variants, size, subject = student_variants(d, Path(student), Path(twin))
        else:
            variants, size, subject = default_variants(d)
        runs: dict[str, list[dict]] = {label: [] for label in variants}
        for _ in range(args.rounds):  # every variant once per round, so a slow spell of this machine hits all alike
            for label, (kind, path, _g) in variants.items():
                r = subprocess.run([sys.executable, __file__, "--worker", kind, str(path), "--repeats",
                                    str(args.repeats), "--size", *map(str, size)], capture_output=True, text=True,
                                   check=True)
                runs[label].append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(label, runs[label][-1], flush=True)
        rows = []
        for label, (_kind, path, g) in variants.items():
            path = Path(path)
            size_b = path.stat().st_size if path.is_file() else (path / "model.safetensors").stat().st_size
            res = {k: float(np.median([r[k] for r in runs[label]])) for k in ("ms_b1", "ms_b8")}
            rows.append({"variant": label, **res, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[label]),
                         "gops": g, "bytes": size_b, "rounds": runs[label]})
    base_t, base_o = rows[0], next(r for r in rows if r["variant"].startswith("onnxruntime fp32"))
    for r in rows:
        for b in (1, 8):
            r[f"speedup_torch_b{b}"] = base_t[f"ms_b{b}"] / r[f"ms_b{b}"]
            r[f"speedup_ort_b{b}"] = base_o[f"ms_b{b}"] / r[f"ms_b{b}"]
            r[f"peak_share_b{b}"] = r["gops"] / (r[f"ms_b{b}"] / 1000) / INT8_PEAK_GOPS
    out = ROOT / "benchmarks" / "results"
    write_json(out / f"{name}.json", {"threads": torch.get_num_threads(), "subject": subject, "rows": rows})
    lines = [f"# The edge model on this CPU ({torch.get_num_threads()} threads; {subject}; each variant in a fresh "
             f"process, median of {args.rounds} alternating rounds)", "",
             "| variant | ms/img b1 / b8 | speed-up vs PyTorch fp32 b1 / b8 | vs onnxruntime fp32 b1 / b8 | "
             "GOP/img | % of int8 GEMM peak b1 / b8 | model bytes | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms_b1']:.1f} / {r['ms_b8']:.1f} | {r['speedup_torch_b1']:.2f}x / "
                     f"{r['speedup_torch_b8']:.2f}x | {r['speedup_ort_b1']:.2f}x / {r['speedup_ort_b8']:.2f}x | "
                     f"{r['gops']:.2f} | {100 * r['peak_share_b1']:.0f}% / {100 * r['peak_share_b8']:.0f}% | "
                     f"{r['bytes'] / 2**20:.1f} MiB | {r['peak_rss_mb']:.0f} |")
    write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
