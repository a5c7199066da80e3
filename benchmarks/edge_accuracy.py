"""What the edge paths cost in accuracy, with their speed: held-out R@1 of fp32 vs the int8 / ternary / pruned forms.

    python benchmarks/edge_accuracy.py [--students RUN/best[=FP32_TWIN/best] ...] [--cnn MODEL ...] [--append]

1. CNN int8 (static QDQ, calibrated on 64 database images of training places: Gardens Point day_right 0-69 and
   Nordland summer 0-1999, never the held-out ones): PyTorch fp32, onnxruntime fp32 and onnxruntime int8 of each
   --cnn model at its own input size, R@1 and ms/img at batch 1 (median of 20 after warm-up, in this process).
2. The composed edge model on the trained CPU hybrid students (ternary ViT blocks on an EfficientNet-lite0 stem,
   160 px; `make methods` trains them): TAT-VPR stage 1 (GeM on distilled tokens), stage 2 with BoQ, stage 2 with
   WeiAD + a WeiToP scorer on the distilled blocks (configs/tat-vpr/cpu-stage2-weiad.yaml), and the edge student
   configs/tat-vpr/cpu-edge.yaml (WeiAD + WeiToP on the undistilled hybrid) with its separately trained fp32 twin
   (configs/weitop/cpu-weiad-nodistill.yaml: the same recipe without ternary weights), measured unpruned and at
   keep 0.5 / 0.3. Each student: its latent weights run as plain fp32 (a reference, not a trained twin), ternary,
   its int8 ONNX export; for a head that takes any token set (GeM, WeiAD) also ternary + WeiToP pruning after
   block 3 at keep 0.5 / 0.3 and the composed int8 ONNX at keep 0.5. BoQ's 3x3 convolution needs the full token
   grid, so that student cannot be pruned. R@1 and ms/img at batch 1; with a twin, the composed model's R@1 gaps
   to it with paired 95% intervals. A student not trained is skipped.
Held-out places as every table here: Gardens Point 70-99 night_right vs day_right (+-2; 30 queries, steps of 0.033)
and Nordland 2000-2499 winter vs summer (+-1, dark frames dropped; 464 queries, the comparison to trust).
Writes benchmarks/results/edge_accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from backbones import timed
from heldout import ROOT, data_root, held_out_sets, top1_correct

from edgevpr.data.images import list_images
from edgevpr.deploy.export import export_onnx
from edgevpr.deploy.onnx_model import OnnxModel
from edgevpr.models.model import build_model, load_model
from edgevpr.utils import write_json, write_text

OUT = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs"


def ms_per_image(model, size: tuple[int, int], repeats: int = 20, **knobs) -> float:
    """Median ms of one batch-1 forward (PyTorch at runtime ``knobs``, or onnxruntime) after 3 warm-up runs, right
    after the model's accuracy in this process. Indicative only: the same int8 file measured 13.1 and 25.9 ms in two
    runs of this script here; speed ratios are benchmarks/edge.py's job (one fresh process per variant)."""
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    if isinstance(model, OnnxModel):
        def run():
            model.run(x)
    else:
        xt = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                model(xt, **knobs)
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
    """R@1 per set, each query's top-1 correctness as a '0'/'1' string (for paired gaps), batch-1 ms."""
    hits = top1_correct(model, sets, size, **knobs)
    r = {"variant": label, "recall@1": {n: float(h.mean()) for n, h in hits.items()},
         "ms_b1": ms_per_image(model, size, **knobs)}
    print(r, flush=True)
    r["top1_correct"] = {n: "".join("01"[int(v)] for v in h) for n, h in hits.items()}
    return r


def cnn_rows(spec: str, sets, data: Path, tmp: Path) -> list[dict]:
    model = load_model(spec).eval()
    size = tuple(model.image_size)
    spec = spec.removeprefix(str(ROOT) + "/")
    rows = [row(f"{spec}: PyTorch fp32", model, sets, size)]
    rows.append(row(f"{spec}: onnxruntime fp32", OnnxModel(export_onnx(model, tmp / "cnn.onnx")), sets, size))
    q8 = export_onnx(model, tmp / "cnn8.onnx", int8=True, calibration=calibration_csv(data, tmp / "cal.csv"))
    rows.append(row(f"{spec}: onnxruntime int8 (static QDQ)", OnnxModel(q8), sets, size))
    for r in rows:
        r["bytes"] = None
    rows[1]["bytes"], rows[2]["bytes"] = (tmp / "cnn.onnx").stat().st_size, q8.stat().st_size
    return rows


def student_rows(path: Path, sets, tmp: Path, block: int = 3, twin: Path | None = None) -> list[dict]:
    """fp32 (latent weights), ternary, int8 export; with a head that takes any token set also WeiToP pruning after
    ``block`` at keep 0.5 / 0.3 and the composed int8 ONNX at keep 0.5 (BoQ's 3x3 convolution needs the grid).
    ``twin``: a separately trained fp32 model of the same recipe, measured unpruned and at keep 0.5 / 0.3 first."""
    rows = []
    if twin is not None:
        fp32 = load_model(twin).eval()
        rows.append(row("fp32 twin (PyTorch)", fp32, sets, tuple(fp32.image_size)))
        for keep in (0.5, 0.3):
            rows.append(row(f"fp32 twin + WeiToP keep {keep} (PyTorch)", fp32, sets, tuple(fp32.image_size),
                            keep_ratio=keep))
    tern = load_model(path).eval()
    size = tuple(tern.image_size)
    cfg = copy.deepcopy(tern.config)
    latent = build_model({k: v for k, v in cfg.items() if k != "ternary"}).eval()
    latent.load_state_dict(tern.state_dict(), strict=False)
    rows += [row("latent weights as fp32 (PyTorch)", latent, sets, size),
             row("ternary (PyTorch)", tern, sets, size)]
    plain = export_onnx(tern, tmp / "tern.onnx", int8=True)
    rows.append(row("ternary, int8 ONNX", OnnxModel(plain), sets, size))
    rows[-1]["bytes"] = plain.stat().st_size
    if getattr(tern.aggregator, "needs_grid", False):
        return rows
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


def paired_gap(a: str, b: str) -> tuple[float, float]:
    """R@1 of a minus R@1 of b on the same queries ('0'/'1' strings) and the 95% half-width of that difference
    (1.96 x the standard error of the per-query differences: only queries the two answer differently count)."""
    d = np.array([int(x) - int(y) for x, y in zip(a, b, strict=True)], float)
    return float(d.mean()), 1.96 * float(d.std(ddof=1)) / math.sqrt(d.size)


def twin_gap(student: dict, names: list[str]) -> list[str]:
    """Markdown lines: the composed int8 model at keep 0.5 against the fp32 twin, unpruned and at keep 0.5, each
    gap with its paired 95% interval."""
    if not student.get("twin"):
        return []
    by = {r["variant"]: r["top1_correct"] for r in student["rows"]}
    composed = student["rows"][-1]["top1_correct"]

    def gaps(ref: dict) -> str:
        return ", ".join("{} {:+.3f} +- {:.3f}".format(n, *paired_gap(composed[n], ref[n])) for n in names)

    return ["", f"fp32 twin: {student['twin']} (the same recipe without ternary weights). R@1 of the composed int8 "
            f"model at keep 0.5 minus the twin's, unpruned: {gaps(by['fp32 twin (PyTorch)'])}; at keep 0.5: "
            f"{gaps(by['fp32 twin + WeiToP keep 0.5 (PyTorch)'])} (paired 95% intervals over the same queries)."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", nargs="*",
                    default=[f"{RUNS}/tat-vpr/cpu-stage1/final", f"{RUNS}/tat-vpr/cpu-stage2/best",
                             f"{RUNS}/tat-vpr/cpu-stage2-weiad/best",
                             f"{RUNS}/tat-vpr/cpu-edge/best={RUNS}/weitop/cpu-weiad-nodistill/best"],
                    help="trained ternary hybrid students, each RUN or RUN=FP32_TWIN_RUN (default: TAT-VPR stage 1 "
                         "with GeM, stage 2 with BoQ, stage 2 with WeiAD + WeiToP, and the edge student "
                         "configs/tat-vpr/cpu-edge.yaml with its fp32 twin configs/weitop/cpu-weiad-nodistill.yaml)")
    ap.add_argument("--cnn", nargs="*", default=["effnet-lite0-gem", str(ROOT / "runs" / "gp-nordland" / "best")],
                    help="CNN models for the int8 table (default: the preset and the fine-tuned runs/gp-nordland)")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of edge_accuracy.json of models this run does not measure (default: afresh)")
    args = ap.parse_args()
    data = data_root()
    sets = held_out_sets(data, day_left=False)
    res: dict = {"threads": torch.get_num_threads(), "cnn": [], "students": []}
    students = [(Path(a), Path(b) if b else None) for a, _, b in (spec.partition("=") for spec in args.students)]
    if args.append and (OUT / "edge_accuracy.json").is_file():
        old = json.loads((OUT / "edge_accuracy.json").read_text())
        names = {str(st.resolve().relative_to(ROOT)) for st, _ in students if st.exists()}
        res["students"] = [st for st in old["students"] if st["path"] not in names]
        res["cnn"] = [] if args.cnn else old["cnn"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for spec in args.cnn:
            if Path(spec).is_absolute() and not Path(spec).exists():
                print(f"skipping {spec}: not trained here")
                continue
            res["cnn"] += cnn_rows(spec, sets, data, tmp)
        for st, twin in students:
            if not st.exists() or (twin is not None and not twin.exists()):
                print(f"skipping {st}: it or its fp32 twin {twin} is not trained here (make methods)")
                continue
            res["students"].append({"path": str(st.resolve().relative_to(ROOT)), "rows": student_rows(st, sets, tmp,
                                                                                                      twin=twin),
                                    "twin": str(twin.resolve().relative_to(ROOT)) if twin else None})
    write_json(OUT / "edge_accuracy.json", res)
    names = [ds.name for ds in sets]
    head = ["| variant | " + " | ".join(f"R@1 {n}" for n in names) + " | ms/img b1 | file |",
            "|---|" + "---:|" * (len(names) + 2)]

    def table(rows):
        return [f"| {r['variant']} | " + " | ".join(f"{r['recall@1'][n]:.3f}" for n in names) +
                f" | {r['ms_b1']:.1f} | " + (f"{r['bytes'] / 2**20:.1f} MiB" if r.get("bytes") else "-") + " |"
                for r in rows]

    lines = [f"# Edge paths: held-out R@1 and batch-1 speed ({res['threads']} threads; `python benchmarks/"
             "edge_accuracy.py`)", "", "ms/img is measured inside this accuracy run and is indicative only (one file's "
             "batch-1 time varied up to 2x between runs here); speed comparisons are in edge.md and edge_student.md "
             "(`benchmarks/edge.py`: fresh processes, alternating rounds).", "",
             "## CNN int8 (static QDQ) vs fp32", "", *head, *table(res["cnn"])]
    for st in res["students"]:
        lines += ["", f"## The composed edge model on a trained CPU hybrid student ({st['path']}, 160 px, "
                  "sparsity 0)", "", *head, *table(st["rows"]), *twin_gap(st, names)]
    if not res["students"]:
        lines += ["", "No trained hybrid student is here: train them with `make methods`."]
    write_text(OUT / "edge_accuracy.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
