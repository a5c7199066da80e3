"""`edgevpr compress` on real maps: the default model (EfficientNet-lite0 + GeM, ImageNet weights, 224 px) as the
teacher, a budget of a quarter of its onnxruntime fp32 time, the candidate within it that agrees most with the
teacher.

    python benchmarks/compress.py [--threads 1]

Maps: Gardens Point day_right (100 places; queries: night_right, ground truth +-2 frames) and Nordland summer
places 1500-2499 (1000 places the fine-tuning recipes never train on; queries: winter, +-1). No label is used to
choose (``--choose-by agreement``): the command sees the labels (``--aligned``) only to report R@1 beside agreement;
choosing by R@1 would pick the best of many candidates on the very queries it is reported on. Writes
benchmarks/results/compress.{json,md} and compress_<map>.png (each map's frontier).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import ROOT, data_root  # noqa: E402

from edgevpr.compress.budget import DISTIL_SIZES, DISTIL_STEPS, choice_key, compress  # noqa: E402
from edgevpr.utils import write_json, write_text  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def csv(path: Path, files: list[Path]) -> str:
    path.write_text("path\n" + "\n".join(str(f) for f in files) + "\n")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="effnet-lite0-gem", help="teacher model (default effnet-lite0-gem)")
    ap.add_argument("--threads", type=int, default=1, help="threads of the timed model (default 1: one core)")
    ap.add_argument("--work", help="folder kept between runs (resumes; default: a temporary one)")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 0.75, 0.6, 0.5, 0.4, 0.3],
                    help="input sizes tried, fractions of the teacher's (default 1 0.75 0.6 0.5 0.4 0.3)")
    ap.add_argument("--distil-steps", type=int, default=DISTIL_STEPS,
                    help=f"training steps of each distilled candidate (default {DISTIL_STEPS})")
    ap.add_argument("--distil-sizes", type=int, default=DISTIL_SIZES,
                    help=f"input sizes students are distilled at, the largest within the budget (default "
                         f"{DISTIL_SIZES})")
    ap.add_argument("--stages-from", help="an earlier compress.json whose run did part of the work that --work now "
                                          "holds: its wall times per stage are added to this run's (default: none)")
    ap.add_argument("--gp-places", type=int, nargs=2, default=[0, 100], metavar=("FROM", "TO"),
                    help="Gardens Point places of the map and its night queries (default 0 100)")
    ap.add_argument("--nordland-places", type=int, nargs=2, default=[1500, 2500], metavar=("FROM", "TO"),
                    help="Nordland places of the summer map and its winter queries (default 1500 2500)")
    ap.add_argument("--name", default="compress", help="results file stem in benchmarks/results (default compress)")
    ap.add_argument("--maps", nargs="+", choices=["gardens_point", "nordland"], default=["gardens_point", "nordland"],
                    help="maps to run (default both)")
    ap.add_argument("--ternary", action="store_true", help="also a TAT-VPR ternary candidate (default off)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only write --name's results from these runs' JSON (their maps together; default: run)")
    args = ap.parse_args()
    if args.merge:  # runs of one map each (e.g. in parallel on two cores): one table
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        res = {**runs[0], "name": args.name, "maps": {k: v for r in runs for k, v in r["maps"].items()},
               "places": {k: v for r in runs for k, v in r["places"].items() if k in r["maps"]}}
        for r in runs:
            for m in r["maps"]:
                if r["name"] != args.name and (OUT / f"{r['name']}_{m}.png").is_file():
                    shutil.copyfile(OUT / f"{r['name']}_{m}.png", OUT / f"{args.name}_{m}.png")
        write_json(OUT / f"{args.name}.json", res)
        write_text(OUT / f"{args.name}.md", table(res))
        return
    data = data_root()
    gp, nl = data / "gardens_point", data / "nordland_64x32"
    g, n = slice(*args.gp_places), slice(*args.nordland_places)
    maps = {"gardens_point": (sorted((gp / "day_right").glob("*.jpg"))[g],
                              sorted((gp / "night_right").glob("*.jpg"))[g], 2),
            "nordland": (sorted((nl / "summer").glob("*.png"))[n], sorted((nl / "winter").glob("*.png"))[n], 1)}
    maps = {k: v for k, v in maps.items() if k in args.maps}
    work = Path(args.work or tempfile.mkdtemp(dir=os.environ.get("TMPDIR")))
    work.mkdir(parents=True, exist_ok=True)
    res = {"teacher": args.teacher, "threads": args.threads, "maps": {}, "name": args.name, "sizes": args.sizes,
           "ternary": args.ternary,
           "places": {"gardens_point": args.gp_places, "nordland": args.nordland_places}}
    for name, (db, q, tol) in maps.items():
        assert len(db) == len(q) and db, name
        t0 = time.perf_counter()
        # a first pass with a generous budget measures the teacher; the budget is then a quarter of its time
        probe = compress(args.teacher, csv(work / f"{name}-map.csv", db), 1e9, work / name,
                         queries=csv(work / f"{name}-q.csv", q), aligned=tol, threads=args.threads,
                         sizes=tuple(args.sizes), distil_steps=0, choose_by="agreement")
        budget = probe["teacher"]["ms"] / 4
        try:
            r = compress(args.teacher, work / f"{name}-map.csv", budget, work / name,
                         queries=work / f"{name}-q.csv", aligned=tol, threads=args.threads, sizes=tuple(args.sizes),
                         distil_steps=args.distil_steps, distil_sizes=args.distil_sizes, choose_by="agreement",
                         ternary=args.ternary)
        except ValueError as e:
            r = {**probe, "chosen": None, "budget_ms": budget, "error": str(e)}
        # the first pass measured the teacher and the plain candidates, the second (reusing them) distilled
        later = r.get("stages_s", {})
        r["stages_s"] = {**probe["stages_s"], "distil_s": later.get("distil_s", 0.0),
                         **{k: v for k, v in later.items() if k not in probe["stages_s"]}}
        r["distil_steps"], r["distil_sizes"] = args.distil_steps, args.distil_sizes
        r["wall_s"] = time.perf_counter() - t0
        if args.stages_from:  # this pass reused that run's work and did the rest: a user waits for both
            before = json.loads(Path(args.stages_from).read_text())["maps"][name]
            r["stages_s"] = {k: v + before["stages_s"].get(k, 0.0) for k, v in r["stages_s"].items()}
            r["wall_s"] += before["wall_s"]
        res["maps"][name] = r
        if (work / name / "frontier.png").is_file():
            shutil.copyfile(work / name / "frontier.png", OUT / f"{args.name}_{name}.png")
        print(name, r.get("chosen"), flush=True)
    write_json(OUT / f"{args.name}.json", res)
    write_text(OUT / f"{args.name}.md", table(res))
    print(table(res))


def se(p: float, n: int) -> float:
    """Binomial standard error of a rate ``p`` over ``n`` queries."""
    return (p * (1 - p) / n) ** 0.5


def table(res: dict) -> str:
    name = res.get("name", "compress")
    lines = [f"# `edgevpr compress` on real maps (`python benchmarks/compress.py --name {name}`)", "",
             f"Teacher: {res['teacher']}; budget: a quarter of the teacher's onnxruntime fp32 ms at batch 1; "
             f"{res['threads']} thread(s). Candidates: the teacher's architecture at input sizes x fp32/int8 x "
             "PCA-whitened descriptor sizes (x keep ratios 1 / 0.75 / 0.5 when the teacher has a WeiToP scorer), "
             "plus, at the " + str(next(iter(res["maps"].values()), {}).get("distil_sizes", "")) +
             " largest smaller input sizes that meet the budget, a student "
             "distilled label-free from the teacher on the map's own images (the teacher's weights as the start, "
             f"{res.get('distil_steps', DISTIL_STEPS)} steps of 16 RandAugmented map images, to the teacher's "
             "full-size descriptor); a smaller student of the teacher's family (a ViT's first half of blocks, a CNN "
             "without its last two stages) distilled with token distillation too, at the largest size it meets the "
             "budget; with --ternary, a TAT-VPR stage-1 ternary student (int8). Accuracy: R@1 of the other "
             "visit's photos (ground truth +-frames); agreement: same top-1 as the teacher; cos: mean cosine to the "
             "teacher's descriptor of the same query. Chosen label-free: the most agreement within the budget (ties: "
             "cos, then the faster); the labels only report R@1. Each map is one "
             "`edgevpr compress --teacher T --images MAP.csv --queries VISIT.csv --aligned N --choose-by agreement "
             f"--budget-ms B --threads {res['threads']} --sizes {' '.join(f'{x:g}' for x in res.get('sizes', []))}"
             + (" --ternary" if res.get("ternary") else "") + "` "
             "(the script writes the CSVs), pinned to one core here. Maps (places): " + "; ".join(
                 f"{m} {a}-{b}" for m, (a, b) in res.get("places", {"gardens_point": [0, 100],
                                                                    "nordland": [1500, 2500]}).items()) +
             ". Uncertainty (binomial standard error of R@1 at the teacher's value): " + "; ".join(
                 f"{m} {r['n_queries']} queries, {se(r['teacher']['accuracy'], r['n_queries']):.3f}"
                 for m, r in res["maps"].items()) + ". Distilled candidates take their "
             "plain twin's time (the same graph). When the work folder was reused (`--stages-from`), the wall times "
             "add the earlier run's and this one's.", "",
             "| map | model | input | int8 | dim | R@1 | agreement | ms | MB | share of teacher R@1 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["maps"].items():
        t = r["teacher"]
        lines.append(f"| {name} | teacher | {t['image_size'][0]}x{t['image_size'][1]} | no | {t['dim']} | "
                     f"{t['accuracy']:.3f} | 1.000 | {t['ms']:.2f} | {t['mb']:.1f} | 1.00 |")
        within = [c for c in r["candidates"] if c["ms"] <= r["budget_ms"]]
        plain = [c for c in within if not c.get("distilled")]
        ternary = [c for c in within if c.get("kind") == "ternary"]
        rows = []
        if plain and r.get("chosen") and r["chosen"].get("distilled"):
            rows.append(("label-free, undistilled only", max(plain, key=choice_key("agreement"))))
        if r.get("chosen"):
            rows.append(("chosen (label-free)", r["chosen"]))
            rows.append(("best R@1 within budget (picked with labels: optimistic)",
                         max(within, key=choice_key("accuracy"))))
        if ternary:
            rows.append(("best ternary (TAT-VPR stage 1) by agreement", max(ternary, key=choice_key("agreement"))))
        for what, c in rows:
            share = c["accuracy"] / t["accuracy"] if t["accuracy"] else float("nan")
            lines.append(f"| {name} | {what}: {c['name']} | {c['image_size'][0]}x{c['image_size'][1]} | "
                         f"{'yes' if c['int8'] else 'no'} | {c['dim']} | {c['accuracy']:.3f} | {c['agreement']:.3f} | "
                         f"{c['ms']:.2f} | {c['mb']:.1f} | {share:.2f} |")
        if not rows:
            lines.append(f"| {name} | none within {r['budget_ms']:.2f} ms | | | | | | | | |")
    lines += ["", "Wall time per stage (s, from an empty work folder): " + "; ".join(
        f"{n}: " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in r["stages_s"].items()) + f" (total {r['wall_s']:.0f})"
        for n, r in res["maps"].items()), ""]
    for name, r in res["maps"].items():
        lines += [f"## {name}: every candidate", "", f"![frontier]({res.get('name', 'compress')}_{name}.png)", "",
                  "| candidate | R@1 | agreement | cos | ms | MB |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['name']} | {c['accuracy']:.3f} | {c['agreement']:.3f} | "
                  f"{'' if c.get('teacher_cos') is None else format(c['teacher_cos'], '.3f')} | {c['ms']:.2f} | "
                  f"{c['mb']:.1f} |" for c in sorted(r["candidates"], key=lambda c: c["ms"])]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
