"""Maps from recordings (deploy/recordings.py): a video with a GPX or NMEA track, photos with EXIF GPS."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from edgevpr.cli import main
from edgevpr.deploy import index as idx
from edgevpr.deploy import recordings as rec
from edgevpr.deploy.inputs import write_video
from tests.conftest import shared_data

LAT0, LON0, SPEED = -27.4775, 153.0280, 5.0  # a walk due north at 5 m/s from here
START = datetime(2026, 5, 1, 10, 0, 0, tzinfo=timezone.utc)
M_PER_DEG = 6_371_008.8 * math.pi / 180


def _lat(t: float) -> float:
    return LAT0 + SPEED * t / M_PER_DEG


def _video(path, folder: str, start: datetime = START):
    """Gardens Point frames 0-39 of ``folder`` as a 10 fps video (4 s) whose creation_time is ``start``."""
    gp = shared_data() / "gardens_point" / folder
    return write_video(path, [gp / f"Image{i:03d}.jpg" for i in range(40)], (640, 480), fps=10,
                       creation_time=start.strftime("%Y-%m-%dT%H:%M:%S.000000Z"))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return _video(tmp_path_factory.mktemp("rec") / "walk.mp4", "day_right")


def _gpx(path, shift_s: float = 0.0):
    import gpxpy.gpx

    g = gpxpy.gpx.GPX()
    seg = gpxpy.gpx.GPXTrackSegment()
    for t in range(-2, 8):  # one fix a second, 2 s before to 3 s after the video
        seg.points.append(gpxpy.gpx.GPXTrackPoint(_lat(t), LON0, time=datetime.fromtimestamp(
            START.timestamp() + t + shift_s, timezone.utc)))
    track = gpxpy.gpx.GPXTrack()
    track.segments.append(seg)
    g.tracks.append(track)
    path.write_text(g.to_xml())
    return path


def _nmea(path):
    import pynmea2

    lines = []
    for t in range(-2, 8):
        when = datetime.fromtimestamp(START.timestamp() + t, timezone.utc)
        lat = _lat(t)
        dm = lambda v, w: f"{int(abs(v)):0{w}d}{(abs(v) % 1) * 60:07.4f}"  # noqa: E731  (ddmm.mmmm)
        lines.append(str(pynmea2.RMC("GP", "RMC", (when.strftime("%H%M%S.00"), "A", dm(lat, 2), "S" if lat < 0 else "N",
                                                   dm(LON0, 3), "E", "9.7", "0.0", when.strftime("%d%m%y"), "", ""))))
        lines.append(str(pynmea2.GGA("GP", "GGA", (when.strftime("%H%M%S.00"), dm(lat, 2), "S", dm(LON0, 3), "E", "1",
                                                   "08", "0.9", "10.0", "M", "0.0", "M", "", ""))))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["gpx", "nmea"])
def test_video_frames_get_the_tracks_positions_every_2_m(video, tmp_path, kind):
    """At 5 m/s and 10 fps a frame comes every 0.5 m: every 2 m keeps every 4th frame, each at the position the
    track has at its time (within 0.5 m; NMEA's 4 decimals of a minute are 0.2 m), heading north."""
    track = rec.read_track(_gpx(tmp_path / "t.gpx") if kind == "gpx" else _nmea(tmp_path / "t.nmea"))
    manifest, report = rec.manifest_from_video(video, track, tmp_path / "recordings", "2m")
    assert report["frames_decoded"] == 40 and report["start_from"] == "creation_time"
    rows = idx.read_rows(manifest)
    assert report["kept"] == len(rows) == 10
    for i, r in enumerate(rows):
        t = 0.4 * i  # frames 0, 4, 8, ... at 10 fps
        assert abs((r.lat - _lat(t)) * M_PER_DEG) < 0.5 and abs(r.lon - LON0) * M_PER_DEG < 0.5, (i, r)
    assert np.allclose(np.diff([r.north for r in rows]), 2.0, atol=0.5)  # UTM too, 2 m apart
    with open(manifest) as f:
        heading = [line.split(",")[6] for line in f.read().splitlines()[1:]]
    assert all(abs(float(h)) < 1 or abs(float(h) - 360) < 1 for h in heading)
    # and the frames are real images an index is built from
    assert main(["index", "build", "--model", "pixels-patchnorm", "--images", str(video), "--track",
                 str(tmp_path / ("t.gpx" if kind == "gpx" else "t.nmea")), "--every", "2m", "--out",
                 str(tmp_path / "i"), "--quiet"]) == 0
    pi = idx.PlaceIndex.open(tmp_path / "i")
    assert len(pi) == 10 and np.isfinite(pi.coordinates().lat).all()


def test_every_seconds_and_a_track_that_does_not_overlap(video, tmp_path, capsys):
    track = rec.read_track(_gpx(tmp_path / "t.gpx"))
    _, report = rec.manifest_from_video(video, track, tmp_path / "r", "1s")
    assert report["kept"] == 4  # 0, 1, 2, 3 s
    late = _gpx(tmp_path / "late.gpx", shift_s=3600)
    assert main(["index", "build", "--model", "pixels-patchnorm", "--images", str(video), "--track", str(late),
                 "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not overlap in time" in err[0] and "2026-05-01 10:00:00 UTC" in err[0] and \
        "--track-offset" in err[0]
    # the offset that aligns them is accepted
    _, report = rec.manifest_from_video(video, rec.read_track(late), tmp_path / "r2", "2m", offset=3600)
    assert report["kept"] == 10


def _photo(path, gps: dict | None):
    img = Image.open(shared_data() / "gardens_point" / "day_right" / "Image010.jpg")
    exif = Image.Exif()
    if gps is not None:
        exif[0x8825] = gps
    img.save(path, exif=exif)


def test_photos_are_indexed_at_their_exif_positions(tmp_path, capsys):
    folder = tmp_path / "visit"
    folder.mkdir()
    _photo(folder / "a.jpg", {1: "S", 2: (27.0, 28.0, 39.0), 3: "E", 4: (153.0, 1.0, 40.8), 17: 90.0,
                              29: "2026:05:01", 7: (10.0, 0.0, 5.0)})
    _photo(folder / "b.jpg", {1: "S", 2: (27.0, 28.0, 40.0), 3: "E", 4: (153.0, 1.0, 40.8)})
    _photo(folder / "c.jpg", None)
    pos = rec.exif_position(folder / "a.jpg")
    assert pos["lat"] == pytest.approx(-(27 + 28 / 60 + 39 / 3600)) and pos["lon"] == pytest.approx(153 + 1 / 60 +
                                                                                                     40.8 / 3600)
    assert pos["heading"] == 90.0 and pos["time"] == START.timestamp() + 5
    assert main(["index", "build", "--model", "pixels-patchnorm", "--images", str(folder), "--out",
                 str(tmp_path / "i"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no EXIF GPS position: " in err and "c.jpg" in err and "2 of 3 photos with an EXIF GPS position" in err
    pi = idx.PlaceIndex.open(tmp_path / "i")
    c = pi.coordinates()
    assert len(pi) == 3 and np.isfinite(c.lat).sum() == 2
    assert min(abs(c.lat[np.isfinite(c.lat)] - pos["lat"])) < 1e-9
    assert main(["index", "build", "--model", "pixels-patchnorm", "--images", str(folder), "--out",
                 str(tmp_path / "j"), "--quiet", "--require-gps"]) == 0
    assert len(idx.PlaceIndex.open(tmp_path / "j")) == 2


def test_sessions_are_listed_excluded_removed_and_drawn(video, tmp_path, capsys):
    """Two visits of one route (day_right, and day_left a day later, each a video with its track): `index info`
    lists them with their times; `localize --exclude-session` answers a frame of one visit from the other only;
    `index remove --session` takes one out and leaves a verified index; `index info --plot` draws the coverage."""
    day = 86400.0
    second = _video(tmp_path / "walk2.mp4", "day_left", datetime.fromtimestamp(START.timestamp() + day, timezone.utc))
    index = tmp_path / "map"
    assert main(["index", "build", "--model", "pixels-patchnorm", "--images", str(video), "--track",
                 str(_gpx(tmp_path / "t1.gpx")), "--out", str(index), "--quiet"]) == 0
    assert main(["index", "add", "--images", str(second), "--track", str(_gpx(tmp_path / "t2.gpx", shift_s=day)),
                 "--index", str(index), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(index)]) == 0  # for people: a table, ISO times, whole metres
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| walk")]
    first = datetime.fromtimestamp(START.timestamp(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert len(table) == 2 and table[0].startswith(f"| walk | 10 | 10 | 18 m | {first} |"), table
    assert main(["index", "info", str(index), "--json", "--plot", str(tmp_path / "map.png")]) == 0
    info = json.loads(capsys.readouterr().out)
    s = {x["session"]: x for x in info["sessions"]}
    assert set(s) == {"walk", "walk2"} and s["walk"]["images"] == s["walk2"]["images"] == 10
    assert s["walk2"]["first_time"] - s["walk"]["first_time"] == pytest.approx(day)
    assert s["walk"]["route_m"] == pytest.approx(18.0, abs=0.5)
    assert (tmp_path / "map.png").stat().st_size > 5000
    pts = idx.PlaceIndex.open(index).positions()  # what the page colours its map by
    assert pts["sessions"] == ["walk", "walk2"] and pts["session"] == [0] * 10 + [1] * 10
    _page_colours_sessions(index)
    frame = sorted((index / "recordings" / "walk").glob("*.jpg"))[3]
    assert main(["localize", "--index", str(index), str(frame), "-k", "3", "--json", "--sequence", "1"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["matches"][0]["path"] == str(frame)  # itself, from its own session
    assert main(["localize", "--index", str(index), str(frame), "-k", "3", "--json", "--sequence", "1",
                 "--exclude-session", "walk"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert all("/walk2/" in m["path"] for m in res["matches"]) and "/walk2/" in res["sequence"]["match"]["path"]
    assert main(["index", "remove", "--index", str(index), "--session", "walk2"]) == 0
    assert "11 file(s) the map owned (recorded frames, their manifests) deleted" in capsys.readouterr().out
    assert main(["index", "info", str(index), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    pi = idx.PlaceIndex.open(index)
    assert len(pi) == 10 and [x["session"] for x in pi.sessions()] == ["walk"]
    # no orphans: the files under recordings/ are exactly the frames the map still holds, and walk's manifest
    on_disk = {str(p) for p in (index / "recordings").rglob("*") if p.is_file()}
    assert on_disk == {r[0] for r in pi.rows(list(range(10))).values()} | {str(index / "recordings" / "walk.csv")}
    assert main(["index", "remove", "--index", str(index), "--session", "nope"]) == 2
    assert "no session 'nope'" in capsys.readouterr().err


def _page_colours_sessions(index) -> None:
    """The served page draws the two sessions' database points in two colours and names them in the legend."""
    import threading
    import time

    import uvicorn
    from playwright.sync_api import sync_playwright

    from edgevpr.deploy.localize import Localizer
    from edgevpr.deploy.service import create_app
    from tests.conftest import ROOT, free_port
    from tests.test_service import _browser

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(Localizer(index)), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the test server did not start within 30 s"
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("circle.db-point")
            fills = page.evaluate("[...document.querySelectorAll('circle.db-point')].map(c => c.getAttribute('fill'))")
            assert len(fills) == 20 and len(set(fills[:10])) == len(set(fills[10:])) == 1 and fills[0] != fills[10]
            legend = page.inner_text("#map-legend")
            assert "Sessions: walk (grey), walk2 (blue)" in legend, legend
            page.screenshot(path=str(ROOT / "outputs" / "screenshots" / "page-sessions.png"))
            browser.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_hostile_tracks_and_videos_are_refused_before_the_work(video, tmp_path, monkeypatch):
    """A track over the size limit is refused before it is read; a video whose declared frames exceed the pixel
    limit is refused before any frame is decoded (for maps and for localize); an entity-bomb GPX is one line."""
    import edgevpr.deploy.inputs as inputs

    big = _gpx(tmp_path / "t.gpx")
    monkeypatch.setattr(rec, "MAX_TRACK_BYTES", 100)
    with pytest.raises(ValueError, match=r"t.gpx: \d+ bytes, over the 100 a track may have"):
        rec.read_track(big)
    monkeypatch.undo()
    monkeypatch.setattr(inputs, "DEFAULT_MAX_PIXELS", 640 * 480 - 1)
    with pytest.raises(OSError, match=r"frames of 640x480 = 307200 pixels exceed the limit"):
        rec.manifest_from_video(video, rec.read_track(big), tmp_path / "r")
    assert not (tmp_path / "r" / "walk").exists() or not any((tmp_path / "r" / "walk").iterdir())
    with pytest.raises(OSError, match="exceed the limit"):
        next(iter(inputs.Stream([video])))
    monkeypatch.undo()
    bomb = tmp_path / "bomb.gpx"
    lol = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    bomb.write_text(f'<?xml version="1.0"?><!DOCTYPE g [<!ENTITY l0 "lol">{lol}]><gpx version="1.1" creator="&l9;">'
                    "</gpx>")
    with pytest.raises(ValueError, match="bomb.gpx: not a readable GPX file"):
        rec.read_track(bomb)


def test_a_video_without_its_track_is_one_line_that_names_track_and_leaves_nothing(video, tmp_path, capsys):
    assert main(["index", "build", "--model", "pixels-patchnorm", "--images", str(video), "--out",
                 str(tmp_path / "map"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--track" in err[0] and video.name in err[0], err  # was: "give an image folder ..."
    assert not (tmp_path / "map").exists()


def test_a_map_travels_a_moved_one_answers_verifies_and_serves_thumbnails(video, tmp_path, capsys):
    """A map of a recording (frames inside its folder, stored relative to it) copied elsewhere and the original
    deleted: it answers from the copy, verifies, and its thumbnails load. A map of images outside its folder whose
    images moved: `--verify` says so in one line naming `index relocate`; a wrong `--root` changes nothing; the
    right one makes it answer and verify again."""
    import shutil

    from fastapi.testclient import TestClient

    from edgevpr.deploy.localize import Localizer
    from edgevpr.deploy.service import create_app

    first = tmp_path / "a" / "map"
    assert main(["index", "build", "--model", "pixels-patchnorm", "--images", str(video), "--track",
                 str(_gpx(tmp_path / "t.gpx")), "--out", str(first), "--quiet"]) == 0
    moved = tmp_path / "b" / "map"
    shutil.copytree(first, moved)
    shutil.rmtree(tmp_path / "a")
    frame = sorted((moved / "recordings" / "walk").glob("*.jpg"))[4]
    capsys.readouterr()
    assert main(["localize", "--index", str(moved), str(frame), "-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["matches"][0]["path"] == str(frame)
    assert main(["index", "info", str(moved), "--verify"]) == 0
    assert idx.PlaceIndex.open(moved).resolve("../../etc/passwd") == ""  # a stored path never leaves the folder
    client = TestClient(create_app(Localizer(moved)))
    for i in range(3):
        r = client.get(f"/api/thumb/{i}")
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
    # images outside the map's folder, then moved
    gp = shared_data() / "gardens_point" / "day_right"
    photos = tmp_path / "photos" / "day_right"
    photos.mkdir(parents=True)
    for i in range(12):
        shutil.copy(gp / f"Image{i:03d}.jpg", photos)
    ext = tmp_path / "ext.index"
    assert main(["index", "build", "--model", "pixels-patchnorm", "--images", str(photos), "--out", str(ext),
                 "--quiet"]) == 0
    assert idx.read_manifest(ext)["image_root"] == {"stored": str(photos), "now": None}
    shutil.move(str(tmp_path / "photos"), str(tmp_path / "elsewhere"))
    capsys.readouterr()
    assert main(["index", "info", str(ext), "--verify"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert "12 database image(s) not found" in report["problems"][0] and "index relocate" in report["problems"][0]
    before = (ext / "manifest.json").read_bytes()
    assert main(["index", "relocate", "--index", str(ext), "--root", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "12 of the map's 12 images are not there" in err[0], err
    assert (ext / "manifest.json").read_bytes() == before
    assert main(["index", "relocate", "--index", str(ext), "--root", str(tmp_path / "elsewhere" / "day_right")]) == 0
    assert main(["index", "info", str(ext), "--verify"]) == 0
    capsys.readouterr()
    assert main(["localize", "--index", str(ext), str(gp / "Image005.jpg"), "-k", "1", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["results"][0]["matches"][0]["path"]
    assert top == str(tmp_path / "elsewhere" / "day_right" / "Image005.jpg")
    assert TestClient(create_app(Localizer(ext))).get("/api/thumb/5").status_code == 200
