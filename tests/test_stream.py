"""The streaming loop (deploy/pipeline.py) on a real video: same answers as the sequential path, drops reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgevpr.cli import main
from edgevpr.data.images import load_image
from edgevpr.deploy import index as idx
from edgevpr.deploy.inputs import Frame, Stream, write_video
from edgevpr.deploy.localize import Localizer
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
    (matches, scores, decision, sequence answer) is the one the sequential path gives, in order."""
    root, video, _ = gp
    loc = Localizer(root)
    piped = Pipeline(loc, Stream([video]), 3, sequence=5)
    fast = [(n, a.to_dict()) for n, a, _ in piped]
    slow = [(n, a.to_dict()) for n, a, _ in loc.stream(Stream([video]), 3, sequence=5)]
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
    """A camera does not wait: 40 frames arrive at once; the loop answers what it can, drops the rest (oldest
    first), counts and names every drop, and never holds more than its queue depth."""
    root, _, data = gp
    loc = Localizer(root)
    images = [load_image(data / "day_left" / f"Image{i:03d}.jpg") for i in range(40)]
    frames = (Frame(f"cam#frame{i}", im, "cam") for i, im in enumerate(images))
    loop = Pipeline(loc, frames, 1, live=True, depth=1)
    names = [n for n, _, _ in loop]
    st = loop.stats
    assert st.read == 40 and st.answered == len(names) and st.answered + st.dropped == 40 and st.dropped >= 10
    assert names[-1] == "cam#frame39"  # the freshest frame is always answered
    order = [int(n.split("frame")[1]) for n in names]
    assert order == sorted(order) and set(st.dropped_names).isdisjoint(names)
    assert max(st.max_queue) <= 1


def test_max_fps_keeps_frames_by_the_sources_clock(gp):
    """A 25 fps video at --max-fps 5: frames at 0, 0.2, 0.4 ... s are kept (6 of 30), the others counted."""
    root, video, _ = gp
    loop = Pipeline(Localizer(root), Stream([video]), 1, max_fps=5)
    names = [n for n, _, _ in loop]
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
        names = [n for n, _, _ in loop]
    assert loop.live and loop.stats.read == 30 and loop.stats.answered == len(names) >= 1
    assert loop.stats.answered + loop.stats.dropped == 30 and names[0].startswith(f"{url}/{video.name}#frame")
