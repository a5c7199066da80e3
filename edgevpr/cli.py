"""``edgevpr`` command line: one sub-command per stage, each a thin layer over ``edgevpr.api``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from . import __version__, threads

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


def _image_size(args) -> tuple[int, int] | None:
    """--image-size H [W] -> (H, W) (one value: square), or None for the model's own size."""
    if not args.image_size:
        return None
    from .models.model import check_image_size

    if len(args.image_size) > 2:
        raise ValueError(f"--image-size {' '.join(map(str, args.image_size))}: give H or H W")
    return check_image_size(list(args.image_size * (2 if len(args.image_size) == 1 else 1)), "--image-size")


def _bounded(low: int, high: int):
    """argparse type: an integer in [low, high] (a clear one-line error otherwise)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"{v} is outside [{low}, {high}]")
        return v

    return parse


def _real(low: float, high: float, low_open: bool = False):
    """argparse type: a finite number in [low, high] ((low, high] with ``low_open``); nan, inf and numbers outside
    are refused by name at parse time."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(v) or v < low or v > high or (low_open and v == low):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{low:g}, {high:g}]")
        return v

    return parse


def _frames(text: str) -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frames '{text}' is not START:STOP (e.g. 70:100)") from None
    return start, stop


def cmd_eval(args) -> int:
    from .api import EvalConf, evaluate
    from .deploy.localize import open_model
    from .eval.report import results_table
    from .integrity import warn
    from .models.model import untrained_head
    from .utils import pick_device

    datasets = _datasets(args)
    device = pick_device(args.device)
    model = open_model(args.model, device, args.int8)
    if not hasattr(model, "session") and untrained_head(model):
        warn(f"model {model.name} runs an untrained {model.config['aggregator']['name']} head (backbone-only weights): "
             "its recall says nothing about the method; use a published model (`edgevpr models`) or train it first")
    conf = EvalConf(batch_size=args.batch_size, num_workers=args.workers, skip_bad=args.skip_bad,
                    cache_dir=None if args.no_cache else args.cache_dir, top_k=args.top_k, plot=args.plot,
                    show_failures=args.show_failures, efficiency=not args.no_efficiency,
                    image_size=_image_size(args), progress=not args.quiet, sequence=args.sequence, verify=args.verify,
                    verify_with=args.verify_with,
                    knobs=_knobs(args) or getattr(model, "baked_knobs", None) or None)
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
    result = train(conf, out, resume=args.resume, progress=not args.quiet, allow_change=tuple(args.allow_change or ()))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
        print(f"run folder: {out} (final model: {out / 'final'}, best on validation: {out / 'best'})")
    return 0


def _print_matches(matches: list, check: dict | None = None) -> None:
    """The top-k table; with a verification record (``check``) an inliers column (the order is the verified one,
    so scores need not fall) and a line on what verification did."""
    verified = bool(check and check.get("verified"))
    print(f"  {'rank':>4}  {'score':>6}  " + ("inliers  " if verified else "") +
          f"{'place':>8}  {'lat, lon / east, north':>26}  path")
    for m in matches:
        if m.lat is not None:
            where = f"{m.lat:.6f}, {m.lon:.6f}"
        elif m.east is not None:
            where = f"{m.east:.1f}, {m.north:.1f}"
        else:
            where = "-"
        inl = (f"{m.inliers:>7}  " if m.inliers is not None else f"{'-':>7}  ") if verified else ""
        print(f"  {m.rank:>4}  {m.score:6.3f}  {inl}{m.place_id or '-':>8}  {where:>26}  {m.path}")
    if verified:
        print(f"  verified on {check['features']} over {check['candidates']} candidates: top-1 "
              f"{'moved' if check['moved'] else 'kept'} (order by similarity + inliers)")
    elif check:
        print(f"  not verified: {check['reason']}")


def _print_answer(photo: str, answer, ms: float) -> None:
    """One answer for people: the headline first (the sequence answer when a sequence is on), then the single
    frame's matches and decision."""
    print(f"{photo}  ({ms:.0f} ms read to answer)")
    check = answer.decision.get("verification")
    if answer.sequence is None:
        _print_matches(answer.matches, check)
        print(_decision_line(answer.decision))
        return
    sq, m = answer.sequence, answer.sequence["match"]
    warm = f"warming up, {sq['frames']} of {sq['length']} frames" if sq["decision"]["warming_up"] else \
        f"{sq['frames']} frame{'s' if sq['frames'] != 1 else ''}"
    print(f"  sequence answer ({sq['method']}, {warm}): {m['path']}" + (f" (place {m['place_id']})"
                                                                          if m["place_id"] else ""))
    print(_decision_line(sq["decision"]))
    print("  single frame:")
    _print_matches(answer.matches, check)
    print(_decision_line(answer.decision, "single-frame decision"))


def _when(unix: float | None) -> str:
    """Unix seconds -> ISO 8601 UTC to the second ("-" for none)."""
    import datetime

    return "-" if unix is None else datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _where_images(manifest: dict) -> str:
    r = manifest.get("image_root")
    if not r:
        return "all inside the index folder (the map travels with them)"
    moved = f", relocated to {r['now']}" if r.get("now") else ""
    return f"outside the index folder under {r['stored']}{moved} (`index relocate` moves them)"


def _index_table(root, manifest: dict, sessions: list[dict], shape: dict) -> str:
    """``index info`` for people: the model, the search, the files, the calibrations and a table of sessions."""
    from .deploy.decision import KNOWN_FLOOR

    m = manifest.get("model", {})
    size = "x".join(str(s) for s in m.get("image_size", [])) or "?"
    files = ", ".join(f"{name} {f.get('bytes', 0) / 1e6:.1f} MB" for name, f in manifest.get("files", {}).items())
    lines = [f"{root}",
             f"  model        {m.get('name')} (fingerprint {m.get('fingerprint')}, {m.get('runtime', '?')}, "
             f"{manifest.get('dim')}-D, {size} px)",
             f"  search       {manifest.get('kind')}, {manifest.get('count')} images "
             f"({manifest.get('failed_images', 0)} unreadable), generation {manifest.get('generation', 1)}",
             f"  written      created {manifest.get('created', '-')}, updated {manifest.get('updated', '-')}",
             f"  files        {files or '-'} (sizes and changed files checked; --verify reads every byte)",
             f"  sequences    normalised by {shape['normalisation']} (route coherence {shape['coherence']:.2f}; "
             "chosen by the map)",
             f"  images       {_where_images(manifest)}"]
    for kind, rec in manifest.get("local_features", {}).items():
        lines.append(f"  verification {kind} features of {rec.get('images')} images kept "
                     f"({rec.get('bytes', 0) / 2**20:.1f} MB; --verify-with reads them)")
    for key, label in (("calibration", "single frames"), ("sequence_calibration", "sequences")):
        c = manifest.get(key)
        if isinstance(c, dict) and c.get("kind") == "logistic":
            extra = f", L = {c.get('sequence_length')} {c.get('sequence_method')}" if key != "calibration" else ""
            lines.append(f"  calibrated   {label}: known from P {max(c.get('threshold', 0), KNOWN_FLOOR):.2f} "
                         f"(target precision {c.get('target_precision', 0):.2f}, {c.get('queries', '?')} "
                         f"answers{extra})")
    if not any(k in manifest for k in ("calibration", "sequence_calibration")):
        lines.append("  calibrated   no (run `edgevpr calibrate`: answers have no P until then)")
    lines += ["", "| session | images | with coordinates | route | first capture | last capture |",
              "|---|---:|---:|---:|---|---|"]
    for s in sessions:
        route = "-" if s["route_m"] is None else f"{s['route_m']:,.0f} m"
        lines.append(f"| {s['session']} | {s['images']} | {s['with_coordinates']} | {route} | "
                     f"{_when(s['first_time'])} | {_when(s['last_time'])} |")
    return "\n".join(lines)


def cmd_index(args) -> int:
    from .deploy import index as idx
    from .deploy.localize import open_model

    if args.action == "tune":
        queries = None
        if args.queries:
            from .deploy.inputs import Stream
            from .deploy.localize import Localizer

            loc = Localizer(args.index, device=args.device)
            queries = [loc.embed([f.image])[0] for f in Stream(args.queries)]
        rec = idx.tune(args.index, args.target, args.sample, args.seed, progress=not args.quiet, queries=queries)
        best = rec["chosen"]
        chosen = ", ".join(f"{k} {v}" for k, v in best.items() if k not in ("agreement", "ms_per_query"))
        note = "" if rec["reached"] else f" (target {args.target} not reached: the most accurate setting)"
        print(json.dumps(rec, indent=2) if args.json else
              f"{args.index}: {chosen}: top-1 agreement {best['agreement']:.3f} with exact search on "
              f"{rec['queries']} at {best['ms_per_query']:.2f} ms/query{note}")
        return 0
    if args.action == "info":
        if args.verify:
            report = idx.verify_index(args.index)
            print(json.dumps(report, indent=2))
            return 0 if report["verified"] else 1
        pi = idx.PlaceIndex.open(args.index, mmap=True)
        sessions = pi.sessions()
        if args.plot:
            from .deploy.coverage import coverage_plot

            coverage_plot(pi, Path(args.plot))
        if args.json:
            print(json.dumps({**pi.manifest, "sessions": sessions,
                              "checked": "sizes, and sha256 of files changed since their last full check (--verify "
                                         "reads every byte)", **({"plot": args.plot} if args.plot else {})},
                             indent=2))
        else:
            shape = pi.route_shape()
            print(_index_table(args.index, pi.manifest, sessions, shape) +
                  (f"\ncoverage plot: {args.plot}" if args.plot else ""))
        return 0
    if args.action == "snapshot":
        if args.manifest:
            from .utils import write_json

            write_json(args.out, idx.snapshot_manifest(args.index))
            print(f"{args.out}: the snapshot manifest of {args.index}'s shard (send it for a partial snapshot)")
            return 0
        since = None
        if args.since:
            try:
                since = json.loads(Path(args.since).read_text())
            except (OSError, ValueError, RecursionError) as e:
                raise ValueError(f"{args.since}: not a readable snapshot manifest ({str(e)[:200]})") from None
            try:
                idx.check_snapshot_manifest(since)
            except ValueError as e:
                raise ValueError(f"{args.since}: {e}") from None
        res = idx.snapshot(args.index, args.out, since)
        print(json.dumps(res, indent=2) if args.json else
              f"{args.out}: {'partial' if res['partial'] else 'full'} snapshot of {res['count']} images, "
              f"{res['segments']} segments, {res['files']} files sent, {res['bytes'] / 1e6:.1f} MB")
        return 0
    if args.action == "pull":
        record = None
        if args.model:
            record = idx.model_record(open_model(args.model, device="cpu"), args.model, None)
        res = idx.pull(args.index, args.source, record)
        print(json.dumps(res, indent=2) if args.json else
              f"{args.index}: {res['count']} images from a {'partial' if res['partial'] else 'full'} snapshot")
        return 0
    if args.action == "remove":
        res = idx.remove(args.index, args.session, args.paths)
        print(json.dumps(res, indent=2) if args.json else
              f"{args.index}: {res['removed']} images removed, {res['count']} left; {res['files_deleted']} file(s) "
              "the map owned (recorded frames, their manifests) deleted")
        return 0
    if args.action == "relocate":
        res = idx.relocate(args.index, args.root)
        print(json.dumps(res, indent=2) if args.json else
              f"{args.index}: its {res['images']} images outside the index folder are now read from {res['root']} "
              "(every one found there)")
        return 0
    if args.action == "features":
        return _index_features(args.index, args.with_, args.max_keypoints, args.max_side, args.max_mb, args.quiet,
                               args.json)
    if args.action == "merge":
        res = idx.merge(args.parts, args.out, args.kind, _index_params(args))
        print(json.dumps(res, indent=2) if args.json else
              f"{args.out}: {res['count']} images from {res['parts']} parts ({res['failed']} unreadable recorded)")
        return 0
    device = args.device
    args.images = _recorded(args, Path(args.out if args.action == "build" else args.index))
    if args.action == "build":
        model = open_model(args.model, device, args.int8)
        knobs = _knobs(args) or getattr(model, "baked_knobs", {})
        spec = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
        res = idx.build(model, args.images, args.out, args.kind, spec, knobs, args.batch_size, args.skip_bad,
                        _index_params(args), progress=not args.quiet, shard=args.shard)
        where = args.out
    else:
        man = json.loads((Path(args.index) / idx.MANIFEST_FILE).read_text()) \
            if (Path(args.index) / idx.MANIFEST_FILE).is_file() else {}
        spec = args.model or man.get("model", {}).get("spec")
        if not spec:
            raise ValueError(f"{args.index}: give --model (the index records none)")
        model = open_model(spec, device, args.int8)
        res = idx.add(model, args.images, args.index, args.batch_size, args.skip_bad, progress=not args.quiet)
        where = args.index
    for path, reason in res.pop("failed_paths"):
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(json.dumps(res, indent=2) if args.json else
          f"{where}: {res['count']} images indexed ({res['added']} new, {res['already_stored']} already there, "
          f"{res['failed']} unreadable)")
    if getattr(args, "local_features", None):
        return _index_features(where, args.local_features, 1024, 640, 4096.0, args.quiet, args.json)
    return 0


def _index_features(index: str, kind: str, max_keypoints: int, max_side: int, max_mb: float, quiet: bool,
                    as_json: bool) -> int:
    """``index features`` (and ``index build --local-features``): the database's learned features, stored."""
    from .deploy import index as idx
    from .deploy.learned import LearnedLocal

    learned = LearnedLocal(kind, max_keypoints, max_side)
    res = idx.store_local_features(index, learned.key, learned.extract, max_mb, progress=not quiet)
    print(json.dumps({**res, "kind": learned.key, "provenance": learned.provenance}, indent=2) if as_json else
          f"{index}: local features {learned.key} of {res['images']} images kept ({res['stored']} new, "
          f"{res['mb']:.1f} MB; {res['skipped_over_budget']} over --max-mb, {res['unreadable']} unreadable)")
    return 0


def _recorded(args, index: Path) -> str:
    """``--images`` as index build/add should read it: a video with ``--track``, or a folder of photos with EXIF
    GPS, becomes a manifest (frames extracted) under INDEX/recordings/; anything else is used as given."""
    from .deploy import recordings as rec
    from .deploy.bags import MAX_FIX_STD_M, is_bag
    from .deploy.inputs import VIDEO_EXTS

    src = Path(args.images)
    if is_bag(src):
        if not (args.image_topic and args.gnss_topic):
            raise ValueError(f"{src}: a ROS bag becomes a map from its camera and its GNSS: give --image-topic and "
                             "--gnss-topic (sensor_msgs/NavSatFix)")
        manifest, report = rec.manifest_from_bag(src, args.image_topic, args.gnss_topic, index / "recordings",
                                                 args.every)
        print(f"{src}: {report['kept']} of {report['frames']} frames of {args.image_topic} kept (every {args.every}; "
              f"{report['outside_track']} outside the fixes; {report['fixes']} fixes of {args.gnss_topic}, "
              f"{report['skipped_no_fix']} without a fix, {report['skipped_imprecise']} less precise than "
              f"{MAX_FIX_STD_M:g} m and {report['skipped_bad']} out of range skipped)",
              file=sys.stderr)
        return str(manifest)
    if not args.track and src.suffix.lower() in VIDEO_EXTS and src.is_file():
        raise ValueError(f"{src}: a video needs its GNSS track to become a map: add --track FILE (GPX, NMEA 0183 "
                         "or CSV of time,lat,lon)")
    if args.track:
        if src.suffix.lower() not in VIDEO_EXTS or not src.is_file():
            raise ValueError(f"--track {args.track}: --images must be a video file ({', '.join(VIDEO_EXTS)}), not "
                             f"{src}")
        manifest, report = rec.manifest_from_video(src, rec.read_track(args.track), index / "recordings",
                                                   args.every, args.track_offset)
        print(f"{src}: {report['kept']} of {report['frames_decoded']} frames kept (every {args.every}; "
              f"{report['outside_track']} outside the track; video time from {report['start_from']})",
              file=sys.stderr)
        return str(manifest)
    if src.is_dir() and not rec.looks_like_utm_names(src):
        try:
            manifest, report = rec.manifest_from_photos(src, index / "recordings" / f"{src.name}.csv",
                                                        args.require_gps, args.min_spacing)
        except rec.NoGps:
            if args.require_gps:
                raise
            return args.images
        for p in report["without_gps"][:5]:
            print(f"no EXIF GPS position: {p}" + ("" if args.require_gps else " (indexed without coordinates)"),
                  file=sys.stderr)
        print(f"{src}: {report['with_gps']} of {report['photos']} photos with an EXIF GPS position, "
              f"{report['indexed']} indexed ({report['skipped_close']} closer than --min-spacing)", file=sys.stderr)
        return str(manifest)
    return args.images


def _prior(args):
    from .deploy.decision import GeoPrior

    if args.prior and args.prior_utm:
        raise ValueError("give --prior or --prior-utm, not both")
    return GeoPrior.parse(args.prior) if args.prior else GeoPrior.parse(args.prior_utm, utm=True) \
        if args.prior_utm else None


def _decision_line(d: dict, label: str = "decision") -> str:
    """One decision, worded so that the word and its P cannot contradict: "known place, P 0.93 (known from P 0.90)"
    or "not recognised, best guess P 0.12 (...)"; a position only for an answer that is not rejected."""
    pos = d.get("position")
    where = "" if pos is None else (f" at {pos['lat']:.6f}, {pos['lon']:.6f}" if "lat" in pos else
                                    f" at E {pos['east']:.1f} N {pos['north']:.1f}") + f" (+-{pos['spread_m']:.0f} m)"
    p = d.get("confidence")
    known_from = f" (known from P {d['threshold']:.2f})" if d.get("threshold") is not None else ""
    if d.get("warming_up"):
        state = "warming up, not known until the sequence has its L frames"
    elif d.get("known"):
        state = f"known place, P {p:.2f}{known_from}"
    elif d.get("known") is False or d.get("reason"):
        why = f" ({d['reason']})" if d.get("reason") else ""
        state = f"not recognised{why}" + (f", best guess P {p:.2f}{known_from}" if p is not None else "")
    else:
        state = "uncalibrated (run `edgevpr calibrate`)"
    margin = f", margin {d['score']:.3f}" if d.get("score") is not None else ""
    return f"  {label}: {state}{margin}{where}"


def _index_params(args) -> dict:
    """The FAISS settings given on the command line (build, merge)."""
    if (args.dim is not None or args.storage not in (None, "float32")) and args.kind != "flat":
        raise ValueError("--dim and --storage apply to --kind flat (exact search over compact descriptors)")
    return {k: v for k, v in (("nlist", args.nlist), ("pq_m", args.pq_m), ("nprobe", args.nprobe),
                              ("rerank", args.rerank), ("hnsw_m", args.hnsw_m), ("ef_search", args.ef_search),
                              ("pca_dim", args.dim), ("storage", args.storage), ("url", args.qdrant_url),
                              ("collection", args.collection), ("shard_number", args.qdrant_shards),
                              ("replication_factor", args.qdrant_replicas)) if v is not None}


def _shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"'{text}': expected I/N with 0 <= I < N, e.g. 0/4")
    return int(i), int(n)


def _compact_line(a) -> str:
    """One answer on one line for people: frame, the headline decision and its P, the place, latency."""
    h = a.headline()
    d, m = h["decision"], h["match"]
    clock = f" t={a.time:.2f}s" if a.time is not None else ""
    where = "" if m is None else f" -> {Path(m['path']).name}" + (f" (place {m['place_id']})" if m["place_id"] else "")
    pos = d.get("position")
    at = "" if pos is None else f" at {pos['lat']:.6f},{pos['lon']:.6f}" if "lat" in pos else \
        f" at E{pos['east']:.1f} N{pos['north']:.1f}"
    state = _decision_line(d, h["source"]).split(": ", 1)[1].split(", margin")[0].split(" at ")[0]
    return f"{a.name}{clock}  {state}{where}{at}  [{a.ms:.0f} ms]"


def cmd_localize(args) -> int:
    from .deploy.inputs import Stream
    from .deploy.localize import SCHEMA_VERSION, Localizer
    from .deploy.pipeline import latency_percentiles

    if sum(map(bool, (args.json, args.json_lines, args.compact))) > 1:
        raise ValueError("give one of --json, --json-lines and --compact")
    loc = Localizer(args.index, args.model, mmap=not args.no_mmap, device=args.device, verify=args.verify,
                    verify_with=args.verify_with, verify_below=_gate(args),
                    exclude_sessions=args.exclude_session)
    stream = Stream(args.photos, args.stride, args.skip_bad, timeout=args.stream_timeout, topic=args.image_topic)
    # --live on a file is a replay at the file's own clock (a camera's frames do not all arrive at once)
    realtime = args.realtime or (args.live and not stream.live)
    loop = loc.stream(stream, args.top_k, _knobs(args) or None, _prior(args), args.sequence, args.sequence_method,
                      live=True if args.live else None, max_fps=args.max_fps, realtime=realtime)
    results, ms = [], []
    for answer in loop:
        ms.append(answer.ms)
        if args.json_lines:  # one object per frame, out as soon as its decision exists
            print(json.dumps(answer.to_record(), default=str), flush=True)
        elif args.json:
            results.append(answer.to_record())
        elif args.compact:
            print(_compact_line(answer), flush=True)
        else:
            _print_answer(answer.name, answer, answer.ms)
    for path, reason in stream.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not ms:
        raise ValueError("no frame could be localized" + (" (every input was skipped)" if stream.skipped else ""))
    st = loop.stats
    if st.dropped or st.skipped_fps:
        print(f"dropped {st.dropped} frame(s) the loop could not keep up with (live source; first: "
              f"{', '.join(st.dropped_names[:3]) or '-'}) and skipped {st.skipped_fps} over --max-fps",
              file=sys.stderr)
    summary = {"schema_version": SCHEMA_VERSION, "type": "summary", "model": loc.index.model["name"],
               "fingerprint": loc.index.model["fingerprint"], "latency": latency_percentiles(ms),
               "stream": st.to_dict(), "skipped": [{"path": p, "reason": r} for p, r in stream.skipped]}
    if args.json_lines:
        print(json.dumps(summary), flush=True)
    elif args.json:
        print(json.dumps({**summary, "results": results}, indent=2, default=str))
    elif len(ms) > 1:
        s = latency_percentiles(ms)
        print(f"{s['frames']} frames: p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms "
              "per frame (read to answer)")
    return 0


def cmd_calibrate(args) -> int:
    from .deploy.decision import REJECT_CONFIDENCE, Neighbourhood, require_fitting
    from .deploy.inputs import Stream
    from .deploy.localize import Localizer

    require_fitting()

    if args.hood_m is not None and args.hood_frames is not None:
        raise ValueError("give --hood-m or --hood-frames, not both")
    loc = Localizer(args.index, args.model, device=args.device, verify=args.verify, verify_with=args.verify_with,
                    verify_below=_gate(args))
    hood = Neighbourhood(args.hood_m, None) if args.hood_m is not None else \
        Neighbourhood(None, args.hood_frames) if args.hood_frames is not None else None
    sets = _datasets(args)  # every query set is pooled into one calibration; frames are read as they are used
    # each query set is its own capture sequence (the tracker starts afresh on each)
    frames = (dataclasses.replace(f, sequence=f"set {i}") for i, ds in enumerate(sets)
              for f in Stream(list(ds.q_paths)))
    positives = [{os.path.abspath(ds.db_paths[j]) for j in pos} for ds in sets for pos in ds.positives]
    unknown = Stream(list(args.unknown)) if args.unknown else []
    more = unknown.size() if args.unknown else 0
    cal, seq = loc.calibrate(frames, positives, args.precision, hood, unknown, args.sequence, args.sequence_method,
                             args.reject_unknown, progress=not args.quiet,
                             total=None if more is None else len(positives) + more)
    plot = Path(args.plot) if args.plot else Path(args.index) / "reliability.png"
    wrote = _reliability_plot([(cal, "single frames")] + ([(seq, f"sequences of {args.sequence}")] if seq else []),
                              plot)
    print(f"{cal.queries} queries pooled from {len(sets)} set(s) and {cal.unknown_queries} unknown-place photos")
    frames_what = f"single frames verified (--verify {cal.verify} on {cal.verify_features}; evidence includes the " \
        "inliers)" if cal.verify else "single frames"
    for c, what in ((cal, frames_what), (seq, f"sequences of {args.sequence} ({args.sequence_method})")):
        if c is not None:
            few = "; too few photos to promise the target, so all are rejected: add --unknown photos" \
                if c.unknown_rejected_bound < c.reject_unknown else ""
            rejected = "" if c.unknown_queries == 0 else \
                f", {c.unknown_rejected:.3f} of {c.unknown_queries} unknown-place answers rejected " \
                f"(target {c.reject_unknown}, lower bound at {REJECT_CONFIDENCE:.0%} confidence " \
                f"{c.unknown_rejected_bound:.3f}{few})"
            print(f"  {what}: {c.queries} answers, known from P(right) {c.known_from:.2f}, precision "
                  f"{c.precision:.3f} (target {c.target_precision}) at recall {c.recall:.3f}{rejected}; "
                  f"ECE {c.ece:.3f}, Brier {c.brier:.3f} (on these answers)")
    print(f"written to {loc.index.root}/manifest.json" + (f"; reliability diagram {plot}" if wrote else ""))
    if args.json:
        print(json.dumps({"single_frame": cal.to_dict(), "sequence": seq and seq.to_dict()}, indent=2))
    return 0


def _reliability_plot(cals: list, path: Path) -> bool:
    """A reliability diagram of the calibration answers, one curve per (Calibration, label) (PNG, written
    atomically) -> whether it was written (matplotlib is part of the research install; the runtime install records
    ECE/Brier only)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from .utils import atomic_write

    fig, ax = plt.subplots(figsize=(4.6, 4.6), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
    for (cal, label), colour in zip(cals, ("tab:blue", "tab:green"), strict=False):
        if cal.reliability:
            p, acc, n = (list(c) for c in zip(*cal.reliability, strict=True))
            ax.plot(p, acc, "o-", color=colour, label=f"{label}: ECE {cal.ece:.3f}, Brier {cal.brier:.3f}, "
                                                      f"{cal.queries} answers")
            for x, y, c in zip(p, acc, n, strict=True):
                ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=colour)
        ax.axvline(cal.threshold, color=colour, lw=1, ls=":", label=f"{label}: known at P >= {cal.threshold:.3g}")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(answer right)", ylabel="fraction right",
           title="reliability of the calibration answers")
    ax.legend(loc="upper left", fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True


def cmd_serve(args) -> int:
    import uvicorn

    from .deploy.localize import Localizer
    from .deploy.service import ServiceLimits, create_app

    loc = Localizer(args.index, args.model, device=args.device, verify=args.verify, verify_with=args.verify_with,
                    verify_below=_gate(args))
    app = create_app(loc, ServiceLimits(args.max_upload_mb * 2**20, args.max_pixels, args.max_k, args.max_frames,
                                        args.max_request_pixels, args.concurrency))
    from .integrity import warn

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"--host {args.host}: the service answers anyone who can reach this address, and serves every map image "
             "as a thumbnail (it has no login); put it behind an authenticating proxy on an untrusted network")
    print(f"serving {loc.index.root} ({len(loc.index)} images, model {loc.model.name}) on "
          f"http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_compress(args) -> int:
    from .compress.budget import compress

    r = compress(args.teacher, args.images, args.budget_ms, args.out, queries=args.queries, aligned=args.aligned,
                 radius=args.radius, sizes=tuple(args.sizes), dims=tuple(args.dims), threads=args.threads,
                 holdout=args.holdout, exclude=args.exclude, keep_ratios=tuple(args.keep_ratios),
                 distil_steps=args.distil_steps, distil_sizes=args.distil_sizes, device=args.device,
                 choose_by=args.choose_by, ternary=args.ternary, seed=args.seed, progress=not args.quiet)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    c, t = r["chosen"], r["teacher"]
    print(f"{args.out}/model.onnx: {c['name']}, {c['ms']:.1f} ms (teacher {t['ms']:.1f} ms), {r['metric']} "
          f"{c['accuracy']:.3f} (teacher {t['accuracy']:.3f}), {c['mb']:.1f} MB; report: {args.out}/report.md")
    print(f"deploy: {r['deploy']}")
    return 0


def cmd_export(args) -> int:
    import torch

    from .deploy.export import OnnxModel, export_onnx
    from .models.model import load_model

    model = load_model(args.model)
    knobs = _knobs(args)
    out = export_onnx(model, args.out, knobs=knobs, image_size=_image_size(args), int8=args.int8,
                      calibration=args.calibration, calibration_count=args.calibration_count)
    onnx_model = OnnxModel(out)
    q = onnx_model.meta.get("quantized") or {}
    if q:
        print(f"int8: {q['method']}; quantised ops: " + ", ".join(f"{n} {k}" for k, n in sorted(q["ops"].items())))
    x = torch.randn(4, 3, *onnx_model.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model.eval()(x, **knobs)
    cos = torch.nn.functional.cosine_similarity(ref, onnx_model(x), dim=-1)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {onnx_model.name}, {onnx_model.out_dim}-D, "
          f"{onnx_model.image_size[0]}x{onnx_model.image_size[1]}, knobs {knobs or 'none'}, "
          f"fingerprint {onnx_model.fingerprint()}); cosine to PyTorch on random input: min {float(cos.min()):.6f}")
    return 0


def cmd_models(args) -> int:
    import importlib.util

    from .catalogue import AGGREGATOR_NAMES, BACKBONE_NAMES, IMPORT_FORMATS, preset_config, preset_names, weights_status
    from .published.releases import RELEASES, describe

    torch_here = importlib.util.find_spec("torch") is not None  # named models run on torch; exports (.onnx) do not
    rows = [{"name": n, "weights": weights_status(preset_config(n)), "source": "config (edgevpr/configs/models)"}
            for n in preset_names()]
    rows += [{**describe(n), "weights": "published VPR weights"} for n in RELEASES]
    for r in rows:
        r["runs_here"] = torch_here
    if args.json:
        print(json.dumps({"models": rows, "backbones": list(BACKBONE_NAMES), "aggregators": list(AGGREGATOR_NAMES),
                          "import_formats": list(IMPORT_FORMATS), "torch_installed": torch_here}, indent=2))
        return 0
    if not torch_here:
        print("This install has no torch (edgevpr[runtime]): none of the named models below runs here; export one to "
              ".onnx on a full install (`edgevpr export --model NAME --out m.onnx`) and give --model m.onnx.\n")
    width = max(len(r["name"]) for r in rows)
    print(f"{'named model':<{width}}  runs here  weights")
    for r in rows:
        extra = f" [{r['about']}; {r['licence']}{'; cached' if r.get('cached') else ''}]" if "about" in r else ""
        print(f"{r['name']:<{width}}  {'yes' if torch_here else 'no':<9}  {r['weights']}{extra}")
    print("\nbackbones:      " + ", ".join(BACKBONE_NAMES))
    print("aggregators:    " + ", ".join(AGGREGATOR_NAMES))
    print("import formats: " + ", ".join(IMPORT_FORMATS) + "  (edgevpr import FORMAT CHECKPOINT --out DIR)")
    return 0


def cmd_import(args) -> int:
    from .published import import_checkpoint
    from .published.releases import RELEASES

    release = next(({"url": r.url, "licence": r.licence} for r in RELEASES.values()
                    if r.format == args.format and r.file_name and r.file_name == Path(args.checkpoint).name), None)
    model = import_checkpoint(args.format, args.checkpoint, args.out, release, name=args.name)
    unused = model.config["provenance"]["unused_keys"]
    print(f"imported {args.checkpoint} ({args.format}) -> {args.out}: {model.name}, {model.out_dim}-D, "
          f"{model.image_size[0]}x{model.image_size[1]} px, {len(unused)} upstream key(s) deliberately unused, "
          f"fingerprint {model.fingerprint()}")
    for k, why in unused.items():
        print(f"  unused {k}: {why}")
    return 0


def _knob_flags(a: argparse.ArgumentParser) -> None:
    a.add_argument("--sparsity", type=_real(0, 1), help="TAT-VPR activation sparsity of ternary models (0-1)")
    a.add_argument("--knob", action="append", metavar="NAME=VALUE",
                   help="a runtime knob of the model, e.g. keep_ratio=0.5 (repeat)")


class _Formatter(argparse.HelpFormatter):
    """Every option's help ends with its default (``off`` for flags, ``none`` when unset), unless it says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS or \
                "default" in text or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        d = action.default
        if isinstance(action, argparse._StoreConstAction) and d is None:
            d = False
        shown = "off" if d is False else "on" if d is True else "none" if d is None else \
            " ".join(map(str, d)) if isinstance(d, list) else str(d)
        return f"{text} (default: {shown})".strip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


#: One example per sub-command, shown at the end of its --help.
EXAMPLES = {
    "eval": "edgevpr eval --model effnet-lite0-gem --db day_right/ --queries night_right/ --aligned 2",
    "train": "edgevpr train --config configs/cpu-gp-nordland.yaml --out runs/gp-nordland",
    "build": "edgevpr build --model configs/my-netvlad.yaml --init-images db/ --out models/netvlad",
    "index": "edgevpr index build --model effnet-lite0-gem --images db/ --out my.index",
    "index build": "edgevpr index build --model m.onnx --images db/ --out my.index --kind flat",
    "index add": "edgevpr index add --index my.index --images more_db/",
    "index info": "edgevpr index info my.index --verify",
    "index remove": "edgevpr index remove --index my.index --session drive2",
    "index relocate": "edgevpr index relocate --index my.index --root /mnt/photos",
    "index features": "edgevpr index features --index my.index --with aliked",
    "index snapshot": "edgevpr index snapshot --index map.index --out map.snapshot",
    "index pull": "edgevpr index pull --index robot.index map.snapshot",
    "index tune": "edgevpr index tune --index my.index --target 0.95",
    "index merge": "edgevpr index merge part0.index part1.index --out my.index --kind ivfpq",
    "localize": "edgevpr localize --index my.index drive.mp4 --stride 15 --sequence 10 --prior=-27.47,153.03,200",
    "calibrate": "edgevpr calibrate --index my.index --db day_right/ --queries night_right/ --aligned 2 "
                 "--precision 0.95",
    "serve": "edgevpr serve --index my.index --port 8000",
    "export": "edgevpr export --model effnet-lite0-gem --out m.onnx --int8 --calibration db/",
    "compress": "edgevpr compress --teacher effnet-lite0-gem --images map/ --budget-ms 10 --out small/",
    "models": "edgevpr models --json",
    "import": "edgevpr import salad dino_salad.ckpt --out models/dinov2-salad",
}


def _gate(args) -> float | None:
    """``--verify-below``, refused without ``--verify``."""
    if args.verify_below is not None and not args.verify:
        raise ValueError("--verify-below needs --verify K (it gates verification)")
    return args.verify_below


def _verify_with_flag(p: argparse.ArgumentParser, gate: bool = True) -> None:
    p.add_argument("--verify-with", choices=["auto", "sift", "tokens", "aliked", "disk"], default="auto",
                   help="--verify's local features: the model's own (tokens: a torch ViT's patch tokens, a CNN's "
                        "stride-16 feature map, in torch or its ONNX export), SIFT (sift), learned keypoints matched "
                        "by LightGlue (aliked, disk: edgevpr[learned], torch; best at night and across seasons), or "
                        "tokens when the model has them, else SIFT (a ViT's ONNX export, SeqSLAM pixels) "
                        "(default auto)")
    if gate:
        p.add_argument("--verify-below", type=float, default=None, metavar="Z",
                       help="verify only answers whose unverified margin_z is below Z, so a stream pays for "
                            "verification on the frames that need it (default: verify every answer; the level "
                            "chosen on validation per verifier: benchmarks/results/verification_learned.md)")


def build_parser() -> argparse.ArgumentParser:
    from .utils import default_cache_dir

    p = _Parser(prog="edgevpr", description="Visual place recognition for the edge.")
    p.add_argument("--version", action="version", version=f"edgevpr {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("eval", help="Recall@N, PR curve and efficiency of a model on datasets")
    e.add_argument("--model", default="effnet-lite0-gem",
                   help="named model, config file, saved model folder, or an exported .onnx file (onnxruntime)")
    e.add_argument("--dataset", choices=["gardens_point"], help="a known benchmark (from EDGEVPR_DATA or downloaded)")
    e.add_argument("--db", help="database folder or CSV manifest")
    e.add_argument("--queries", action="append", help="query folder or CSV manifest (repeat for several sets)")
    gt = e.add_mutually_exclusive_group()
    gt.add_argument("--aligned", type=int, metavar="K", help="aligned traversals, positives within +-K frames")
    gt.add_argument("--gt", help="VPR-Bench ground_truth_new.npy")
    e.add_argument("--frames", type=_frames, metavar="START:STOP",
                   help="aligned traversals: evaluate places START..STOP-1 only (e.g. places held out of training)")
    e.add_argument("--radius", type=_real(0, 1e6, low_open=True), default=25.0,
                    help="positive radius in metres (UTM names, CSV; default 25)")
    e.add_argument("--drop-dark", type=_real(0, 255), metavar="LEVEL",
                    help="drop frames darker than LEVEL (0-255 mean; default: keep all)")
    e.add_argument("--skip-bad", action="store_true", help="skip and report unreadable images instead of stopping")
    e.add_argument("--image-size", type=int, nargs="+", metavar="PX", help="override the model's input size (H [W])")
    e.add_argument("--int8", action="store_true", help="run a ternary model's layers as int8 GEMMs (faster on CPU)")
    _knob_flags(e)
    e.add_argument("--batch-size", type=_bounded(1, 4096), default=32, help="images per forward (default 32)")
    e.add_argument("--workers", type=_bounded(0, 256), default=0, help="image-loading worker processes (default 0)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    e.add_argument("--out", help="output folder (default outputs/eval/<model>)")
    e.add_argument("--cache-dir", default=str(default_cache_dir()), help="descriptor cache (EDGEVPR_CACHE)")
    e.add_argument("--no-cache", action="store_true", help="do not read or write the descriptor cache")
    e.add_argument("--sequence", type=_bounded(0, 1000), default=0, metavar="L",
                   help="also match sequences of L query frames (SeqSLAM-style; queries in capture order); 0: off")
    e.add_argument("--verify", type=_bounded(0, 1000), default=0, metavar="K",
                   help="re-rank each query's top K candidates by geometric verification (local features + "
                        "MAGSAC++, as localize --verify); recall is then the verified one, beside the unverified "
                        "(default 0: off)")
    _verify_with_flag(e, gate=False)
    e.add_argument("--top-k", type=_bounded(1, 1000), default=20, help="matches per query in the CSV (default 20)")
    e.add_argument("--plot", action="store_true", help="write recall@N and PR curves as PNG")
    e.add_argument("--show-failures", type=_bounded(0, 1000), default=0, metavar="N",
                   help="PNG grid of the N clearest failures: largest score gap between the wrong top-1 and the "
                        "best-ranked correct match (default 0: none)")
    e.add_argument("--no-efficiency", action="store_true", help="skip latency/FLOPs/memory measurement")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("build", help="build a model from a named config, initialise data-dependent parts, save it")
    b.add_argument("--model", required=True, help="named model or config file to build")
    b.add_argument("--init-images", help="folder or CSV of images for NetVLAD k-means initialisation")
    b.add_argument("--out", required=True, help="model folder to write (config.json + model.safetensors)")
    b.add_argument("--seed", type=int, default=0, help="seed of the k-means initialisation")
    b.set_defaults(func=cmd_build)

    t = sub.add_parser("train", help="train a model on places (P x K batches, Multi-Similarity)")
    t.add_argument("--config", required=True, help="YAML training config (see configs/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config entry, e.g. steps=200")
    t.add_argument("--out", help="run folder (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint; a "
                   "config that differs from the run's own is refused (default: off)")
    t.add_argument("--allow-change", action="append", metavar="FIELD",
                   help="with --resume: a config field (or a prefix, e.g. optimizer) that may differ from the run's "
                        "own (repeat; default: none)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("index", help="build, extend or describe a place index (FAISS + SQLite + manifest)")
    isub = i.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ib = isub.add_parser("build", help="index the images of a folder or CSV manifest (resumes when interrupted)")
    ia = isub.add_parser("add", help="append images to an index (same model; resumes when interrupted)")
    ib.add_argument("--local-features", choices=["aliked", "disk"], default=None,
                    help="also compute and keep each image's learned local features for --verify-with aliked/disk "
                         "(as `index features`, 1024 keypoints at 640 px) (default: none)")
    for a in (ib, ia):
        a.add_argument("--images", required=True,
                       help="image folder (EXIF GPS positions are read), CSV with path[,place_id][,lat,lon], a "
                            "video with --track, or a ROS bag (ROS 1 .bag, rosbag2 folder with SQLite3 or MCAP) with "
                            "--image-topic and --gnss-topic")
        a.add_argument("--image-topic", metavar="TOPIC",
                       help="ROS bag: the camera topic (sensor_msgs/Image rgb8/bgr8/mono8 or CompressedImage "
                            "JPEG/PNG) (default: none)")
        a.add_argument("--gnss-topic", metavar="TOPIC",
                       help="ROS bag: the sensor_msgs/NavSatFix topic; frames get positions interpolated at their "
                            "message time, fixes without a fix are skipped and counted (default: none)")
        a.add_argument("--track", metavar="FILE",
                       help="the GNSS track of the --images video: GPX, NMEA 0183 (.nmea) or CSV (time + lat,lon or "
                            "east,north) (default: none)")
        a.add_argument("--every", default="2m", metavar="DIST|TIME",
                       help="video with --track, or a ROS bag: keep a frame every '2m' travelled or every '0.5s' "
                            "(default 2m)")
        a.add_argument("--track-offset", type=_real(-1e9, 1e9), default=0.0, metavar="SECONDS",
                       help="added to the video's times to align them with the track (default 0)")
        a.add_argument("--require-gps", action="store_true",
                       help="photos: skip images without an EXIF GPS position (default: index them without "
                            "coordinates)")
        a.add_argument("--min-spacing", type=_real(0, 1e6), default=0.0, metavar="METRES",
                       help="photos: leave out an image closer than this to the previous one of its folder "
                            "(default 0: keep all)")
        a.add_argument("--batch-size", type=_bounded(1, 4096), default=32, help="images per forward (default 32)")
        a.add_argument("--skip-bad", action="store_true", help="skip and report unreadable images")
        a.add_argument("--int8", action="store_true", help="ternary models: int8 GEMM path")
        a.add_argument("--device", default="auto", help="PyTorch models: auto, cpu, cuda (ONNX: cpu)")
        a.add_argument("--json", action="store_true", help="print the summary as JSON")
        a.add_argument("--quiet", action="store_true", help="no progress bar")
    ib.add_argument("--model", default="effnet-lite0-gem",
                    help="named model, config, saved folder or exported .onnx file (onnxruntime)")
    ib.add_argument("--out", required=True, help="index folder")
    im_ = isub.add_parser("merge", help="join index parts (index build --shard i/n) into one index")
    im_.add_argument("parts", nargs="+", help="the part index folders (shards are joined in shard order)")
    im_.add_argument("--out", required=True, help="index folder to write")
    im_.add_argument("--json", action="store_true", help="print the summary as JSON")
    for a in (ib, im_):
        a.add_argument("--kind", choices=["flat", "ivfpq", "hnsw", "binary", "qdrant"], default="flat",
                       help="flat: exact; ivfpq: compressed codes (needs >= 256 images); hnsw: graph; binary: sign "
                            "bits (D/8 bytes per image), Hamming search; qdrant: a Qdrant Edge shard in the index "
                            "folder, or a collection of --qdrant-url (default flat)")
        a.add_argument("--qdrant-url", help="qdrant: a Qdrant server or cluster, e.g. http://host:6333 (default: "
                                            "Qdrant Edge in the index folder)")
        a.add_argument("--collection", help="qdrant: collection name (default edgevpr-<index folder name>)")
        a.add_argument("--qdrant-shards", type=_bounded(1, 1024), help="qdrant server: shard_number of the collection")
        a.add_argument("--qdrant-replicas", type=_bounded(1, 64),
                       help="qdrant server: replication_factor of the collection")
        a.add_argument("--binary", action="store_const", const="binary", dest="kind",
                       help="same as --kind binary (TeTRA's bit-packed descriptors)")
        a.add_argument("--nlist", type=int, help="ivfpq: inverted lists (default 4 sqrt(N))")
        a.add_argument("--pq-m", type=int, help="ivfpq: sub-quantisers = bytes per vector (default: <= 64)")
        a.add_argument("--nprobe", type=int, help="ivfpq: lists searched (default min(nlist, 16))")
        a.add_argument("--rerank", type=_bounded(0, 1000),
                       help="ivfpq: candidates re-ranked exactly from float16 copies of the descriptors (default 64; "
                            "0 off)")
        a.add_argument("--hnsw-m", type=int, help="hnsw: neighbours per node (default 32)")
        a.add_argument("--dim", type=_bounded(1, 65536),
                       help="flat: PCA-whitening to this many dimensions, learned on the database (default: off)")
        a.add_argument("--storage", choices=["float32", "float16", "int8"],
                       help="flat: bytes per dimension of the stored descriptors (default float32)")
        a.add_argument("--ef-search", type=int, help="hnsw: search breadth (default 64)")
    ib.add_argument("--shard", type=_shard, metavar="I/N",
                    help="index only part I of N of the image list (contiguous; join the parts with index merge)")
    _knob_flags(ib)
    ia.add_argument("--index", required=True, help="index folder to extend")
    ia.add_argument("--model", help="default: the model the index records")
    it = isub.add_parser("tune", help="choose an ivfpq/hnsw index's search settings for a target top-1 agreement "
                                      "with exact search, and record them")
    it.add_argument("--index", required=True, help="index folder")
    it.add_argument("--target", type=_real(0, 1, low_open=True), default=0.95,
                    help="top-1 agreement with exact search to reach (default 0.95)")
    it.add_argument("--sample", type=_bounded(10, 100000), default=200,
                    help="database images used as queries (default 200)")
    it.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    it.add_argument("--queries", nargs="+", metavar="PHOTOS",
                    help="held-out query photos (files, folders, .txt/.csv lists, videos), embedded with the "
                         "index's model and used instead of --sample (recommended: real queries need deeper "
                         "search than database images; default: none)")
    it.add_argument("--device", default="auto", help="for --queries, PyTorch models: auto, cpu, cuda (default auto)")
    it.add_argument("--json", action="store_true", help="print every trial as JSON")
    it.add_argument("--quiet", action="store_true", help="no progress bar")
    ii = isub.add_parser("info", help="describe an index: model, search, files, calibrations, sessions")
    ii.add_argument("index", help="index folder")
    ii.add_argument("--json", action="store_true",
                    help="print the whole manifest and the sessions as JSON (default: a summary and a table)")
    ii.add_argument("--verify", action="store_true",
                    help="read every byte: sha256 of each file against the manifest; prints {verified, problems} "
                         "and exits 1 when anything is broken (default: off)")
    ii.add_argument("--plot", metavar="PNG",
                    help="draw the map's coverage: every image's position coloured by session, gaps and density "
                         "visible, with a scale bar (default: no picture)")
    isn = isub.add_parser("snapshot", help="write a Qdrant Edge index as a Qdrant shard snapshot (full, or partial "
                                           "against a device's manifest) for `index pull` on other devices")
    isn.add_argument("--index", required=True, help="index folder (built with --kind qdrant)")
    isn.add_argument("--out", required=True, help="snapshot file to write (with --manifest: the JSON manifest)")
    isn.add_argument("--since", metavar="JSON",
                     help="a device's snapshot manifest (`index snapshot --manifest` there): send only what changed "
                          "since (default: a full snapshot)")
    isn.add_argument("--manifest", action="store_true",
                     help="write this shard's snapshot manifest to --out instead of a snapshot (default: off)")
    isn.add_argument("--json", action="store_true", help="print the summary as JSON")
    ipl = isub.add_parser("pull", help="bring an index to a Qdrant shard snapshot's state (a file or a URL such as "
                                       "a server's /collections/C/shards/0/snapshot); rows rebuilt from its points")
    ipl.add_argument("--index", required=True, help="index folder (created when missing)")
    ipl.add_argument("source", help="snapshot file or http(s) URL")
    ipl.add_argument("--model", help="the model that made the vectors, for a snapshot that names none (a server "
                                     "collection's; default: the index's or the snapshot's own record)")
    ipl.add_argument("--json", action="store_true", help="print the summary as JSON")
    ir = isub.add_parser("remove", help="remove images from an index: whole sessions (visits) or paths matching globs "
                                        "(the rest renumbered, the search structure rebuilt)")
    ir.add_argument("--index", required=True, help="index folder")
    ir.add_argument("--session", action="append", default=[], metavar="NAME",
                    help="remove every image of this session (repeat for several; `index info` lists them)")
    ir.add_argument("paths", nargs="*", metavar="GLOB",
                    help="remove the images whose path or file name matches (quote globs: 'drive1/*')")
    ir.add_argument("--json", action="store_true", help="print the summary as JSON")
    irl = isub.add_parser("relocate", help="point a map at its images' new folder (they moved, or the map is on "
                                           "another machine); frames inside the index folder need nothing")
    irl.add_argument("--index", required=True, help="index folder")
    irl.add_argument("--root", required=True,
                     help="the folder that now holds what the map's image root held (`index info` shows it); every "
                          "image must be found there, else nothing changes")
    irl.add_argument("--json", action="store_true", help="print the summary as JSON")
    ife = isub.add_parser("features", help="compute and keep the database's learned local features, so "
                                           "--verify-with aliked/disk reads them instead of recomputing (resumes)")
    ife.add_argument("--index", required=True, help="index folder")
    ife.add_argument("--with", dest="with_", choices=["aliked", "disk"], default="aliked",
                     help="learned features (default aliked)")
    ife.add_argument("--max-keypoints", type=int, default=1024, help="keypoints per image (default 1024)")
    ife.add_argument("--max-side", type=int, default=640, help="long side of the image they are found in, px "
                                                               "(default 640)")
    ife.add_argument("--max-mb", type=float, default=4096.0,
                     help="keep at most this many MB (about 0.13 MB an image at 512 keypoints); images past it are "
                          "computed on first use (default 4096)")
    ife.add_argument("--quiet", action="store_true", help="no progress bar (default: shown)")
    ife.add_argument("--json", action="store_true", help="print the summary as JSON (default: one line)")
    i.set_defaults(func=cmd_index)

    lo = sub.add_parser("localize", help="top-K database matches of photos, with coordinates and scores")
    lo.add_argument("photos", nargs="+",
                    help="photos, folders (sorted), .txt lists, .csv manifests, videos (.mp4 .mov .avi .mkv "
                         ".webm), ROS bags (with --image-topic), cameras (/dev/video0) or stream URLs (rtsp://...), "
                         "taken as one stream in the order given")
    lo.add_argument("--index", required=True, help="index folder")
    lo.add_argument("--model", help="default: the model the index records (an exported .onnx of it works too)")
    lo.add_argument("--top-k", "-k", type=_bounded(1, 1000), default=5, help="matches per photo (default 5)")
    lo.add_argument("--device", default="auto", help="PyTorch models: auto, cpu, cuda (ONNX: cpu)")
    lo.add_argument("--no-mmap", action="store_true", help="read the FAISS file into memory instead of mapping it")
    lo.add_argument("--json", action="store_true",
                    help="print every answer and the latency as one JSON document when the stream ends (default: off)")
    lo.add_argument("--json-lines", action="store_true",
                    help="print one JSON object per frame as soon as its decision exists, and the run's summary as "
                         "the last line (NDJSON; schema: edgevpr/schemas/localize.schema.json) (default: off)")
    lo.add_argument("--compact", action="store_true",
                    help="print one line per frame: the decision, its P, the place, the latency (default: off, a "
                         "few lines per frame)")
    lo.add_argument("--skip-bad", action="store_true", help="skip and report unreadable photos instead of stopping")
    lo.add_argument("--stride", type=_bounded(1, 100000), default=1,
                    help="videos and bags: use every N-th frame (default 1)")
    lo.add_argument("--image-topic", metavar="TOPIC",
                    help="ROS bags (ROS 1 .bag, rosbag2 folder with SQLite3 or MCAP): the camera topic, read as a "
                         "stream whose clock is the message time (default: none)")
    lo.add_argument("--prior", metavar="LAT,LON,RADIUS_M",
                    help="GNSS prior: search only database images within RADIUS_M metres of LAT,LON (negative values: "
                         "--prior=-27.47,153.03,200)")
    lo.add_argument("--prior-utm", metavar="EAST,NORTH,RADIUS_M", help="GNSS prior in UTM metres")
    lo.add_argument("--verify", type=_bounded(0, 1000), default=0, metavar="K",
                    help="re-rank the top K candidates by geometric verification (local features + MAGSAC++; needs "
                         "opencv-python-headless); 10 was chosen on validation for SIFT, 25 for a model's own features "
                         "(default 0: off)")
    _verify_with_flag(lo)
    lo.add_argument("--sequence", type=_bounded(0, 1000), default=0, metavar="L",
                    help="also match the stream as a sequence over the last L frames (default 0: off)")
    lo.add_argument("--exclude-session", action="append", default=[], metavar="NAME",
                    help="answer from the other sessions only (repeat; e.g. to evaluate one visit against the "
                         "others) (default: none)")
    lo.add_argument("--max-fps", type=_real(0, 1e4, low_open=True), metavar="F",
                    help="keep at most F frames per second of the source's clock; the rest are skipped and counted "
                         "(default: every frame)")
    lo.add_argument("--stream-timeout", type=_real(0, 1e6, low_open=True), default=10.0, metavar="S",
                    help="a camera or stream URL that sends nothing for S seconds ends the run in one line "
                         "(default 10)")
    lo.add_argument("--live", action="store_true",
                    help="treat the input as a live source: drop the oldest waiting frame rather than fall behind, "
                         "and report the drops; a video or bag is then replayed at its own clock, as --realtime "
                         "(default: on for cameras and stream URLs, off for files)")
    lo.add_argument("--realtime", action="store_true",
                    help="replay a video or recording at its own clock (frame timestamps) as a live source: frames "
                         "the loop cannot keep up with are dropped and counted, as they would be live (default: off, "
                         "a file is read as fast as the model takes it)")
    lo.add_argument("--sequence-method", choices=["seqslam", "filter"], default="seqslam",
                    help="seqslam: SeqSLAM search over the last L frames; filter: online Bayes filter "
                         "(default seqslam)")
    _knob_flags(lo)  # override the index's knobs for the queries, e.g. a lower keep_ratio
    lo.set_defaults(func=cmd_localize)

    ca = sub.add_parser("calibrate", help="fit an index's confidence (a calibrated P(top-1 is the right place)) "
                                          "and known/unknown threshold on validation queries with ground truth "
                                          "(all sets pooled) and unknown-place photos, at a target precision")
    ca.add_argument("--index", required=True, help="index folder (its manifest gains the calibration)")
    ca.add_argument("--model", help="default: the model the index records")
    ca.add_argument("--db", help="the database the index was built from (folder or CSV), for the ground truth")
    ca.add_argument("--queries", action="append", help="validation query folder or CSV (repeat for several sets)")
    ca.add_argument("--dataset", choices=["gardens_point"], help="a known benchmark's queries")
    cgt = ca.add_mutually_exclusive_group()
    cgt.add_argument("--aligned", type=int, metavar="K", help="aligned traversals, positives within +-K frames")
    cgt.add_argument("--gt", help="VPR-Bench ground_truth_new.npy")
    ca.add_argument("--frames", type=_frames, metavar="START:STOP", help="aligned traversals: places START..STOP-1")
    ca.add_argument("--radius", type=_real(0, 1e6, low_open=True), default=25.0,
                    help="positive radius in metres (UTM names, CSV; default 25)")
    ca.add_argument("--drop-dark", type=_real(0, 255), metavar="LEVEL",
                    help="drop frames darker than LEVEL (0-255 mean; default: keep all)")
    ca.add_argument("--precision", type=_real(0, 1, low_open=True), default=0.95,
                    help="target precision of 'known' answers (default 0.95)")
    ca.add_argument("--hood-m", type=_real(0, 1e6, low_open=True),
                    help="matches within this many metres of the top-1 are the same place (default 25 with "
                         "coordinates)")
    ca.add_argument("--hood-frames", type=int, help="without coordinates: within this many database ids "
                                                    "(default 2)")
    ca.add_argument("--device", default="auto", help="PyTorch models: auto, cpu, cuda (ONNX: cpu)")
    ca.add_argument("--verify", type=_bounded(0, 1000), default=0, metavar="K",
                    help="re-rank the top K candidates by geometric verification (local features + MAGSAC++; needs "
                         "opencv-python-headless); 10 was chosen on validation for SIFT, 25 for a model's own features "
                         "(default 0: off)")
    _verify_with_flag(ca)
    ca.add_argument("--quiet", action="store_true", help="no progress bar (default: a bar with rate and ETA)")
    ca.add_argument("--unknown", action="append", metavar="DIR",
                    help="photos of places the map does not hold (a folder, list or video; repeat): every answer "
                         "to them counts as wrong (default: none)")
    ca.add_argument("--reject-unknown", type=_real(0, 1), default=0.95, metavar="SHARE",  # decision.REJECT_UNKNOWN
                    help="'known' must also reject at least this share of the --unknown answers, at 90%% "
                         "confidence (its Clopper-Pearson lower bound; below about 45 photos at 0.95 that means all "
                         "of them) (default 0.95; 0: the target precision alone)")
    ca.add_argument("--sequence", type=_bounded(0, 1000), default=0, metavar="L",
                    help="also calibrate sequence answers over L frames (each query set is one capture sequence; "
                         "frames before the L-th are warm-up and not used) (default 0: single frames only)")
    ca.add_argument("--sequence-method", choices=["seqslam", "filter"], default="seqslam",
                    help="the sequence method to calibrate (default seqslam)")
    ca.add_argument("--plot", metavar="PNG", help="reliability diagram (default: INDEX/reliability.png)")
    ca.add_argument("--json", action="store_true", help="print the calibration as JSON")
    ca.set_defaults(func=cmd_calibrate)

    sv = sub.add_parser("serve", help="HTTP service: upload endpoint, health, and a web page with a map")
    sv.add_argument("--index", required=True, help="index folder to serve")
    sv.add_argument("--model", help="default: the model the index records")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port")
    sv.add_argument("--max-upload-mb", type=_real(0, 1e5, low_open=True), default=20.0,
                    help="largest accepted upload, MiB (default 20)")
    sv.add_argument("--max-pixels", type=_bounded(1, 10**10), default=40_000_000,
                    help="largest accepted image, pixels (default 40000000)")
    sv.add_argument("--max-frames", type=_bounded(1, 10000), default=60,
                    help="most frames in one sequence request (default 60)")
    sv.add_argument("--max-request-pixels", type=_bounded(1, 10**11), default=100_000_000,
                    help="all frames of one sequence request together, pixels, checked from their headers before "
                         "any is decoded (default 100000000)")
    sv.add_argument("--verify", type=_bounded(0, 1000), default=0, metavar="K",
                    help="re-rank the top K candidates by geometric verification (local features + MAGSAC++; needs "
                         "opencv-python-headless); 10 was chosen on validation for SIFT, 25 for a model's own features "
                         "(default 0: off)")
    _verify_with_flag(sv)
    sv.add_argument("--max-k", type=_bounded(1, 1000), default=50, help="largest k a request may ask (default 50)")
    sv.add_argument("--concurrency", type=_bounded(1, 256), default=1,
                    help="requests decoded and answered at once, each with --threads; the others wait their turn "
                         "(default 1)")
    sv.add_argument("--device", default="auto", help="PyTorch models: auto, cpu, cuda (ONNX: cpu)")
    sv.set_defaults(func=cmd_serve)

    # numpy only: --help stays torch-free
    from .compress.budget import DIMS, DISTIL_BATCH, DISTIL_SIZES, DISTIL_STEPS, KEEPS, SIZES

    cp = sub.add_parser("compress", help="from a trusted model to the most accurate one within a latency budget on "
                                         "this CPU, measured on your map's images, without labels")
    cp.add_argument("--teacher", required=True, help="the trusted model: named model, config or saved model folder")
    cp.add_argument("--images", required=True, help="the map's images: folder or CSV manifest")
    cp.add_argument("--budget-ms", type=float, required=True, help="ms per image at batch 1 on this CPU")
    cp.add_argument("--out", required=True, help="output folder (model.onnx, report.{json,md}, frontier.png; a "
                                                 "killed run resumes from it)")
    cp.add_argument("--queries", help="photos of the same places from another visit (folder or CSV; default: every "
                                      "--holdout-th map image, its neighbours left out)")
    cp.add_argument("--aligned", type=_bounded(0, 1000), metavar="N",
                    help="ground truth: query i shows map image i (+-N frames); accuracy is then R@1 (default: none, "
                         "agreement with the teacher)")
    cp.add_argument("--radius", type=float, metavar="M",
                    help="ground truth: map images within M metres of the query (coordinates needed; default: none)")
    cp.add_argument("--sizes", type=_real(0, 1, low_open=True), nargs="+", default=list(SIZES),
                    help=f"input sizes tried, fractions of the teacher's (default {' '.join(map(str, SIZES))})")
    cp.add_argument("--dims", type=_bounded(0, 1 << 16), nargs="+", default=list(DIMS),
                    help="descriptor sizes tried by PCA-whitening fitted on the map, 0 = the model's own (default "
                         f"{' '.join(map(str, DIMS))})")
    cp.add_argument("--keep-ratios", type=float, nargs="+", default=list(KEEPS),
                    help="a teacher with a WeiToP token-pruning scorer is also tried keeping these shares of its "
                         f"tokens (1.0 always; default {' '.join(map(str, KEEPS))})")
    cp.add_argument("--holdout", type=_bounded(2, 1000), default=10,
                    help="without --queries: every Nth map image is a held-out query (default 10)")
    cp.add_argument("--exclude", type=_bounded(0, 1000), default=2,
                    help="without --queries: map neighbours (+-N) left out of a held-out query's search (default 2)")
    cp.add_argument("--distil-steps", type=_bounded(0, 10**6), default=DISTIL_STEPS,
                    help=f"training steps ({DISTIL_BATCH} map images each) of each distilled student; 0: no "
                         f"distillation (default {DISTIL_STEPS})")
    cp.add_argument("--distil-sizes", type=_bounded(1, 100), default=DISTIL_SIZES,
                    help="students are distilled at this many input sizes, the largest that meet the budget "
                         f"(default {DISTIL_SIZES})")
    cp.add_argument("--device", default="auto", help="where the students train: auto, cpu, cuda (default auto; "
                                                     "candidates are always timed on this CPU)")
    cp.add_argument("--choose-by", choices=["accuracy", "agreement"], default="accuracy",
                    help="accuracy: R@1 with ground truth, else agreement; agreement: label-free even with ground "
                         "truth, R@1 still reported (default accuracy)")
    cp.add_argument("--ternary", action="store_true",
                    help="also train a TAT-VPR ternary candidate (ViT teachers; int8, at the largest input size that "
                         "meets the budget; default off: on onnxruntime it runs no faster than the int8 twin)")
    cp.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    cp.add_argument("--json", action="store_true", help="print the report as JSON")
    cp.add_argument("--quiet", action="store_true", help="no progress bars")
    cp.set_defaults(func=cmd_compress)

    x = sub.add_parser("export", help="export a model to ONNX (runtime knobs baked in; optional int8)")
    x.add_argument("--model", required=True, help="named model, config or saved model folder")
    x.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    x.add_argument("--out", required=True, help="output .onnx file")
    x.add_argument("--int8", action="store_true",
                   help="int8 graph: CNNs static QDQ (needs --calibration), transformers dynamic (default: off)")
    x.add_argument("--calibration", help="int8 CNNs: folder or CSV of database images to calibrate on (default: none)")
    x.add_argument("--calibration-count", type=_bounded(1, 10000), default=64,
                   help="images used for calibration, evenly spaced (default 64)")
    x.add_argument("--image-size", type=int, nargs="+", metavar="PX", help="input size (H [W]); default the model's")
    _knob_flags(x)
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="list named models (and what their weights are), backbones and aggregators")
    m.add_argument("--json", action="store_true", help="print as JSON (default: a table)")
    m.set_defaults(func=cmd_models)

    im = sub.add_parser("import", help="import a published checkpoint (SALAD, BoQ, MegaLoc, MixVPR, CosPlace, "
                                       "EigenPlaces, TeTRA) into an edgevpr model folder",
                        description="Example: edgevpr import salad dino_salad.ckpt --out models/dinov2-salad")
    im.add_argument("format", choices=["salad", "boq", "megaloc", "mixvpr", "cosplace", "eigenplaces", "tetra"],
                    help="the upstream family of the file")
    im.add_argument("checkpoint", help="the release file as published (.ckpt, .pth, .safetensors, .pth.zip)")
    im.add_argument("--out", required=True, help="edgevpr model folder to write (config.json + model.safetensors)")
    im.add_argument("--name", help="model name recorded in the folder (default: FORMAT-FILESTEM)")
    im.set_defaults(func=cmd_import)
    return p


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every parser that runs a command: one without sub-commands of its own (``index build``, ``localize``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                if any(isinstance(a, argparse._SubParsersAction) for a in sp._actions):
                    yield from _leaf_parsers(sp)
                else:
                    yield sp


def _thread_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--threads`` on every command (``threads.configure``: torch, onnxruntime, FAISS/OpenMP, OpenCV)."""
    for sp in _leaf_parsers(parser):
        extra = " per request (requests take the model one at a time)" if sp.prog.endswith(" serve") else ""
        sp.add_argument("--threads", type=_bounded(1, 1024), metavar="N",
                        help=f"compute threads{extra} for torch, onnxruntime, FAISS and OpenCV (default: "
                             "EDGEVPR_THREADS, else the physical cores this process may run on)")
    return parser


def _with_examples(parser: argparse.ArgumentParser, path: str = "") -> argparse.ArgumentParser:
    """Each sub-command's --help ends with an example (EXAMPLES, keyed by the sub-command path)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sp in action.choices.items():
                key = f"{path} {name}".strip()
                if key in EXAMPLES and not sp.epilog:
                    sp.epilog = f"example: {EXAMPLES[key]}"
                if not sp.description:
                    sp.description = helps.get(name)
                _with_examples(sp, key)
    return parser


#: the extra that brings each optional top-level module (pyproject.toml's optional dependencies)
EXTRAS = {"full": ("torch", "torchvision", "timm", "pytorch_metric_learning", "safetensors", "matplotlib"),
          "runtime": ("onnxruntime", "onnx", "faiss", "fastapi", "uvicorn", "multipart", "av", "cv2", "sklearn"),
          "qdrant": ("qdrant_edge", "qdrant_client")}


def main(argv: list[str] | None = None) -> int:
    args = _thread_flags(_with_examples(build_parser())).parse_args(argv)
    try:
        threads.configure(args.threads)  # before any library that starts a thread pool is imported
        return args.func(args)
    except KeyboardInterrupt:
        print("edgevpr: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # a part of an extra this install lacks (e.g. torch in the runtime install)
        if os.environ.get("EDGEVPR_DEBUG") or not e.name:
            raise
        top = e.name.split(".")[0]
        extra = next((x for x, mods in EXTRAS.items() if top in mods), None)
        command = args.func.__name__.removeprefix("cmd_")
        print(f"edgevpr: error: `edgevpr {command}` needs {top}, which this install lacks: " +
              (f"pip install 'edgevpr[{extra}]'" if extra else f"pip install {top}"), file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        if os.environ.get("EDGEVPR_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"edgevpr: error: {str(msg).splitlines()[0] if str(msg) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
