"""What a verified query costs end to end, with the query's local features taken from its descriptor's forward (one
pass, what ``Localizer.stream``, ``localize``, ``serve`` and the pipeline do) or computed by a pass of their own
(two passes, what edgevpr did before), side by side in one run.

    python benchmarks/verify_latency.py [--verify 25] [--queries 40] [--repeats 3]

Index: Gardens Point day_right 0-99 with the default model (EfficientNet-lite0 + GeM, 224 px), in PyTorch and as
its fp32 ONNX export (torch-free runtime path). Queries: night_right 0-``--queries``. Each query is answered both
ways, alternating which goes first, ``--repeats`` times; the database's feature maps are computed once before
timing (the verifier caches them), so the difference is the query's second forward. Both ways must give the same
answer and the same inlier counts (checked). Reports the median ms per query each way and their ratio. Writes
benchmarks/results/verify_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from heldout import ROOT, data_root

from edgevpr.data.images import load_image
from edgevpr.deploy import index as idx
from edgevpr.deploy.export import export_onnx
from edgevpr.deploy.localize import Localizer
from edgevpr.deploy.onnx_model import OnnxModel
from edgevpr.models.model import load_model
from edgevpr.threads import configure
from edgevpr.utils import write_json, write_text


def timed(loc: Localizer, img, one_pass: bool) -> tuple[float, object]:
    """One verified query -> (ms, its answer), the query's features from the descriptor's pass or their own."""
    t0 = time.perf_counter()
    if one_pass:
        d, feats = loc.embed_local(loc.prepare(img)[None])
    else:
        d, feats = loc.embed([img]), None
    a = loc.answer(d, 5, None, [img], features=feats)[0]
    return (time.perf_counter() - t0) * 1000, a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", type=int, default=25, help="candidates verified per query (default 25)")
    ap.add_argument("--queries", type=int, default=40, help="night_right queries 0..N-1 (default 40)")
    ap.add_argument("--repeats", type=int, default=3, help="times each query is answered each way (default 3)")
    args = ap.parse_args()
    configure(1)
    gp = data_root() / "gardens_point"
    photos = [load_image(p) for p in sorted((gp / "night_right").glob("*.jpg"))[:args.queries]]
    model = load_model("effnet-lite0-gem").eval()
    res: dict = {"verify": args.verify, "queries": len(photos), "repeats": args.repeats, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(model, Path(tmp) / "m.onnx")
        for name, m in (("PyTorch", model), ("ONNX fp32 (torch-free path)", OnnxModel(onnx))):
            root = Path(tmp) / name.split()[0]
            idx.build(m, gp / "day_right", root, progress=False)
            loc = Localizer(root, m, verify=args.verify)
            for img in photos:  # the database's maps into the verifier's cache, and a warm model
                timed(loc, img, True)
            ms = {True: [], False: []}
            for r in range(args.repeats):
                for i, img in enumerate(photos):
                    answers = {}
                    for way in ((True, False) if (i + r) % 2 else (False, True)):
                        t, answers[way] = timed(loc, img, way)
                        ms[way].append(t)
                    a, b = answers[True], answers[False]
                    if a.matches != b.matches or a.decision["verification"] != b.decision["verification"]:
                        sys.exit(f"{name}: query {i}: one pass and two passes disagree")
            one, two = float(np.median(ms[True])), float(np.median(ms[False]))
            res["rows"][name] = {"features": loc.verifier.kind, "ms_one_pass": one, "ms_two_passes": two,
                                 "ratio": one / two}
            print(name, res["rows"][name], flush=True)
    results = ROOT / "benchmarks" / "results"
    write_json(results / "verify_latency.json", res)
    lines = ["# A verified query end to end: its local features from the descriptor's pass or from their own "
             "(`python benchmarks/verify_latency.py`)", "",
             f"Default model, index Gardens Point day_right 0-99, {len(photos)} night_right queries x {args.repeats}, "
             f"--verify {args.verify}, one thread (edgevpr's policy), database maps cached; same answers both ways "
             "(checked). Median ms per query (embed, search, verification, decision).", "",
             "| model | features | one pass ms | two passes ms | ratio |", "|---|---|---:|---:|---:|"]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['features']} | {r['ms_one_pass']:.1f} | {r['ms_two_passes']:.1f} | "
                     f"{r['ratio']:.2f} |")
    write_text(results / "verify_latency.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
