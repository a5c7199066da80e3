"""Maps from what people record: geotagged photos, videos with a GNSS track (torch-free).

Both end in a CSV manifest (``path, lat, lon, heading, time, session``: what ``index build`` reads), written
next to the index, so that every later command sees ordinary database images with coordinates:

* **Photos** (``manifest_from_photos``): the position of each image from its own EXIF GPS block (Pillow's EXIF
  reader: JPEG, PNG, WebP, TIFF; HEIC when ``pillow-heif`` is installed): latitude, longitude, altitude, the GPS
  time (else DateTimeOriginal) and the image direction where present. Images without GPS are reported and kept
  without coordinates, or skipped with ``require_gps``.
* **Videos with a track** (``manifest_from_video``): the track is read with maintained parsers (GPX: gpxpy;
  NMEA 0183: pynmea2, RMC sentences, which carry the date; CSV: ``time`` (ISO 8601 or Unix seconds) with
  ``lat``/``lon`` or UTM ``east``/``north``). A frame's time is the video's start (its ``creation_time`` tag,
  else the track's first fix) plus the frame's presentation time plus ``offset`` seconds; its position and
  heading are interpolated linearly between the fixes around it. Frames are kept every ``every`` metres travelled
  (``2m``) or seconds (``0.5s``), so a stopped platform adds no frames; they are written as JPEG files under the
  output folder (named by their time in the video: a rerun reuses them). A track that does not overlap the video
  in time is refused in one line with both time spans.

The **session** of an image is the visit it belongs to: the folder of a photo, the video of a frame. Every
capture of one session lies in one folder of the database (the frames of ``drive.mp4`` in ``.../drive/``), which is
what ``PlaceIndex.segments`` and ``localize --exclude-session`` rely on.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.images import ImageLoadError, list_images
from ..utils import MAX_UNIX_S, atomic_write, parse_time
from .decision import EARTH_RADIUS_M, haversine
from .inputs import check_frame_size

#: photos further from the equator than this have no UTM frame: reported and indexed without coordinates
UTM_MAX_LAT = 84.0

MANIFEST_COLUMNS = ("path", "lat", "lon", "utm_east", "utm_north", "altitude", "heading", "time", "session")
#: the largest track file read (a day of 10 Hz NMEA is about 60 MB); EDGEVPR_MAX_TRACK_MB overrides
MAX_TRACK_BYTES = int(float(os.environ.get("EDGEVPR_MAX_TRACK_MB", 512)) * 2**20)
TRACK_EXTS = {".gpx": "gpx", ".nmea": "nmea", ".nmea0183": "nmea", ".log": "nmea", ".txt": "nmea", ".csv": "csv"}


# ------------------------------------------------------------------------------------------------------------ photos
class NoGps(ValueError):
    """No image of a folder has an EXIF GPS position."""


def looks_like_utm_names(folder: str | os.PathLike) -> bool:
    """Whether a folder's images carry their UTM position in their names (the '@east@north@' convention)."""
    from ..data.datasets import parse_utm_name

    for p in list_images(folder)[:1]:
        try:
            parse_utm_name(p)
            return True
        except ValueError:
            return False
    return False


def _rational(v) -> float:
    return float(v[0]) / float(v[1]) if isinstance(v, tuple) and len(v) == 2 else float(v)


def _ref(value) -> str:
    """An EXIF GPS reference ('N', b'S', a BYTE-typed 83, ' s\x00') -> its upper-case letter ('' if none)."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if isinstance(value, int):
        value = chr(value) if 0 < value < 128 else ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ").upper()[:1]


def _dms(value, ref) -> float:
    d, m, s = (_rational(x) for x in value)
    deg = d + m / 60 + s / 3600
    return -deg if _ref(ref) in ("S", "W") else deg


def _exif_time(text: str | None) -> float | None:
    """'YYYY:MM:DD HH:MM:SS' (EXIF, no zone: taken as UTC) -> Unix seconds."""
    try:
        return datetime.strptime(str(text).strip("\x00 "), "%Y:%m:%d %H:%M:%S").replace(
            tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def exif_position(path: str | os.PathLike) -> dict | None:
    """An image's EXIF GPS -> {lat, lon, altitude, heading, time} (None where absent), or None without a GPS
    position. ``time``: Unix seconds from the GPS date and time stamps (UTC), else DateTimeOriginal."""
    try:
        with Image.open(path) as im:
            exif = im.getexif()
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(path, f"cannot read its EXIF ({str(e).splitlines()[0]})") from None
    gps = exif.get_ifd(0x8825)
    try:
        lat, lon = _dms(gps[2], gps.get(1, "N")), _dms(gps[4], gps.get(3, "E"))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (abs(lat) <= 90 and abs(lon) <= 180) or (lat == 0 and lon == 0):
        return None
    out = {"lat": lat, "lon": lon, "altitude": None, "heading": None, "time": None}
    try:
        out["altitude"] = _rational(gps[6]) * (-1 if gps.get(5) in (1, b"\x01") else 1)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    try:
        out["heading"] = _rational(gps[17]) % 360
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    try:
        h, m, s = (_rational(x) for x in gps[7])
        day = datetime.strptime(str(gps[29]).strip("\x00 "), "%Y:%m:%d").replace(tzinfo=timezone.utc)
        out["time"] = day.timestamp() + h * 3600 + m * 60 + s
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        out["time"] = _exif_time(exif.get_ifd(0x8769).get(36867))
    return out


def _heif() -> None:
    try:  # HEIC/HEIF photos (iPhones): read when the optional plugin is installed
        from pillow_heif import register_heif_opener

        register_heif_opener()
    except ImportError:
        pass


def manifest_from_photos(folder: str | os.PathLike, out_csv: str | os.PathLike, require_gps: bool = False,
                         min_spacing_m: float = 0.0) -> tuple[Path, dict]:
    """The images of ``folder`` (sorted by name; subfolders are sessions) -> a manifest CSV of their EXIF
    positions, and a report {"photos", "with_gps", "without_gps": [names], "skipped_close"}. ``min_spacing_m``:
    an image closer than this to the previous kept one of its session is left out (a stopped platform)."""
    _heif()
    folder = Path(folder)
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"{folder}: no images in this folder")
    rows, missing, close = [], [], 0
    last: dict[str, tuple[float, float]] = {}
    for p in paths:
        try:
            pos = exif_position(p)
        except ImageLoadError:  # unreadable: index build reports it (or stops on it) as for any folder
            pos = None
        session = str(Path(p).parent.relative_to(folder)) if Path(p).parent != folder else folder.name
        if pos is not None and abs(pos["lat"]) > UTM_MAX_LAT:  # no UTM frame there: reported, indexed without
            pos = None
        if pos is None:
            missing.append(str(p))
            if not require_gps:
                rows.append({"path": os.path.abspath(p), "session": session})
            continue
        prev = last.get(session)
        if prev is not None and min_spacing_m > 0 and \
                float(haversine(prev[0], prev[1], pos["lat"], pos["lon"])) < min_spacing_m:
            close += 1
            continue
        last[session] = (pos["lat"], pos["lon"])
        rows.append({"path": os.path.abspath(p), **pos, "session": session})
    if not any("lat" in r for r in rows):
        raise NoGps(f"{folder}: none of its {len(paths)} images has an EXIF GPS position")
    return _write_manifest(out_csv, rows), {"photos": len(paths), "with_gps": len(paths) - len(missing),
                                            "without_gps": missing, "skipped_close": close,
                                            "indexed": len(rows)}


# ------------------------------------------------------------------------------------------------------------ tracks
@dataclass
class Track:
    """A GNSS track: fix times [T] (Unix seconds, increasing) and positions: lat/lon [T] degrees, or east/north
    [T] UTM metres (NaN for the kind the track lacks)."""

    time: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    east: np.ndarray
    north: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if len(self.time) < 2:
            raise ValueError(f"{self.source}: a track needs at least two timed fixes ({len(self.time)} found)")
        order = np.argsort(self.time, kind="stable")
        for name in ("time", "lat", "lon", "east", "north"):
            setattr(self, name, np.asarray(getattr(self, name), np.float64)[order])
        keep = np.r_[True, np.diff(self.time) > 0]  # one fix per instant
        for name in ("time", "lat", "lon", "east", "north"):
            setattr(self, name, getattr(self, name)[keep])

    @property
    def geo(self) -> bool:
        return bool(np.isfinite(self.lat).all())

    def span(self) -> tuple[float, float]:
        return float(self.time[0]), float(self.time[-1])

    def at(self, t: float) -> dict | None:
        """Position and heading at time ``t`` (linear between the fixes around it) -> {lat, lon} or {utm_east,
        utm_north}, plus heading (degrees clockwise from north, from the positions 0.5 s either side); None outside
        the track."""
        if not self.time[0] <= t <= self.time[-1]:
            return None
        a, b = (np.interp(t, self.time, x) for x in ((self.lat, self.lon) if self.geo else (self.east, self.north)))
        t0, t1 = max(t - 0.5, self.time[0]), min(t + 0.5, self.time[-1])
        a0, b0 = (np.interp(t0, self.time, x) for x in ((self.lat, self.lon) if self.geo else (self.east, self.north)))
        a1, b1 = (np.interp(t1, self.time, x) for x in ((self.lat, self.lon) if self.geo else (self.east, self.north)))
        if self.geo:
            dx = math.radians(b1 - b0) * math.cos(math.radians(a)) * EARTH_RADIUS_M
            dy = math.radians(a1 - a0) * EARTH_RADIUS_M
        else:
            dx, dy = b1 - b0, a1 - a0
        heading = math.degrees(math.atan2(dx, dy)) % 360 if math.hypot(dx, dy) > 0.05 else None
        pos = {"lat": float(a), "lon": float(b)} if self.geo else {"utm_east": float(a), "utm_north": float(b)}
        return {**pos, "heading": heading}

    def metres(self, p: dict, q: dict) -> float:
        if self.geo:
            return float(haversine(p["lat"], p["lon"], q["lat"], q["lon"]))
        return math.hypot(p["utm_east"] - q["utm_east"], p["utm_north"] - q["utm_north"])


def read_track(path: str | os.PathLike) -> Track:
    """A GPX, NMEA 0183 or CSV track (by extension) -> Track; ValueError in one line naming the file and what is
    wrong."""
    path = Path(path)
    kind = TRACK_EXTS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: a track is .gpx, .nmea (NMEA 0183) or .csv")
    try:
        size = path.stat().st_size
        if size > MAX_TRACK_BYTES:  # checked before reading: the whole file is parsed in memory
            raise ValueError(f"{path}: {size} bytes, over the {MAX_TRACK_BYTES} a track may have "
                             "(EDGEVPR_MAX_TRACK_MB raises it)")
        text = path.read_text(errors="replace")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the track ({e.strerror or e})") from None
    t, a, b, bad = [], [], [], []  # good fixes; what was skipped

    def add(where: str, tj: float, aj: float, bj: float) -> None:
        """Keep a fix, or skip and report it: a bad fix (NaN, inf, out of range) never spreads over the recording."""
        lim = (90.0, 180.0) if geo else (1e8, 1e8)
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (tj, aj, bj)) and abs(aj) <= lim[0] and \
                abs(bj) <= lim[1] and abs(tj) <= MAX_UNIX_S:
            t.append(tj)
            a.append(aj)
            b.append(bj)
        else:
            bad.append(f"{where}: fix ({tj}, {aj}, {bj}) is not finite or out of range")

    geo = True
    if kind == "gpx":
        import gpxpy
        import gpxpy.gpx

        try:
            gpx = gpxpy.parse(text)
        except gpxpy.gpx.GPXException as e:
            raise ValueError(f"{path}: not a readable GPX file ({str(e).splitlines()[0]})") from None
        points = [p for tr in gpx.tracks for seg in tr.segments for p in seg.points] or \
                 [p for r in gpx.routes for p in r.points]
        for n, p in enumerate(points, start=1):
            if p.time is not None:
                tm = p.time if p.time.tzinfo else p.time.replace(tzinfo=timezone.utc)
                add(f"point {n}", tm.timestamp(), p.latitude, p.longitude)
        geo = True
    elif kind == "nmea":
        import pynmea2

        for n, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line.startswith("$") or "RMC," not in line[:7]:
                continue
            try:
                msg = pynmea2.parse(line)
            except pynmea2.ParseError:
                continue
            try:
                if getattr(msg, "status", "A") != "A" or msg.datestamp is None or msg.timestamp is None:
                    continue
                tm = datetime.combine(msg.datestamp, msg.timestamp)
                fix = ((tm if tm.tzinfo else tm.replace(tzinfo=timezone.utc)).timestamp(), msg.latitude, msg.longitude)
            except (ValueError, TypeError, OverflowError) as e:  # day 32, month 13, a garbled field
                bad.append(f"line {n}: {str(e)[:60]}")
                continue
            add(f"line {n}", *fix)
        geo = True
        if not t:
            raise ValueError(f"{path}: no valid RMC sentences (NMEA 0183 fixes with a date) in it")
    else:
        rows = list(csv.DictReader(text.splitlines()))
        cols = set(rows[0]) if rows else set()
        geo = {"lat", "lon"} <= cols
        if "time" not in cols or not (geo or {"east", "north"} <= cols):
            raise ValueError(f"{path}: a CSV track needs columns time and lat,lon (or east,north)")
        for i, r in enumerate(rows, start=2):
            try:
                fix = (parse_time(r["time"], f"line {i}"), float(r["lat" if geo else "north"]),
                       float(r["lon" if geo else "east"]))
            except (TypeError, ValueError) as e:
                bad.append(str(e) if str(e).startswith("line") else f"line {i}: not a number ({e})")
                continue
            add(f"line {i}", *fix)
    if bad:
        from ..integrity import warn

        warn(f"{path}: skipped {len(bad)} bad fix(es), kept {len(t)} (first: {bad[0]})")
    if len(t) < 2:
        raise ValueError(f"{path}: a track needs at least two good timed fixes ({len(t)} found"
                         + (f"; {len(bad)} bad, first: {bad[0]})" if bad else ")"))
    nan = np.full(len(t), np.nan)
    if geo:
        return Track(np.array(t), np.array(a), np.array(b), nan, nan, str(path))
    return Track(np.array(t), nan, nan, np.array(b), np.array(a), str(path))


# ------------------------------------------------------------------------------------------------------------ videos
def parse_every(text: str) -> tuple[float, str]:
    """'2m' -> (2.0, 'm'); '0.5s' -> (0.5, 's'); ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(m|s)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--every {text!r}: a distance in metres ('2m') or a time in seconds ('0.5s'), > 0")
    return float(m.group(1)), m.group(2)


def _fmt(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def manifest_from_video(video: str | os.PathLike, track: Track, out_dir: str | os.PathLike, every: str = "2m",
                        offset: float = 0.0, max_side: int = 1280) -> tuple[Path, dict]:
    """A video and its track -> frames kept every ``every`` (see ``parse_every``), written as JPEG under
    ``out_dir/<video stem>/`` (longest side at most ``max_side`` px), and a manifest CSV ``out_dir/<stem>.csv``;
    and a report {"frames_decoded", "kept", "outside_track", "video_span", "track_span", "start_from"}."""
    try:
        import av
    except ImportError:
        raise ValueError(f"{video}: making a map from a video needs PyAV, which this install lacks: pip install "
                         "'edgevpr[video]'") from None

    video, out_dir = Path(video), Path(out_dir)
    parse_every(every)  # a bad --every is refused before the video is opened
    try:
        container = av.open(str(video))
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"{video}: not a readable video ({str(e).splitlines()[0]})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{video}: no video stream in the file")
        stream = container.streams.video[0]
        check_frame_size(stream, video)
        created = container.metadata.get("creation_time") or stream.metadata.get("creation_time")
        start = parse_time(created, str(video)) if created else track.time[0]
        start += offset
        duration = float(stream.duration * stream.time_base) if stream.duration else \
            (container.duration / 1e6 if container.duration else 0.0)
        lo, hi = track.span()
        if start + duration < lo or start > hi:
            raise ValueError(f"{video}: the video ({_fmt(start)} to {_fmt(start + duration)}) and the track "
                             f"{track.source} ({_fmt(lo)} to {_fmt(hi)}) do not overlap in time; give --track-offset "
                             "SECONDS (added to the video's times)")
        frames = ((start + float(f.time or 0.0), float(f.time or 0.0), f.to_image) for f in container.decode(stream))
        rows, decoded, outside = keep_frames(frames, track, every, out_dir / video.stem, video.stem, max_side)
    if not rows:
        raise ValueError(f"{video}: no frame falls inside the track {track.source} (check --track-offset)")
    return _write_manifest(out_dir / f"{video.stem}.csv", rows), {
        "frames_decoded": decoded, "kept": len(rows), "outside_track": outside,
        "video_span": [_fmt(start), _fmt(start + duration)], "track_span": [_fmt(lo), _fmt(hi)],
        "start_from": "creation_time" if created else "the track's first fix"}


def keep_frames(frames, track: Track, every: str, frames_dir: Path, session: str,
                max_side: int = 1280) -> tuple[list[dict], int, int]:
    """Timed frames (absolute time s, time within the recording s, a function returning the image) and their
    track -> the manifest rows of the frames kept every ``every`` (``parse_every``; positions interpolated at each
    frame's time), their JPEGs written under ``frames_dir`` (longest side at most ``max_side`` px; a file already
    there is kept: a resumed build), and the counts of frames seen and of frames outside the track."""
    step, unit = parse_every(every)
    frames_dir.mkdir(parents=True, exist_ok=True)
    rows, seen, outside, last = [], 0, 0, None
    for t, rel, image in frames:
        seen += 1
        pos = track.at(t)
        if pos is None:
            outside += 1
            continue
        # a millimetre / microsecond of slack: a frame exactly `step` away is kept despite rounding
        if last is not None and (track.metres(last[1], pos) < step - 1e-3 if unit == "m" else
                                 t - last[0] < step - 1e-6):
            continue
        last = (t, pos)
        name = frames_dir / f"{session}_{int(round(rel * 1000)):09d}ms.jpg"
        if not name.is_file():
            img = image().convert("RGB")
            if max(img.size) > max_side:
                img.thumbnail((max_side, max_side), Image.BICUBIC)
            atomic_write(name, lambda tmp, img=img: img.save(tmp, format="JPEG", quality=92))
        rows.append({"path": os.path.abspath(name), **pos, "time": t, "session": session})
    return rows, seen, outside


def manifest_from_bag(bag: str | os.PathLike, image_topic: str, gnss_topic: str, out_dir: str | os.PathLike,
                      every: str = "2m", max_side: int = 1280) -> tuple[Path, dict]:
    """A robot recording (``bags``) -> the frames of ``image_topic`` kept every ``every`` with positions from the
    NavSatFix of ``gnss_topic`` at each message's time, written as ``manifest_from_video`` writes a video's; and a
    report {"frames", "kept", "outside_track", "fixes", "skipped_no_fix", "skipped_bad"}."""
    from .bags import bag_frames, bag_track

    bag, out_dir = Path(bag), Path(out_dir)
    track, fixes = bag_track(bag, gnss_topic)
    stem = bag.stem if bag.is_file() else bag.name

    def timed():  # (message time, time since the first frame, its image)
        start = None
        for f in bag_frames(bag, image_topic):
            start = f.time if start is None else start
            yield f.time, f.time - start, lambda im=f.image: im

    rows, seen, outside = keep_frames(timed(), track, every, out_dir / stem, stem, max_side)
    if not rows:
        raise ValueError(f"{bag}: no frame of {image_topic} falls inside the fixes of {gnss_topic}")
    return _write_manifest(out_dir / f"{stem}.csv", rows), {"frames": seen, "kept": len(rows),
                                                            "outside_track": outside, **fixes}


def _write_manifest(path: str | os.PathLike, rows: list[dict]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, MANIFEST_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r[k]) for k in MANIFEST_COLUMNS})

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path
