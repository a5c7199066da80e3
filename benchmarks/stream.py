"""The whole streaming loop on this CPU: frames per second and per-frame latency, idle and beside a competitor.

    python benchmarks/stream.py [--frames 200] [--fps 30]

A real video: Gardens Point day_left 0-99 then night_right 0-99 (200 frames), encoded at 640x480, 30 fps (MPEG-4).
Two models, each as an int8 ONNX file with its index of Gardens Point day_right (100 images):
* the default model (EfficientNet-lite0 + GeM, 224 px; static int8 calibrated on 32 database images);
* the composed edge student (configs/tat-vpr/cpu-edge.yaml: hybrid ViT with ternary linears, WeiToP at keep 0.5,
  160 px, int8), built from its config with untrained weights: its speed does not depend on the weight values, and
  its trained weights are not part of this repository.
Each configuration runs in a fresh process, torch-free, pinned with ``sched_setaffinity`` to core 0 or to cores
0-1, with the edgevpr thread policy at ``--threads`` 1 or 2 (``--threads 1`` on two cores: the model computes on
one thread while reading and decoding may use the other), and measures in one run:
1. the model's isolated throughput: batch-1 forwards of a prepared frame (no decoding, no search);
2. **throughput**: the pipeline (decode, resize, embed, search, SeqSLAM L=10, decision) over the file, read as
   fast as it goes: answered frames per second of wall time, measured before and after 3. (the mean is used);
3. **real time**: the same video replayed at its own clock (``realtime=True``, what ``localize --realtime`` does:
   each frame read at its timestamp, dropped by the pipeline when it falls behind): latency p50/p95/p99 from
   release to answer, frames dropped beside the drops the throughput of 2. implies: plainly (read - throughput x
   duration) and counting the decoding of every frame, which a replay cannot skip (answered <= (duration - read x
   d) / (1 / throughput - d), d the measured decoding time per frame: the bound where decoding shares the loop's
   CPU), deepest queue.
Loads: idle, and beside a competing CPU-bound process (a busy loop pinned to core 0, started before and stopped
after each measurement by this script). Writes benchmarks/results/stream.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def worker(index: str, model: str, video: str, threads_n: int, cores: list[int], fps: float) -> dict:
    """One configuration in this fresh process (see the module notes) -> its figures."""
    os.sched_setaffinity(0, cores)
    from edgevpr import threads

    threads.configure(threads_n)

    from edgevpr.deploy.inputs import Stream
    from edgevpr.deploy.localize import Localizer
    from edgevpr.deploy.pipeline import Pipeline, latency_percentiles

    loc = Localizer(index, model)
    first = next(iter(Stream([video])))
    x = loc.prepare(first.image)[None]
    for _ in range(5):
        loc.embed_arrays(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:
        loc.embed_arrays(x)
        n += 1
    isolated = n / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    decoded = sum(1 for _ in Stream([video]))
    decode_s = (time.perf_counter() - t0) / decoded  # decoding alone, per frame

    def throughput() -> float:
        loop = Pipeline(loc, Stream([video]), 1, sequence=10)
        t0 = time.perf_counter()
        answered = sum(1 for _ in loop)
        return answered / (time.perf_counter() - t0)

    before = throughput()
    live = Pipeline(loc, Stream([video]), 1, sequence=10, realtime=True)  # each frame read at its own timestamp
    ms = [a.ms for a in live]
    after = throughput()
    x, read = (before + after) / 2, live.stats.read
    duration = read / fps
    # what the throughput implies. Plain: over the video's duration the loop answers about x * duration frames, so
    # at least read - that many are dropped. A replay must still decode every frame it drops (a video cannot skip
    # decoding), so where decoding shares the loop's CPU each answered frame costs 1/x - d and each frame read d:
    # answered <= (duration - read * d) / (1/x - d).
    plain = max(0, read - int(x * duration))
    with_decoding = max(0, read - int((duration - read * decode_s) / (1 / x - decode_s)))
    return {"isolated_fps": isolated, "pipeline_fps": x, "pipeline_fps_before_after": [before, after],
            "pipeline_vs_isolated": x / isolated, "decode_ms": decode_s * 1000,
            "realtime": {**latency_percentiles(ms), **live.stats.to_dict(), "source_fps": fps,
                         "dropped_implied_by_throughput": plain,
                         "dropped_implied_decoding_every_frame": with_decoding}}


#: the competing process: a CPU-bound loop pinned to core 0
HOG = "import os\nos.sched_setaffinity(0, [0])\nwhile True:\n    pass\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fps", type=float, default=30.0, help="frame rate of the video and of its live replay "
                                                            "(default 30)")
    ap.add_argument("--worker", nargs=5, metavar=("INDEX", "MODEL", "VIDEO", "THREADS", "CORES"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        index, model, video, t, cores = args.worker
        print(json.dumps(worker(index, model, video, int(t), [int(c) for c in cores.split(",")], args.fps)))
        return
    from heldout import data_root

    from edgevpr.deploy import index as idx
    from edgevpr.deploy.export import export_onnx
    from edgevpr.deploy.inputs import write_video
    from edgevpr.deploy.onnx_model import OnnxModel
    from edgevpr.models.model import load_model
    from edgevpr.train.loop import load_config
    from edgevpr.utils import write_json, write_text

    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("this benchmark needs two cores (one for the competing process)")
    gp = data_root() / "gardens_point"
    tmp = Path(tempfile.mkdtemp(prefix="edgevpr-stream-"))
    frames = [gp / "day_left" / f"Image{i:03d}.jpg" for i in range(100)] + \
             [gp / "night_right" / f"Image{i:03d}.jpg" for i in range(100)]
    video = write_video(tmp / "walk.mp4", frames, (640, 480), fps=args.fps)
    conf = load_config(ROOT / "configs" / "tat-vpr" / "cpu-edge.yaml")
    models = {
        "default model (EfficientNet-lite0 + GeM, 224 px) int8": export_onnx(
            load_model("effnet-lite0-gem"), tmp / "default-int8.onnx", int8=True, calibration=gp / "day_right",
            calibration_count=32),
        "composed edge student (ternary + WeiToP keep 0.5, 160 px) int8": export_onnx(
            load_model(conf["model"]), tmp / "edge-int8.onnx", knobs={"keep_ratio": 0.5}, int8=True,
            image_size=tuple(conf["data"]["image_size"])),
    }
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs "
                      f"({open('/proc/cpuinfo').read().count('avx512_vnni') and 'AVX-512 VNNI' or 'no VNNI'})",
           "video": f"{len(frames)} frames, 640x480, {args.fps:g} fps, MPEG-4", "rows": []}
    for label, onnx in models.items():
        index = tmp / f"{onnx.stem}.index"
        idx.build(OnnxModel(onnx), gp / "day_right", index, spec=str(onnx), progress=False)
        for threads_n, cores in ((1, "0"), (1, "0,1"), (2, "0,1")):
            for load in ("idle", "beside a busy process on core 0"):
                hog = subprocess.Popen([sys.executable, "-c", HOG]) if load != "idle" else None
                try:
                    r = subprocess.run([sys.executable, __file__, "--fps", str(args.fps), "--worker", str(index),
                                        str(onnx), str(video), str(threads_n), cores], capture_output=True, text=True,
                                       timeout=1800)
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                if r.returncode:
                    sys.exit(r.stderr[-3000:])
                row = {"model": label, "threads": threads_n, "cores": cores, "load": load,
                       **json.loads(r.stdout.strip().splitlines()[-1])}
                print(json.dumps(row), flush=True)
                res["rows"].append(row)
    write_json(ROOT / "benchmarks" / "results" / "stream.json", res)
    lines = [f"# The streaming loop on this CPU (`python benchmarks/stream.py`; {res['machine']})", "",
             f"Video: {res['video']} (Gardens Point day_left then night_right). Loop: decode, resize, embed, search "
             "(flat index of 100 images), SeqSLAM L=10, decision; each row a fresh torch-free process pinned to the "
             "cores shown with `--threads` at that width. Throughput: the file read as fast as the loop goes. Real "
             f"time: the video replayed as a live camera at {args.fps:g} fps (dropping when behind); latency from a "
             "frame's release to its answer.", "",
             "| model | threads (cores) | load | isolated model fps (b1) | loop fps (before / after) | "
             "loop / isolated | "
             "decoding ms per frame | real time: p50 / p95 / p99 ms | p95 / p50 | answered / dropped | drops the loop "
             "fps implies: plain / decoding every frame | deepest queue |",
             "|---|---|---|---:|---|---:|---:|---|---:|---|---:|---:|"]
    for r in res["rows"]:
        rt = r["realtime"]
        lines.append(f"| {r['model']} | {r['threads']} ({r['cores']}) | {r['load']} | {r['isolated_fps']:.1f} | "
                     f"{r['pipeline_fps']:.1f} ({' / '.join(f'{v:.1f}' for v in r['pipeline_fps_before_after'])}) | "
                     f"{r['pipeline_vs_isolated']:.2f} | {r['decode_ms']:.1f} | {rt['p50_ms']:.1f} / "
                     f"{rt['p95_ms']:.1f} / {rt['p99_ms']:.1f} | {rt['p95_ms'] / rt['p50_ms']:.2f} | "
                     f"{rt['answered']} / {rt['dropped']} | {rt['dropped_implied_by_throughput']} / "
                     f"{rt['dropped_implied_decoding_every_frame']} | "
                     f"{max(rt['max_queue_depth'])} |")
    write_text(ROOT / "benchmarks" / "results" / "stream.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
