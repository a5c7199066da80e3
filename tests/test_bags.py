"""Robot recordings in: ROS 1 bags and rosbag2 (SQLite3, MCAP) written here with rosbags' own writers from real
Gardens Point frames and a made-up NavSatFix track: maps with positions from the fixes at each frame's message
time, and `localize` on a bag answering as on the same frames in a folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from edgevpr.cli import main
from edgevpr.deploy import index as idx
from edgevpr.deploy.bags import bag_frames, bag_track, image_of
from edgevpr.models.model import load_model
from tests.conftest import shared_data

T0 = 1_700_000_000.25  # the first frame's header stamp (Unix seconds)
SPEED = 3.0  # m/s northwards
LAT0, LON0 = -27.4775, 153.0280
#: record time = stamp + this, per topic (a camera's pipeline is slower than a GNSS receiver's): a reader that took
#: the record time would place frames (0.7 - 0.05) s x 3 m/s = 1.95 m off
LATENCY = {"/cam": 0.7, "/fix": 0.05}
FRAMES = 20


def _north(t: float) -> float:
    """The made-up track's latitude at time ``t``: SPEED m/s north of LAT0 from T0 - 1 s."""
    return LAT0 + math.degrees(SPEED * (t - (T0 - 1.0)) / 6371008.8)


def _write_bag(path, kind: str, encoding: str) -> None:
    """A bag of day_left Image000-019 on /cam (1 s apart, ``encoding``: jpeg = the files' own bytes as
    CompressedImage, else a raw Image) and NavSatFix on /fix every 0.5 s from T0 - 1 s (every fifth one NO_FIX at
    a wrong position, and five others with a +-50 m covariance 111 m off: skipped), each message recorded
    LATENCY[topic] after its stamp."""
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS1_NOETIC if kind == "ros1" else Stores.ROS2_HUMBLE)
    T = ts.types
    gp = shared_data() / "gardens_point" / "day_left"

    def header(t):
        stamp = T["builtin_interfaces/msg/Time"](sec=int(t), nanosec=int(round((t - int(t)) * 1e9)))
        return T["std_msgs/msg/Header"](**({"seq": 0} if kind == "ros1" else {}), stamp=stamp, frame_id="cam")

    msgs = []
    for i in range(FRAMES):
        t, p = T0 + i, gp / f"Image{i:03d}.jpg"
        if encoding == "jpeg":
            m = T["sensor_msgs/msg/CompressedImage"](header=header(t), format="jpeg",
                                                     data=np.frombuffer(p.read_bytes(), np.uint8))
            msgtype = "sensor_msgs/msg/CompressedImage"
        else:
            a = np.asarray(Image.open(p).convert("RGB"))
            a = a[:, :, ::-1] if encoding == "bgr8" else a
            a = np.ascontiguousarray(a)
            m = T["sensor_msgs/msg/Image"](header=header(t), height=a.shape[0], width=a.shape[1], encoding=encoding,
                                           is_bigendian=0, step=a.shape[1] * 3, data=a.reshape(-1))
            msgtype = "sensor_msgs/msg/Image"
        msgs.append(("/cam", msgtype, t, m))
    status = T["sensor_msgs/msg/NavSatStatus"]
    for k in range(2 * FRAMES + 4):
        t = T0 - 1.0 + 0.5 * k
        bad = k % 5 == 3  # NO_FIX
        vague = k % 7 == 5 and not bad  # a fix whose own covariance says +-50 m
        cov = np.diag([2500.0 if vague else 0.25] * 3).reshape(-1)
        fix = T["sensor_msgs/msg/NavSatFix"](
            header=header(t), status=status(status=-1 if bad else 0, service=1),
            latitude=_north(t) + (1.0 if bad else 0.001 if vague else 0.0), longitude=LON0, altitude=20.0,
            position_covariance=cov, position_covariance_type=2)
        msgs.append(("/fix", "sensor_msgs/msg/NavSatFix", t, fix))
    msgs.sort(key=lambda m: m[2] + LATENCY[m[0]])
    if kind == "ros1":
        from rosbags.rosbag1 import Writer

        writer, serialize = Writer(path), ts.serialize_ros1
    else:
        from rosbags.rosbag2 import StoragePlugin, Writer

        writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP if kind == "mcap" else StoragePlugin.SQLITE3)
        serialize = ts.serialize_cdr
    with writer as w:
        conns = {topic: w.add_connection(topic, mt, typestore=ts) for topic, mt in {(m[0], m[1]) for m in msgs}}
        for topic, mt, t, m in msgs:
            w.write(conns[topic], int((t + LATENCY[topic]) * 1e9), serialize(m, mt))


BAGS = {"ros1": ("run.bag", "jpeg"), "sqlite3": ("run_sqlite", "bgr8"), "mcap": ("run_mcap", "rgb8")}


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bags")
    out = {}
    for kind, (name, enc) in BAGS.items():
        _write_bag(tmp / name, kind, enc)
        out[kind] = tmp / name
    gp = shared_data() / "gardens_point"
    idx.build(load_model("pixels-patchnorm"), gp / "day_right", tmp / "map", spec="pixels-patchnorm", progress=False)
    folder = tmp / "frames"
    folder.mkdir()
    for i in range(FRAMES):
        (folder / f"Image{i:03d}.jpg").symlink_to(gp / "day_left" / f"Image{i:03d}.jpg")
    return out, tmp / "map", folder


@pytest.mark.parametrize("kind", list(BAGS))
def test_a_map_built_from_a_bag_has_the_tracks_positions_at_each_frames_stamp(bags, kind, tmp_path, capsys):
    paths, _, _ = bags
    bag = paths[kind]
    assert main(["index", "build", "--model", "pixels-patchnorm", "--images", str(bag), "--image-topic", "/cam",
                 "--gnss-topic", "/fix", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{FRAMES} of {FRAMES} frames of /cam kept" in err and "9 without a fix, 5 less precise" in err, err
    pi = idx.PlaceIndex.open(tmp_path / "m")
    c = pi.coordinates()
    assert len(pi) == FRAMES
    want = np.array([_north(T0 + i) for i in range(FRAMES)])
    off_m = np.abs(c.lat - want) * math.pi / 180 * 6371008.8
    assert off_m.max() < 0.5, off_m  # measured: < 1e-6 m (the stamps); the record times: 1.95 m
    assert np.abs(c.lon - LON0).max() < 1e-9


@pytest.mark.parametrize("kind", list(BAGS))
def test_localize_on_a_bag_answers_as_on_the_same_frames_in_a_folder(bags, kind, capsys):
    """JPEG bytes as CompressedImage, raw bgr8 and rgb8: the same pixels, so the same matches and scores; the
    frames' clock is the message stamp."""
    paths, index, folder = bags
    assert main(["localize", "--index", str(index), str(folder), "--json", "-k", "3"]) == 0
    ref = json.loads(capsys.readouterr().out)["results"]
    assert main(["localize", "--index", str(index), str(paths[kind]), "--image-topic", "/cam", "--json", "-k",
                 "3"]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    assert [g["frame"] for g in got] == [f"{paths[kind]}:/cam#{i}" for i in range(FRAMES)]
    assert [g["time"] for g in got] == pytest.approx([T0 + i for i in range(FRAMES)], abs=1e-6)
    for g, r in zip(got, ref, strict=True):
        assert [m["id"] for m in g["matches"]] == [m["id"] for m in r["matches"]]
        assert [m["score"] for m in g["matches"]] == pytest.approx([m["score"] for m in r["matches"]], abs=1e-6)


def test_fixes_without_a_fix_are_skipped_and_bad_input_is_one_line(bags, tmp_path, capsys):
    paths, index, _ = bags
    track, report = bag_track(paths["mcap"], "/fix")
    assert report == {"fixes": 30, "skipped_no_fix": 9, "skipped_imprecise": 5, "skipped_bad": 0}
    assert np.abs(track.lat - np.array([_north(t) for t in track.time])).max() < 1e-9
    # a topic the bag lacks, a topic of another type, a bag without --image-topic: one line each
    for argv, words in (
            (["localize", "--index", str(index), str(paths["ros1"]), "--image-topic", "/nope"], "no topic '/nope'"),
            (["localize", "--index", str(index), str(paths["ros1"]), "--image-topic", "/fix"], "carries sensor_msgs"),
            (["localize", "--index", str(index), str(paths["sqlite3"])], "--image-topic"),
            (["index", "build", "--model", "pixels-patchnorm", "--images", str(paths["mcap"]), "--image-topic",
              "/cam", "--out", str(tmp_path / "x")], "--gnss-topic")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "x").exists()


def test_raw_encodings_decode_to_the_same_pixels_and_others_are_refused():
    from rosbags.typesys import Stores, get_typestore

    T = get_typestore(Stores.ROS2_HUMBLE).types
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    head = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id="c")

    def raw(a, enc, step_pad=0):
        ch = 1 if a.ndim == 2 else 3
        rows = np.pad(a.reshape(a.shape[0], -1), ((0, 0), (0, step_pad)))  # rows padded past width: a real step
        return T["sensor_msgs/msg/Image"](header=head, height=a.shape[0], width=a.shape[1], encoding=enc,
                                          is_bigendian=0, step=a.shape[1] * ch + step_pad, data=rows.reshape(-1))

    assert (np.asarray(image_of(raw(rgb, "rgb8", 3), "x")) == rgb).all()
    assert (np.asarray(image_of(raw(rgb[:, :, ::-1].copy(), "bgr8"), "x")) == rgb).all()
    gray = rgb[:, :, 0].copy()
    assert (np.asarray(image_of(raw(gray, "mono8", 2), "x")) == gray[:, :, None]).all()
    with pytest.raises(OSError, match="encoding '16UC1'"):
        image_of(raw(gray, "16UC1"), "bag:/depth#0")


def test_bag_frames_are_read_one_at_a_time(bags):
    paths, _, _ = bags
    frames = bag_frames(paths["sqlite3"], "/cam", stride=5)
    first = next(frames)
    assert first.name.endswith(":/cam#0") and first.time == pytest.approx(T0) and first.image.size == (960, 540)
    assert [f.name.rsplit("#", 1)[1] for f in frames] == ["5", "10", "15"]


def test_a_damaged_bag_is_one_line_naming_it(bags, tmp_path):
    """Garbage with a bag's name, and a real ROS 1 bag cut in half: one ValueError naming the file, no traceback
    from the parser, nothing half-read taken as frames."""
    paths, _, _ = bags
    junk = tmp_path / "junk.bag"
    junk.write_bytes(b"not a bag at all" * 100)
    cut = tmp_path / "cut.bag"
    data = paths["ros1"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for bag in (junk, cut):
        with pytest.raises(ValueError, match=f"{bag.name}: not a readable ROS bag"):
            list(bag_frames(bag, "/cam"))
