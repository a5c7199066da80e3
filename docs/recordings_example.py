"""Make the two recordings behind docs/coverage.png: Gardens Point day_right and night_right 0-99 as two 2 fps
videos of a 200 m walk (120 m north, then 80 m east, at 4 m/s; the night walk a day later on the other side of the
path), each with a GPX track written here (Gardens Point has no GNSS: the track is made up, the frames are real).

    python docs/recordings_example.py OUT_DIR
    edgevpr index build --images OUT_DIR/walk_day.mp4 --track OUT_DIR/walk_day.gpx --every 2m --out campus.index
    edgevpr index add --images OUT_DIR/walk_night.mp4 --track OUT_DIR/walk_night.gpx --index campus.index
    edgevpr index info campus.index --plot coverage.png
"""

from __future__ import annotations

import math
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import gpxpy.gpx

from edgevpr.deploy.inputs import write_video

GP = Path(os.environ.get("EDGEVPR_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / \
    "gardens_point"
START = datetime(2026, 5, 1, 10, 0, 0, tzinfo=timezone.utc)
LAT0, LON0, M_PER_DEG = -27.4775, 153.0280, 6371008.8 * math.pi / 180


def position(d: float, side: float) -> tuple[float, float]:
    """Lat/lon ``d`` metres along the walk, ``side`` metres to its right."""
    north, east = (d, side) if d <= 120 else (120 - side, d - 120)
    return LAT0 + north / M_PER_DEG, LON0 + east / (M_PER_DEG * math.cos(math.radians(LAT0)))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, folder, day, side in (("walk_day", "day_right", 0, 0.0), ("walk_night", "night_right", 1, 1.5)):
        start = START + timedelta(days=day)
        write_video(out / f"{name}.mp4", [GP / folder / f"Image{i:03d}.jpg" for i in range(100)], (640, 360),
                    fps=2, creation_time=start.strftime("%Y-%m-%dT%H:%M:%S.000000Z"))
        gpx, segment = gpxpy.gpx.GPX(), gpxpy.gpx.GPXTrackSegment()
        for t in range(52):
            lat, lon = position(4.0 * t, side)
            segment.points.append(gpxpy.gpx.GPXTrackPoint(lat, lon, time=start + timedelta(seconds=t)))
        track = gpxpy.gpx.GPXTrack()
        track.segments.append(segment)
        gpx.tracks.append(track)
        (out / f"{name}.gpx").write_text(gpx.to_xml())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "recordings"))
