"""The streaming loop (deploy/pipeline.py) on a real video: same answers as the sequential path, drops reported."""

from __future__ import annotations

import json
import os
import queue
import threading
import time

import numpy as np
import pytest

from edgevpr.cli import main
from edgevpr.data.images import load_image
from edgevpr.deploy import index as idx
from edgevpr.deploy.inputs import Frame, Stream, write_video
from edgevpr.deploy.localize import Localizer, Sequences
from edgevpr.deploy.pipeline import Pipeline
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def gp(tmp_path_factory):
    """The default model's index of Gardens Point day_right, and a 640x480 25 fps video of day_left 30-59."""
    from edgevpr.models.model import load_model

    data = shared_data() / "gardens_point"
    tmp = tmp_path_factory.mktemp("stream")
    idx.build(load_model("effnet-lite0-gem"), data / "day_right", tmp / "index", spec="effnet-lite0-gem",
              progress=False)
    video = write_video(tmp / "walk.mp4", [data / "day_left" / f"Image{i:03d}.jpg" for i in range(30, 60)])
    return tmp / "index", video, data


def test_pipeline_answers_equal_the_sequential_path_on_a_real_video(gp):
    """Decoding, the model and the decision run in three threads; on a file nothing is dropped and every answer
    (matches, scores, decision, sequence answer) is the one a frame-by-frame loop in one thread gives, in order."""
    root, video, _ = gp
    loc = Localizer(root)
    piped = loc.stream(video, 3, sequence=5)
    fast = [(a.name, a.to_dict()) for a in piped]
    tracks, slow = Sequences(loc, 5), []
    for f in Stream([video]):
        d, feats = loc.embed_local(loc.prepare(f.image)[None], None, [f.name])
        slow.append((f.name, tracks.push(f, d[0], loc.answer(d, 3, None, [f.image], None, feats)[0]).to_dict()))
    assert len(fast) == 30 and [n for n, _ in fast] == [n for n, _ in slow]
    assert fast == slow
    assert piped.stats.to_dict() | {"max_queue_depth": None} == {
        "read": 30, "answered": 30, "dropped": 0, "skipped_over_max_fps": 0, "dropped_names": [],
        "max_queue_depth": None}
    assert max(piped.stats.max_queue) <= 2  # bounded
    # and the video is localized: day_left 30-59 against day_right, +-2 frames
    right = [abs(int(a["headline"]["match"]["path"][-7:-4]) - (30 + i)) <= 2 for i, (_, a) in enumerate(fast) if i >= 4]
    assert np.mean(right) >= 0.9


def test_a_live_source_that_outruns_the_model_drops_the_oldest_frames_and_says_so(gp):
    """A camera does not wait: 40 frames come 5 ms apart to a model made to take 60 ms a frame (an injected slow
    model, so the outcome does not depend on this machine's speed); the loop answers what it can, drops the rest
    (oldest first), counts and names every drop, and never holds more than its queue depth."""
    root, _, data = gp
    loc = Localizer(root)
    fast = loc.embed_local

    def slow(*args, **kwargs):
        time.sleep(0.06)
        return fast(*args, **kwargs)

    loc.embed_local = slow
    images = [load_image(data / "day_left" / f"Image{i:03d}.jpg") for i in range(40)]

    sent = []

    def camera():
        for i, im in enumerate(images):
            time.sleep(0.005)
            sent.append(time.perf_counter())
            yield Frame(f"cam#frame{i}", im, "cam")

    loop = Pipeline(loc, camera(), 1, live=True, depth=1)
    names = [a.name for a in loop]
    st = loop.stats
    # while the camera sends, the model answers at most one frame per 60 ms; after it, the frames in flight (one in
    # the queue, one at the model, one waiting for the decision) and the one being decided
    most = int((sent[-1] - sent[0]) / 0.06) + 1 + 4
    assert st.read == 40 and st.answered == len(names) and st.answered + st.dropped == 40
    assert st.answered <= most < 30, (st.answered, most)
    assert names[-1] == "cam#frame39"  # the freshest frame is always answered
    order = [int(n.split("frame")[1]) for n in names]
    assert order == sorted(order) and set(st.dropped_names).isdisjoint(names)
    assert max(st.max_queue) <= 1


def test_max_fps_keeps_frames_by_the_sources_clock(gp):
    """A 25 fps video at --max-fps 5: frames at 0, 0.2, 0.4 ... s are kept (6 of 30), the others counted."""
    root, video, _ = gp
    loop = Pipeline(Localizer(root), Stream([video]), 1, max_fps=5)
    names = [a.name for a in loop]
    assert names == [f"{video}#frame{i}" for i in range(0, 30, 5)]
    assert loop.stats.skipped_fps == 24 and loop.stats.dropped == 0


def test_localize_live_reports_its_drops(gp, capsys, tmp_path):
    root, _, data = gp
    folder = tmp_path / "burst"
    folder.mkdir()
    for i in range(20):
        (folder / f"f{i:02d}.jpg").symlink_to(data / "day_left" / f"Image{i:03d}.jpg")
    assert main(["localize", "--index", str(root), str(folder), "--live", "--json", "-k", "1"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    st = res["stream"]
    assert st["read"] == 20 and st["answered"] == len(res["results"]) and st["answered"] + st["dropped"] == 20
    if st["dropped"]:  # a folder of files is read far faster than the model runs: drops are expected, and said
        assert cap.err.startswith(f"dropped {st['dropped']} frame(s)")
    assert {"p50_ms", "p95_ms", "p99_ms"} <= set(res["latency"])


def test_a_stream_url_is_read_as_a_live_source(gp, tmp_path):
    """A network stream PyAV opens (here the video served over loopback HTTP) is a live source: read, answered,
    and its stats carry the live policy (nothing waits for the loop)."""
    root, _, data = gp
    from tests.conftest import serve_folder

    # MPEG-TS, as streams are (an MP4 over plain HTTP needs range requests to reach its index at the end)
    video = write_video(tmp_path / "walk.ts", [data / "day_left" / f"Image{i:03d}.jpg" for i in range(30, 60)])
    with serve_folder(video.parent) as url:
        stream = Stream([f"{url}/{video.name}"])
        assert stream.live
        loop = Pipeline(Localizer(root), stream, 1)
        names = [a.name for a in loop]
    assert loop.live and loop.stats.read == 30 and loop.stats.answered == len(names) >= 1
    assert loop.stats.answered + loop.stats.dropped == 30 and names[0].startswith(f"{url}/{video.name}#frame")


def _schema_check():
    """The shipped JSON Schema of ``localize --json-lines`` -> a function raising on a line it does not describe."""
    import importlib.resources

    import jsonschema

    schema = json.loads(importlib.resources.files("edgevpr").joinpath("schemas/localize.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema).validate


def test_json_lines_come_out_while_an_endless_stream_is_still_running(gp, tmp_path):
    """A live source that does not end (a loopback HTTP stream that sends a real walk and then keeps the connection
    open, silent, as a camera between frames): the lines of ``localize --json-lines`` up to frame 8 of the 15 sent
    are read, parsed and schema-checked while the process is still running; a line held in a buffer until the
    stream ends would never arrive. Then the run is interrupted."""
    import http.server
    import subprocess
    import sys

    from tests.conftest import serve

    root, _, data = gp
    ts = write_video(tmp_path / "walk.ts", [data / "day_left" / f"Image{i:03d}.jpg" for i in range(30, 45)])
    payload, gone = ts.read_bytes(), threading.Event()

    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the handler's API)
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
            gone.wait(120)  # then silence, the connection open: the stream has not ended

        def log_message(self, *args):
            pass

    validate, lines = _schema_check(), []
    with serve(Endless) as url:
        proc = subprocess.Popen([sys.executable, "-m", "edgevpr.cli", "localize", "--index", str(root),
                                 f"{url}/endless.ts", "--json-lines", "-k", "1", "--stream-timeout", "100"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
        got: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [got.put(line) for line in proc.stdout], daemon=True).start()
        try:  # a live source drops what the loop cannot keep up with; the decoder holds back its last few frames
            while not lines or int(json.loads(lines[-1])["frame"].rsplit("#frame", 1)[1]) < 8:
                lines.append(got.get(timeout=90))
            assert proc.poll() is None  # still running: the lines came out before any end
        finally:
            gone.set()
            proc.kill()
            proc.wait(timeout=30)
    records = [json.loads(line) for line in lines]
    for r in records:
        validate(r)
    assert [r["type"] for r in records] == ["frame"] * len(records)
    assert all(r["frame"].startswith(f"{url}/endless.ts#frame") and r["time"] is not None for r in records)
    frames = [int(r["frame"].rsplit("#frame", 1)[1]) for r in records]
    assert frames == sorted(frames) and len(frames) >= 2


def test_every_json_line_of_a_real_run_fits_the_schema_and_the_summary_is_last(gp, capsys):
    """A video with a sequence on, both sequence methods (the filter has no order test: its gain is null, not NaN):
    every line validates; one line per frame, the summary last; the lines carry what --json carries."""
    root, video, _ = gp
    validate = _schema_check()
    for method in ("seqslam", "filter"):
        assert main(["localize", "--index", str(root), str(video), "--json-lines", "-k", "2", "--sequence", "5",
                     "--sequence-method", method]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        for r in records:
            validate(r)
        assert [r["type"] for r in records] == ["frame"] * 30 + ["summary"]
        assert records[-1]["stream"]["answered"] == 30 and records[-1]["latency"]["frames"] == 30
        assert [r["frame"] for r in records[:-1]] == [f"{video}#frame{i}" for i in range(30)]
        assert all(r["headline"]["source"] == "sequence" for r in records[:-1])
    assert main(["localize", "--index", str(root), str(video), "--json", "-k", "2", "--sequence", "5",
                 "--sequence-method", "filter"]) == 0
    whole = json.loads(capsys.readouterr().out)
    strip = ("ms",)  # latencies differ run to run
    assert [{k: v for k, v in r.items() if k not in strip} for r in whole["results"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in records[:-1]]


def test_compact_mode_is_one_line_per_frame(gp, capsys):
    root, video, _ = gp
    assert main(["localize", "--index", str(root), str(video), "--compact", "--stride", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 10 + 1  # ten frames, then the latency line
    assert all(line.startswith(f"{video}#frame") and "ms]" in line and "Image0" in line for line in out[:-1])
    assert out[-1].startswith("10 frames: p50")


def test_localizer_stream_is_an_iterator_over_an_endless_source(gp):
    """From Python: ``Localizer.stream`` takes a generator that never ends and yields each answer as it exists."""
    import itertools

    root, _, data = gp
    images = [load_image(data / "day_left" / f"Image{i:03d}.jpg") for i in range(40, 44)]
    endless = (Frame(f"cam#{i}", images[i % 4], "cam") for i in itertools.count())
    with Localizer(root).stream(endless, 1) as loop:
        first = list(itertools.islice(loop, 6))
    assert [a.name for a in first] == [f"cam#{i}" for i in range(6)]
    top = [int(a.matches[0].path[-7:-4]) for a in first]
    assert top[4:] == top[:2] and all(abs(t - (40 + i % 4)) <= 2 for i, t in enumerate(top))
    loop._workers[0].join(timeout=5)  # closed: the reader stopped pulling from the endless source
    assert not loop._workers[0].is_alive()


def test_realtime_replays_a_file_at_its_own_clock_and_counts_what_it_drops(gp, tmp_path):
    """A 5 fps file replayed with ``realtime``: no frame is read before its timestamp (0.2 s apart: far more than
    decoding and preparing one takes, so a replay that did not wait would read them all at once), frames the loop
    cannot keep up with are dropped and counted (read = answered + dropped), and the freshest frame is answered;
    read as a file, the same video is answered whole with nothing dropped. `localize --live` on a file is such a
    replay. (A 30 fps replay's drops against the loop's throughput: benchmarks/stream.py.)"""
    root, _, data = gp
    video = write_video(tmp_path / "walk5.mp4", [data / "day_left" / f"Image{i:03d}.jpg" for i in range(15)], fps=5)
    loc = Localizer(root)
    pulled = []

    def source():  # when the loop asks for each frame: only after the previous one's time has come
        for f in Stream([video]):
            pulled.append(time.perf_counter())
            yield f

    with loc.stream(source(), 1, realtime=True) as replay:
        names = [a.name for a in replay]
    since = np.array(pulled) - pulled[0]
    assert (since[1:] >= np.arange(14) / 5 - 0.005).all(), since  # not waiting: all 15 within ~0.5 s
    st = replay.stats
    assert st.read == 15 and st.answered == len(names) and st.answered + st.dropped == 15
    assert names[-1].endswith("#frame14") and replay.live
    whole = loc.stream(video, 1)
    assert len(list(whole)) == 15 and whole.stats.dropped == 0 and not whole.live
    t0 = time.perf_counter()
    assert main(["localize", "--index", str(root), str(video), "--live", "--json-lines", "-k", "1"]) == 0
    assert time.perf_counter() - t0 >= 14 / 5


def test_a_bad_entry_of_a_list_file_is_named_by_file_and_line(gp, tmp_path, capsys):
    root, _, data = gp
    listing = tmp_path / "frames.txt"
    listing.write_text(f"# two frames\n{data / 'day_left' / 'Image000.jpg'}\nhello, I am not an image\n")
    assert main(["localize", "--index", str(root), str(listing), "--compact"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"edgevpr: error: {listing}, line 3: {tmp_path / 'hello, I am not an image'}: file not found"], err
    assert main(["localize", "--index", str(root), str(listing), "--json", "--skip-bad"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == [
        {"path": f"{listing}, line 3: {tmp_path / 'hello, I am not an image'}", "reason": "file not found"}]

