"""Robot recordings as inputs: ROS 1 bags and rosbag2 (SQLite3 or MCAP), read with the ``rosbags`` library (pure
Python, no ROS install; ``pip install rosbags``, in ``edgevpr[runtime]``).

* ``bag_frames``: the images of one topic as a stream of ``inputs.Frame`` whose clock is the message time
  (``header.stamp``; the bag's record time where a stamp is zero), in seconds since the Unix epoch, so
  ``localize run.bag --image-topic ...`` answers a recording as it would the live camera, and ``--realtime``
  replays it at that clock. Encodings: ``sensor_msgs/Image`` in ``rgb8``, ``bgr8``, ``mono8``;
  ``sensor_msgs/CompressedImage`` JPEG or PNG (decoded under the same pixel and JPEG-scan limits as files).
  Anything else is one line naming the topic and the encoding.
* ``bag_track``: ``sensor_msgs/NavSatFix`` messages of one topic -> a ``recordings.Track`` (the map builder
  interpolates each kept frame's position from it by message time, as for a video and its GPX). Fixes whose status
  is NO_FIX (-1), whose covariance says they are off by more than ``MAX_FIX_STD_M`` (25 m;
  ``EDGEVPR_MAX_FIX_STD_M``), or whose latitude/longitude are not finite numbers in range, are skipped and counted.

A bag is a ROS 1 ``.bag`` file, a rosbag2 folder (with its ``metadata.yaml``) or a rosbag2 storage file (``.db3``,
``.mcap``) inside such a folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

#: raw image encodings read (channels, and whether the bytes are BGR)
RAW_ENCODINGS = {"rgb8": (3, False), "bgr8": (3, True), "mono8": (1, False)}
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
FIX_TYPE = "sensor_msgs/msg/NavSatFix"
NO_FIX = -1
#: a fix whose own covariance (when its type is not UNKNOWN) says its horizontal standard deviation exceeds this
#: many metres is skipped and counted: interpolating frames between such fixes would place them anywhere
MAX_FIX_STD_M = float(os.environ.get("EDGEVPR_MAX_FIX_STD_M", "25"))


def is_bag(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ROS 1 bag, a rosbag2 folder or a rosbag2 storage file."""
    p = Path(path)
    return (p.is_file() and p.suffix.lower() in (".bag", ".db3", ".mcap")) or \
        (p.is_dir() and (p / "metadata.yaml").is_file())


def _bag_path(path: Path) -> Path:
    """What ``rosbags`` opens: the .bag file, or the rosbag2 folder (a storage file's parent)."""
    if path.is_file() and path.suffix.lower() in (".db3", ".mcap"):
        if not (path.parent / "metadata.yaml").is_file():
            raise ValueError(f"{path}: a rosbag2 storage file is read with its bag folder, and "
                             f"{path.parent / 'metadata.yaml'} is missing (give the folder rosbag2 recorded)")
        return path.parent
    return path


class _Reader:
    """An open bag (``rosbags.highlevel.AnyReader``) with one-line errors naming the bag and topic."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            from rosbags.highlevel import AnyReader
        except ImportError:
            raise ValueError(f"{path}: reading robot recordings needs the rosbags package (pip install "
                             "rosbags, or edgevpr[runtime])") from None
        self.path = Path(path)
        self.reader = AnyReader([_bag_path(self.path)])

    def __enter__(self) -> _Reader:
        try:
            self.reader.open()
        except Exception as e:  # rosbags raises its own error classes per format
            raise ValueError(f"{self.path}: not a readable ROS bag ({str(e).splitlines()[0][:200]})") from None
        return self

    def __exit__(self, *exc) -> None:
        self.reader.close()

    def connections(self, topic: str, types: tuple[str, ...], flag: str) -> list:
        have = {c.topic: c.msgtype for c in self.reader.connections}
        if topic not in have:
            raise ValueError(f"{self.path}: no topic {topic!r} ({flag}; the bag has "
                             f"{', '.join(f'{t} [{m}]' for t, m in sorted(have.items())) or 'no topics'})")
        if have[topic] not in types:
            raise ValueError(f"{self.path}: topic {topic} carries {have[topic]}, not {' or '.join(types)} ({flag})")
        return [c for c in self.reader.connections if c.topic == topic]

    def messages(self, connections: list) -> Iterator[tuple[float, object]]:
        """(time in Unix seconds: the header stamp, else the record time; message) in record order."""
        for conn, stamp_ns, raw in self.reader.messages(connections=connections):
            msg = self.reader.deserialize(raw, conn.msgtype)
            head = getattr(getattr(msg, "header", None), "stamp", None)
            sec = (head.sec + head.nanosec * 1e-9) if head is not None and (head.sec or head.nanosec) else \
                stamp_ns * 1e-9
            yield float(sec), msg


def image_of(msg, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A ``sensor_msgs/Image`` or ``CompressedImage`` -> RGB image; ImageLoadError naming ``where`` otherwise."""
    if hasattr(msg, "format"):  # CompressedImage: "jpeg", "png", or "rgb8; jpeg compressed bgr8" (image_transport)
        fmt = msg.format.lower()
        if not any(k in fmt for k in ("jpeg", "jpg", "png")):
            raise ImageLoadError(where, f"compressed format {msg.format!r}: only JPEG and PNG are read")
        return load_image(where, max_pixels, data=bytes(msg.data))
    enc = msg.encoding.lower()
    if enc not in RAW_ENCODINGS:
        raise ImageLoadError(where, f"encoding {msg.encoding!r}: read are {', '.join(RAW_ENCODINGS)} (raw) and "
                                    "JPEG/PNG (compressed)")
    ch, bgr = RAW_ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h * w > max_pixels:
        raise ImageLoadError(where, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    data = np.asarray(msg.data, np.uint8)
    if h == 0 or w == 0 or step < w * ch or data.size < h * step:
        raise ImageLoadError(where, f"{w}x{h} {enc} image with step {step} and {data.size} bytes: inconsistent")
    arr = data[:h * step].reshape(h, step)[:, :w * ch].reshape(h, w, ch)
    if ch == 1:
        return Image.fromarray(arr[:, :, 0], "L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(arr[:, :, ::-1] if bgr else arr), "RGB")


def bag_frames(path: str | os.PathLike, topic: str, stride: int = 1) -> Iterator:
    """The images of ``topic`` -> ``inputs.Frame`` per message (every ``stride``-th), named BAG:TOPIC#N, whose
    ``time`` is the message time (Unix seconds) and whose ``sequence`` is the bag and topic."""
    from .inputs import Frame

    with _Reader(path) as r:
        conns = r.connections(topic, IMAGE_TYPES, "--image-topic")
        for i, (t, msg) in enumerate(r.messages(conns)):
            if i % stride == 0:
                name = f"{path}:{topic}#{i}"
                yield Frame(name, image_of(msg, name), f"{path}:{topic}", t)


def bag_track(path: str | os.PathLike, topic: str) -> tuple:
    """``sensor_msgs/NavSatFix`` of ``topic`` -> (recordings.Track, {"fixes", "skipped_no_fix",
    "skipped_imprecise", "skipped_bad"})."""
    from .recordings import Track

    times, lat, lon, no_fix, vague, bad = [], [], [], 0, 0, 0
    with _Reader(path) as r:
        for t, msg in r.messages(r.connections(topic, (FIX_TYPE,), "--gnss-topic")):
            if int(msg.status.status) <= NO_FIX:
                no_fix += 1
                continue
            cov = np.asarray(msg.position_covariance, np.float64)
            if int(msg.position_covariance_type) != 0 and len(cov) == 9 and \
                    not max(cov[0], cov[4]) <= MAX_FIX_STD_M ** 2:  # east and north variances (NaN: unusable too)
                vague += 1
                continue
            a, b = float(msg.latitude), float(msg.longitude)
            if not (math.isfinite(a) and math.isfinite(b) and abs(a) <= 90 and abs(b) <= 180):
                bad += 1
                continue
            times.append(t)
            lat.append(a)
            lon.append(b)
    nan = np.full(len(times), np.nan)
    track = Track(np.array(times), np.array(lat), np.array(lon), nan, nan.copy(), f"{path}:{topic}")
    return track, {"fixes": len(times), "skipped_no_fix": no_fix, "skipped_imprecise": vague, "skipped_bad": bad}
