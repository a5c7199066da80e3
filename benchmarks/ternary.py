"""TAT-VPR on this CPU: fp32 vs ternary (fake-quant reference and the int8 GEMM path), side by side in one run.

    python benchmarks/ternary.py [--student runs/tat-vpr/cpu-stage2/best] [--repeats 7]

Architectures: DINOv2-S/14 (12 blocks, 384 wide) + GeM at 224 px, and the CPU student (the same blocks on a cut
EfficientNet-lite0 stem at 160 px; with --student, its trained ternary weights and head, else random weights).
For each: ms/img at batch 1 and 8 (median of --repeats), whole-model file bytes (fp32 safetensors vs the 2-bit
packed file), the bytes of the ternary layers' weights alone, and a sparsity sweep 0-60% with GFLOPs (dense
count minus the skipped inputs of the ternary linears) and measured time of both ternary paths. Cosine between
int8-path and fake-quant descriptors on 16 Gardens Point images at each sparsity. Writes
benchmarks/results/ternary.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from heldout import data_root

from edgevpr.data.images import list_images, load_image
from edgevpr.deploy.export import OnnxModel, export_onnx
from edgevpr.eval.efficiency import gflops, latency
from edgevpr.models.model import load_model, save_model
from edgevpr.models.ternary import TernaryLinear, to_int8
from edgevpr.utils import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
SPARSITIES = (0.0, 0.2, 0.4, 0.6)


def ternary_linear_flops(model, size: tuple[int, int]) -> float:
    """GFLOPs of one image spent in the ternary linears (2 * in * out per token)."""
    total = [0]

    def hook(m, inp, out):
        total[0] += 2 * m.in_features * m.out_features * inp[0].numel() // inp[0].shape[-1]

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, TernaryLinear)]
    with torch.no_grad():
        model(torch.zeros(1, 3, *size))
    for h in hs:
        h.remove()
    return total[0] / 1e9


def file_bytes(model, packed: bool) -> int:
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d, packed=packed)
        return (Path(d) / "model.safetensors").stat().st_size


def bench(name: str, fp32, ternary, size: tuple[int, int], images: torch.Tensor, repeats: int) -> dict:
    int8 = to_int8(copy.deepcopy(ternary))
    with tempfile.TemporaryDirectory() as d:  # the session holds the graph in memory
        ort8 = OnnxModel(export_onnx(ternary, Path(d) / "ternary.onnx", int8=True))
    models = {"fp32": fp32, "ternary (fake-quant)": ternary, "ternary (int8 GEMM)": int8,
              "ternary (onnxruntime int8)": ort8}
    row: dict = {"image_size": list(size), "speed": {}, "sweep": []}
    with torch.no_grad():
        cos = F.cosine_similarity(ort8(images), ternary(images))
        row["cosine_onnxruntime_int8_vs_fake_quant_min"] = float(cos.min())
    for label, m in models.items():
        row["speed"][label] = {f"ms_b{b}": latency(m, size, b, warmup=2, repeats=repeats)["ms_per_img"] for b in (1, 8)}
    t_params = sum(m.weight.numel() for m in ternary.modules() if isinstance(m, TernaryLinear))
    row["bytes"] = {"fp32_file": file_bytes(fp32, False), "ternary_packed_file": file_bytes(ternary, True),
                    "ternary_layers_fp32": t_params * 4, "ternary_layers_packed": (t_params + 3) // 4 + 4 * sum(
                        1 for m in ternary.modules() if isinstance(m, TernaryLinear))}
    dense, tflops = gflops(ternary, size), ternary_linear_flops(ternary, size)
    with torch.no_grad():
        for s in SPARSITIES:
            ref, fast = ternary(images, sparsity=s), int8(images, sparsity=s)
            row["sweep"].append({
                "sparsity": s, "gflops": dense - tflops * s,
                "ms_fake_quant_b8": latency(ternary, size, 8, warmup=1, repeats=repeats, sparsity=s)["ms_per_img"],
                "ms_int8_b8": latency(int8, size, 8, warmup=1, repeats=repeats, sparsity=s)["ms_per_img"],
                "cosine_int8_vs_fake_quant_min": float(F.cosine_similarity(fast, ref).min()),
            })
    row["gflops_fp32"] = gflops(fp32, size)
    print(name, row["speed"], row["bytes"])
    return row


def gp_images(n: int, size: tuple[int, int], model) -> torch.Tensor:
    data = data_root()
    t = model.transform(size)
    return torch.stack([t(load_image(p)) for p in list_images(data / "gardens_point" / "night_right")[:n]])


# The CPU student's patch embedding: EfficientNet-lite0 cut after its 5th block (configs/tat-vpr/cpu-stage1.yaml)
STEM = {"name": "efficientnet_lite0", "weights": "offline", "crop": ["blocks.5", "blocks.6", "conv_head", "bn2"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", help="a trained ternary student (saved model folder)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = {"backbone": {"name": "dinov2_vits14", "weights": None, "init_values": 1.0},
            "aggregator": {"name": "gem"}, "image_size": [224, 224]}
    rows = {}
    fp32, ternary = load_model(base), load_model({**base, "ternary": {}})
    ternary.load_state_dict(fp32.state_dict())
    rows["DINOv2-S/14 + GeM, 224 px"] = bench("dinov2-s", fp32, ternary, (224, 224), gp_images(16, (224, 224), fp32),
                                                args.repeats)
    if args.student:
        ternary = load_model(args.student)
        fp32 = load_model({**ternary.config, "ternary": None})
        fp32.load_state_dict(ternary.state_for_identity())
        label = f"CPU student {ternary.name}"
    else:
        student = {"backbone": {**base["backbone"], "init_values": 0.1, "stem": STEM},
                   "aggregator": {"name": "gem"}, "image_size": [160, 160]}
        fp32, ternary = load_model(student), load_model({**student, "ternary": {}})
        ternary.load_state_dict(fp32.state_dict())
        label = "CPU student shape (hybrid, random blocks)"
    size = ternary.image_size
    rows[f"{label}, {size[0]} px"] = bench("student", fp32, ternary, size, gp_images(16, size, fp32), args.repeats)
    write_json(OUT / "ternary.json", {"threads": torch.get_num_threads(), "rows": rows})
    md = ["# Ternary vs fp32 on this CPU (`python benchmarks/ternary.py`)", "",
          f"{torch.get_num_threads()} threads; ms/img is the median of timed forwards, all models in one run.", "",
          "| model | fp32 ms b1 / b8 | fake-quant ms b1 / b8 | int8 ms b1 / b8 | int8 speed-up b1 / b8 | "
          "onnxruntime int8 ms b1 / b8 (speed-up; min cosine to fake-quant) | "
          "file fp32 -> packed | ternary-layer weights fp32 -> packed |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in rows.items():
        sp, by = r["speed"], r["bytes"]
        f, q, i = sp["fp32"], sp["ternary (fake-quant)"], sp["ternary (int8 GEMM)"]
        o = sp["ternary (onnxruntime int8)"]
        fb, pb = by["fp32_file"], by["ternary_packed_file"]
        tf, tp = by["ternary_layers_fp32"], by["ternary_layers_packed"]
        md.append(f"| {k} | {f['ms_b1']:.1f} / {f['ms_b8']:.1f} | {q['ms_b1']:.1f} / {q['ms_b8']:.1f} | "
                  f"{i['ms_b1']:.1f} / {i['ms_b8']:.1f} | "
                  f"{f['ms_b1'] / i['ms_b1']:.2f}x / {f['ms_b8'] / i['ms_b8']:.2f}x | "
                  f"{o['ms_b1']:.1f} / {o['ms_b8']:.1f} "
                  f"({f['ms_b1'] / o['ms_b1']:.2f}x / {f['ms_b8'] / o['ms_b8']:.2f}x; "
                  f"{r['cosine_onnxruntime_int8_vs_fake_quant_min']:.4f}) | "
                  f"{fb / 1e6:.1f} MB -> {pb / 1e6:.1f} MB ({fb / pb:.1f}x) | "
                  f"{tf / 1e6:.1f} MB -> {tp / 1e6:.2f} MB ({tf / tp:.1f}x) |")
    md += ["", "Sparsity sweep (batch 8; GFLOPs count the ternary linears' skipped inputs as saved; the dense kernels",
           "used here do not skip them, so measured time does not fall with sparsity):", "",
           "| model | sparsity | GFLOPs | fake-quant ms/img | int8 ms/img | min cosine int8 vs fake-quant |",
           "|---|---:|---:|---:|---:|---:|"]
    for k, r in rows.items():
        md += [f"| {k} | {s['sparsity']:.1f} | {s['gflops']:.2f} | {s['ms_fake_quant_b8']:.1f} | "
               f"{s['ms_int8_b8']:.1f} | {s['cosine_int8_vs_fake_quant_min']:.5f} |" for s in r["sweep"]]
    write_text(OUT / "ternary.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
