"""The photos a robot has, as one ordered stream: files, folders, lists, CSV manifests and video files.

Each input of ``edgevpr localize`` may be
  * an image file;
  * a folder: its images, sorted by name (capture order for the usual frame-numbered names);
  * a ``.txt`` list: one image path per line (relative paths from the list's folder; blank lines and ``#``
    comments ignored);
  * a ``.csv`` manifest with a ``path`` column (the format ``index build`` reads);
  * a video file (``.mp4 .mov .avi .mkv .webm .m4v``), decoded with PyAV (FFmpeg's libraries; part of the
    ``runtime`` extra), every ``stride``-th frame, named ``VIDEO#frameN``, with its presentation time;
  * a live source PyAV opens: a camera device (``/dev/video0``) or a network stream URL (``rtsp://``,
    ``rtmp://``, ``udp://``, ``http(s)://``, ``srt://``); such a stream is ``live`` (it does not wait for the
    consumer: ``pipeline.Pipeline`` drops frames rather than falls behind it).
The stream is lazy (a long video is never held in memory). An unreadable item raises a one-line
``ImageLoadError`` naming it, or with ``skip_bad`` is reported in ``skipped`` and the stream goes on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from PIL import Image

from ..data.images import DEFAULT_MAX_PIXELS, ImageLoadError, list_images, load_image
from .bags import bag_frames, is_bag

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
LIVE_PREFIXES = ("rtsp://", "rtmp://", "udp://", "http://", "https://", "srt://", "/dev/video")


#: how long a live source (camera, stream URL) may send nothing before it ends in one line (``--stream-timeout``)
STREAM_TIMEOUT_S = 10.0


def is_live(item: str | os.PathLike) -> bool:
    """A camera device or a network stream (not a file that waits for its reader)."""
    return str(item).startswith(LIVE_PREFIXES)


@dataclass
class Frame:
    """One image of a stream; ``sequence`` names the capture sequence it belongs to: its folder, list, manifest or
    video, or "" for photos given one by one (consecutive ones form one sequence)."""

    name: str
    image: Image.Image
    sequence: str = ""
    time: float | None = None  # seconds on the source's clock (video presentation time), when it has one


@dataclass
class Stream:
    """The frames of ``inputs`` in order; ``skipped`` collects (name, reason) of what ``skip_bad`` passed over."""

    inputs: list[str | os.PathLike]
    stride: int = 1
    skip_bad: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    timeout: float = STREAM_TIMEOUT_S  # a live source that sends nothing for this long ends in one line
    topic: str | None = None  # robot recordings (``bags``): the image topic to read

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"--stride {self.stride}: must be >= 1")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"--stream-timeout {self.timeout}: must be a positive number of seconds")

    @property
    def live(self) -> bool:
        """Whether any input is a live source (a camera or network stream)."""
        return any(is_live(i) for i in self.inputs)

    def size(self) -> int | None:
        """How many frames the stream holds, counted from the file lists without decoding anything (before
        ``stride``; None when an input is a video, a camera or a stream, whose frames are known only by reading)."""
        n = 0
        for item in self.inputs:
            p = Path(item) if not is_live(item) else None
            if p is None or p.suffix.lower() in VIDEO_EXTS or is_bag(p):
                return None
            try:
                if p.is_dir():
                    n += len(list_images(p))
                elif p.suffix.lower() == ".txt":
                    n += len(read_list(p))
                elif p.suffix.lower() == ".csv":
                    from ..data.datasets import read_manifest

                    n += len(read_manifest(p)[0])
                else:
                    n += 1
            except (OSError, ValueError, KeyError, ImageLoadError):
                return None  # the stream itself will say what is wrong with it, in one line
        return n

    def __iter__(self) -> Iterator[Frame]:
        for item in self.inputs:
            try:
                yield from self._expand(item if is_live(item) else Path(item))
            except ImageLoadError as e:
                if not self.skip_bad:
                    raise
                self.skipped.append((e.path, e.reason))

    def _expand(self, p: Path | str) -> Iterator[Frame]:
        if is_live(p):
            yield from video_frames(p, self.stride, live=True, timeout=self.timeout)
        elif is_bag(p):
            if not self.topic:
                raise ValueError(f"{p}: a ROS bag holds many topics: give the camera's with --image-topic")
            yield from bag_frames(p, self.topic, self.stride)
        elif p.is_dir():
            paths = list_images(p)
            if not paths:
                raise ImageLoadError(p, "a folder without images")
            yield from self._files(paths, str(p))
        elif p.suffix.lower() in VIDEO_EXTS:
            yield from video_frames(p, self.stride)
        elif p.suffix.lower() == ".txt":
            listed = read_list(p, lines=True)
            yield from self._files([q for q, _ in listed], str(p), [f"{p}, line {n}" for _, n in listed])
        elif p.suffix.lower() == ".csv":
            from ..data.datasets import read_manifest

            try:
                paths = read_manifest(p)[0]
            except (ValueError, KeyError) as e:
                raise ImageLoadError(p, str(e).splitlines()[0]) from None
            yield from self._files(paths, str(p))
        else:
            yield from self._files([p], "")

    def _files(self, paths: list[Path], sequence: str, where: list[str] | None = None) -> Iterator[Frame]:
        """Load ``paths`` in order; ``where``: per path where it was listed ("LIST, line N"), named in errors."""
        for i, path in enumerate(paths):
            try:
                yield Frame(str(path), load_image(path), sequence)
            except ImageLoadError as e:
                if where is not None:
                    e = ImageLoadError(f"{where[i]}: {path}", e.reason)
                if not self.skip_bad:
                    raise e from None
                self.skipped.append((e.path, e.reason))


def read_list(path: Path, lines: bool = False) -> list:
    """A ``.txt`` list -> its image paths (relative ones from the list's folder); ``lines``: (path, line number)."""
    try:
        text = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageLoadError(path, f"cannot read the list ({e})") from None
    out = []
    for n, line in enumerate(text, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            q = Path(line)
            q = q if q.is_absolute() else path.parent / q
            out.append((q, n) if lines else q)
    return out


def video_frames(path: Path | str, stride: int = 1, live: bool = False,
                 timeout: float = STREAM_TIMEOUT_S) -> Iterator[Frame]:
    """Every ``stride``-th decoded frame of a video (or, ``live``, of a camera device or stream URL PyAV opens) as
    RGB images, named ``PATH#frameN`` (N counts from 0), with their presentation time in seconds. A live source
    that sends nothing for ``timeout`` seconds (while opening or between frames) ends in one line."""
    try:
        import av
    except ImportError:
        raise ImageLoadError(path, "reading video, cameras and streams needs PyAV, which this install lacks: pip "
                                   "install 'edgevpr[video]'") from None
    if not live and not Path(path).is_file():
        raise ImageLoadError(path, "no such file")
    stalled = (f"sent no data for {timeout:g} s (--stream-timeout, default {STREAM_TIMEOUT_S:g}, raises the "
               "wait)")
    try:
        container = av.open(str(path), timeout=(timeout, timeout) if live else None)
    except av.ExitError:
        raise ImageLoadError(path, stalled) from None
    except (av.FFmpegError, OSError) as e:
        raise ImageLoadError(path, f"not a readable {'stream' if live else 'video'} ({str(e).splitlines()[0]})") \
            from None
    with container:
        if not container.streams.video:
            raise ImageLoadError(path, "no video stream in the file")
        stream = container.streams.video[0]
        check_frame_size(stream, path)
        stream.thread_type = "AUTO"
        try:
            for n, frame in enumerate(container.decode(stream)):
                if n % stride == 0:
                    yield Frame(f"{path}#frame{n}", frame.to_image().convert("RGB"), str(path), frame.time)
        except av.ExitError:
            raise ImageLoadError(path, stalled) from None
        except av.FFmpegError as e:
            raise ImageLoadError(path, f"video decoding failed ({str(e).splitlines()[0]})") from None


def check_frame_size(stream, where) -> None:
    """Refuse a video stream whose declared frame size exceeds the image pixel limit (``EDGEVPR_MAX_PIXELS``)
    before any frame is decoded (a decoded frame is held whole)."""
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > DEFAULT_MAX_PIXELS:
        raise ImageLoadError(where, f"frames of {w}x{h} = {w * h} pixels exceed the limit of {DEFAULT_MAX_PIXELS} "
                                    "(EDGEVPR_MAX_PIXELS raises it)")


def write_video(path: str | os.PathLike, images: list[str | os.PathLike], size: tuple[int, int] = (640, 480),
                fps: float = 25, codec: str = "mpeg4", creation_time: str | None = None) -> Path:
    """Encode image files as a video (each resized to ``size`` = (width, height), ``fps`` frames per second) with
    PyAV, tagged with ``creation_time`` (ISO 8601) when given; for benchmarks, tests and examples that need a real
    video of known frames."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as out:
        if creation_time is not None:
            out.metadata["creation_time"] = creation_time
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for p in images:
            for packet in stream.encode(av.VideoFrame.from_image(load_image(p).resize(size))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
