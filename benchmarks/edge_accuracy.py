"""What the edge paths cost in accuracy, with their speed: held-out R@1 of fp32 vs the int8 / ternary / pruned forms.

    python benchmarks/edge_accuracy.py [--student runs/tat-vpr/cpu-stage2/best] [--cnn effnet-lite0-gem ...]

1. CNN int8 (static QDQ, calibrated on 64 database images of training places: Gardens Point day_right 0-69 and
   Nordland summer 0-1999, never the held-out ones): PyTorch fp32, onnxruntime fp32 and onnxruntime int8 of each
   --cnn model at its own input size, R@1 and ms/img at batch 1 (median of 20 after warm-up, in this process).
2. The composed edge model on the trained CPU hybrid student (TAT-VPR stage 2: ternary ViT blocks on an
   EfficientNet-lite0 stem, BoQ head, 160 px; `make methods` trains it): its latent weights run as plain fp32
   (the student was trained ternary, so this is a reference, not a trained twin), ternary, ternary + WeiToP
   pruning after block 3 at keep 0.5 / 0.3, and the int8 ONNX export of ternary + keep 0.5 (the composed model),
   each with R@1 and ms/img at batch 1. Skipped with a note when --student does not exist.
Held-out places as every table here: Gardens Point 70-99 night_right vs day_right (+-2; 30 queries, steps of 0.033)
and Nordland 2000-2499 winter vs summer (+-1, dark frames dropped; 464 queries, the comparison to trust).
Writes benchmarks/results/edge_accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from backbones import timed
from heldout import ROOT, data_root, held_out_sets, recall1

from edgevpr.data.images import list_images
from edgevpr.deploy.export import export_onnx
from edgevpr.deploy.onnx_model import OnnxModel
from edgevpr.models.model import build_model, load_model
from edgevpr.utils import write_json, write_text

OUT = ROOT / "benchmarks" / "results"


def ms_per_image(model, size: tuple[int, int], repeats: int = 20) -> float:
    """Median ms of one batch-1 forward (PyTorch or onnxruntime) after 3 warm-up runs."""
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    if isinstance(model, OnnxModel):
        def run():
            model.run(x)
    else:
        xt = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                model(xt)
    return timed(run, repeats, warmup=3)


def calibration_csv(data: Path, out: Path, count: int = 64) -> Path:
    """A CSV of ``count`` database images of training places (evenly spaced), for int8 calibration."""
    gp = [p for p in list_images(data / "gardens_point" / "day_right") if int(p.stem[-3:]) < 70]
    nl = [p for p in list_images(data / "nordland_64x32" / "summer") if int(p.stem.split("-")[-1]) <= 20000]
    pool = gp + nl
    pick = [pool[int(i)] for i in np.linspace(0, len(pool) - 1, count)]
    out.write_text("path\n" + "\n".join(str(p) for p in pick) + "\n")
    return out


def row(label: str, model, sets, size, **knobs) -> dict:
    r = {"variant": label, "recall@1": recall1(model, sets, size, **knobs), "ms_b1": ms_per_image(model, size)}
    print(r, flush=True)
    return r


def cnn_rows(spec: str, sets, data: Path, tmp: Path) -> list[dict]:
    model = load_model(spec).eval()
    size = tuple(model.image_size)
    rows = [row(f"{spec}: PyTorch fp32", model, sets, size)]
    rows.append(row(f"{spec}: onnxruntime fp32", OnnxModel(export_onnx(model, tmp / "cnn.onnx")), sets, size))
    q8 = export_onnx(model, tmp / "cnn8.onnx", int8=True, calibration=calibration_csv(data, tmp / "cal.csv"))
    rows.append(row(f"{spec}: onnxruntime int8 (static QDQ)", OnnxModel(q8), sets, size))
    for r in rows:
        r["bytes"] = None
    rows[1]["bytes"], rows[2]["bytes"] = (tmp / "cnn.onnx").stat().st_size, q8.stat().st_size
    return rows


def student_rows(path: Path, sets, tmp: Path, block: int = 3) -> list[dict]:
    tern = load_model(path).eval()
    size = tuple(tern.image_size)
    cfg = copy.deepcopy(tern.config)
    fp32_cfg = {k: v for k, v in cfg.items() if k != "ternary"}
    latent = build_model(fp32_cfg).eval()
    latent.load_state_dict(tern.state_dict(), strict=False)
    rows = [row("latent weights as fp32 (PyTorch)", latent, sets, size),
            row("ternary (PyTorch)", tern, sets, size)]
    cfg["backbone"] = {**cfg["backbone"], "pruning": {"block": block, "method": "weitop"}}
    pruned = build_model(cfg).eval()
    missing = pruned.load_state_dict(tern.state_dict(), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    for keep in (0.5, 0.3):
        rows.append(row(f"ternary + WeiToP keep {keep} after block {block} (PyTorch)", pruned, sets, size,
                        keep_ratio=keep))
    onnx = export_onnx(pruned, tmp / "edge.onnx", knobs={"keep_ratio": 0.5}, int8=True)
    rows.append(row(f"composed: int8 ONNX, ternary + keep 0.5 after block {block}", OnnxModel(onnx), sets, size))
    rows[-1]["bytes"] = onnx.stat().st_size
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, default=ROOT / "runs" / "tat-vpr" / "cpu-stage2" / "best",
                    help="trained hybrid student (default runs/tat-vpr/cpu-stage2/best)")
    ap.add_argument("--cnn", nargs="*", default=["effnet-lite0-gem", str(ROOT / "runs" / "gp-nordland" / "best")],
                    help="CNN models for the int8 table (default: the preset and the fine-tuned runs/gp-nordland)")
    args = ap.parse_args()
    data = data_root()
    sets = held_out_sets(data, day_left=False)
    res: dict = {"threads": torch.get_num_threads(), "cnn": [], "student": None}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for spec in args.cnn:
            if Path(spec).is_absolute() and not Path(spec).exists():
                print(f"skipping {spec}: not trained here")
                continue
            res["cnn"] += cnn_rows(spec, sets, data, tmp)
        if args.student.exists():
            res["student"] = {"path": str(args.student.relative_to(ROOT)), "rows": student_rows(args.student, sets,
                                                                                               tmp)}
    write_json(OUT / "edge_accuracy.json", res)
    names = [ds.name for ds in sets]
    head = ["| variant | " + " | ".join(f"R@1 {n}" for n in names) + " | ms/img b1 | file |",
            "|---|" + "---:|" * (len(names) + 2)]

    def table(rows):
        return [f"| {r['variant']} | " + " | ".join(f"{r['recall@1'][n]:.3f}" for n in names) +
                f" | {r['ms_b1']:.1f} | " + (f"{r['bytes'] / 2**20:.1f} MiB" if r.get("bytes") else "-") + " |"
                for r in rows]

    lines = [f"# Edge paths: held-out R@1 and batch-1 speed ({res['threads']} threads; `python benchmarks/"
             "edge_accuracy.py`)", "", "## CNN int8 (static QDQ) vs fp32", "", *head, *table(res["cnn"])]
    if res["student"]:
        lines += ["", f"## The composed edge model on the trained CPU hybrid student ({res['student']['path']}, "
                  "160 px, sparsity 0)", "", *head, *table(res["student"]["rows"])]
    else:
        lines += ["", f"The trained hybrid student ({args.student}) is not here: train it with `make methods`."]
    write_text(OUT / "edge_accuracy.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
