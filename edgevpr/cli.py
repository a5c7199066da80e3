"""``edgevpr`` command line: one sub-command per stage, each a thin layer over ``edgevpr.api``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__

GARDENS_POINT_SETS = (("night_right", "day_right"), ("day_left", "day_right"))


def _datasets(args) -> list:
    from .data.datasets import open_dataset
    from .data.fetch import gardens_point_root

    if args.dataset == "gardens_point":
        root = gardens_point_root()
        tol = 2 if args.aligned is None else args.aligned
        return [open_dataset(root / db, root / q, aligned_tolerance=tol, frames=args.frames)
                for q, db in GARDENS_POINT_SETS]
    if not args.db or not args.queries:
        raise ValueError("give --db and --queries (or --dataset gardens_point)")
    return [open_dataset(args.db, q, aligned_tolerance=args.aligned, radius=args.radius, gt_file=args.gt,
                         drop_dark=args.drop_dark, frames=args.frames) for q in args.queries]


def _knobs(args) -> dict[str, float]:
    knobs = {}
    for item in args.knob or []:
        name, sep, value = item.partition("=")
        try:
            knobs[name] = float(value)
        except ValueError:
            raise ValueError(f"--knob {item}: expected NAME=NUMBER, e.g. sparsity=0.4") from None
        if not sep:
            raise ValueError(f"--knob {item}: expected NAME=NUMBER, e.g. sparsity=0.4")
    if args.sparsity is not None:
        knobs["sparsity"] = args.sparsity
    return knobs


def _frames(text: str) -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frames '{text}' is not START:STOP (e.g. 70:100)") from None
    return start, stop


def cmd_eval(args) -> int:
    from .api import EvalConf, evaluate
    from .eval.report import results_table
    from .models.model import load_model
    from .utils import pick_device

    datasets = _datasets(args)
    device = pick_device(args.device)
    model = load_model(args.model, device)
    if args.int8:
        from .compress.ternary import TernaryLinear, to_int8

        if not any(isinstance(m, TernaryLinear) for m in model.modules()):
            raise ValueError(f"--int8: model {model.name} has no ternary layers")
        to_int8(model)
    conf = EvalConf(batch_size=args.batch_size, num_workers=args.workers, skip_bad=args.skip_bad,
                    cache_dir=None if args.no_cache else args.cache_dir, top_k=args.top_k, plot=args.plot,
                    show_failures=args.show_failures, efficiency=not args.no_efficiency,
                    image_size=tuple(args.image_size * (2 if len(args.image_size) == 1 else 1))[:2]
                    if args.image_size else None, progress=not args.quiet, knobs=_knobs(args) or None)
    out = Path(args.out or Path("outputs") / "eval" / model.name.replace("/", "_"))
    results = evaluate(model, datasets, conf, out, device)
    for name, r in results["datasets"].items():
        if r["failed_images"]:
            print(f"skipped {len(r['failed_images'])} unreadable image(s) in {name}:", file=sys.stderr)
            for f in r["failed_images"]:
                print(f"  {f['path']}: {f['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(results_table(results))
        print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def cmd_build(args) -> int:
    from .api import images_of, init_netvlad
    from .models.model import load_model, save_model
    from .utils import seed_everything

    seed_everything(args.seed)
    model = load_model(args.model)
    if args.init_images:
        init_netvlad(model, images_of(args.init_images), seed=args.seed)
    save_model(model, args.out)
    print(f"saved {model.name} ({model.out_dim}-D, fingerprint {model.fingerprint()}) to {args.out}")
    return 0


def cmd_train(args) -> int:
    from .train.loop import load_config, train

    conf = load_config(args.config, args.set or [])
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    result = train(conf, out, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
        print(f"run folder: {out} (final model: {out / 'final'}, best on validation: {out / 'best'})")
    return 0


def cmd_models(args) -> int:
    from .models import AGGREGATORS, BACKBONES, preset_names

    print("named models: " + ", ".join(preset_names()))
    print("backbones:    " + ", ".join(BACKBONES.names()))
    print("aggregators:  " + ", ".join(AGGREGATORS.names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .eval.extract import default_cache_dir

    p = argparse.ArgumentParser(prog="edgevpr", description="Visual place recognition for the edge.")
    p.add_argument("--version", action="version", version=f"edgevpr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="Recall@N, PR curve and efficiency of a model on datasets")
    e.add_argument("--model", default="effnet-lite0-gem", help="named model, config file or saved model folder")
    e.add_argument("--dataset", choices=["gardens_point"], help="a known benchmark (from EDGEVPR_DATA or downloaded)")
    e.add_argument("--db", help="database folder or CSV manifest")
    e.add_argument("--queries", action="append", help="query folder or CSV manifest (repeat for several sets)")
    gt = e.add_mutually_exclusive_group()
    gt.add_argument("--aligned", type=int, metavar="K", help="aligned traversals, positives within +-K frames")
    gt.add_argument("--gt", help="VPR-Bench ground_truth_new.npy")
    e.add_argument("--frames", type=_frames, metavar="START:STOP",
                   help="aligned traversals: evaluate places START..STOP-1 only (e.g. places held out of training)")
    e.add_argument("--radius", type=float, default=25.0, help="positive radius in metres (UTM names, CSV)")
    e.add_argument("--drop-dark", type=float, metavar="LEVEL", help="drop frames darker than LEVEL (0-255 mean)")
    e.add_argument("--skip-bad", action="store_true", help="skip and report unreadable images instead of stopping")
    e.add_argument("--image-size", type=int, nargs="+", metavar="PX", help="override the model's input size (H [W])")
    e.add_argument("--sparsity", type=float, help="TAT-VPR activation sparsity of ternary models (0-1)")
    e.add_argument("--int8", action="store_true", help="run a ternary model's layers as int8 GEMMs (faster on CPU)")
    e.add_argument("--knob", action="append", metavar="NAME=VALUE", help="any runtime knob of the model (repeat)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    e.add_argument("--out", help="output folder (default outputs/eval/<model>)")
    e.add_argument("--cache-dir", default=str(default_cache_dir()), help="descriptor cache (EDGEVPR_CACHE)")
    e.add_argument("--no-cache", action="store_true", help="do not read or write the descriptor cache")
    e.add_argument("--top-k", type=int, default=20, help="matches per query in the CSV")
    e.add_argument("--plot", action="store_true", help="write recall@N and PR curves as PNG")
    e.add_argument("--show-failures", type=int, default=0, metavar="N", help="PNG grid of the first N wrong queries")
    e.add_argument("--no-efficiency", action="store_true", help="skip latency/FLOPs/memory measurement")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("build", help="build a model from a named config, initialise data-dependent parts, save it")
    b.add_argument("--model", required=True)
    b.add_argument("--init-images", help="folder or CSV of images for NetVLAD k-means initialisation")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_build)

    t = sub.add_parser("train", help="train a model on places (P x K batches, Multi-Similarity)")
    t.add_argument("--config", required=True, help="YAML training config (see configs/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config entry, e.g. steps=200")
    t.add_argument("--out", help="run folder (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("models", help="list named models, backbones and aggregators")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("edgevpr: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        if os.environ.get("EDGEVPR_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"edgevpr: error: {str(msg).splitlines()[0] if str(msg) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
