"""The HTTP service over real sockets (good photo, corrupt file, oversize upload) and its web page in Chromium."""

from __future__ import annotations

import io
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from edgevpr.deploy import index as idx
from edgevpr.deploy.localize import Localizer
from edgevpr.deploy.service import ServiceLimits, create_app
from tests.conftest import ROOT, free_port, shared_data

QUERY = "Image050.jpg"  # a Gardens Point night photo; the default model ranks its day frame 050 first


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default model's index of Gardens Point day_right (coordinates along a route from a CSV manifest,
    calibrated on night 0-49 and 80 Nordland frames of unknown places at precision 0.85, single frames and sequences
    of 4), served on a free localhost port."""
    import uvicorn

    from edgevpr.data.images import load_image
    from edgevpr.deploy.decision import Neighbourhood
    from edgevpr.deploy.inputs import Frame
    from edgevpr.models.model import load_model

    data = shared_data()
    tmp = tmp_path_factory.mktemp("service")
    root = tmp / "index"
    gp = data / "gardens_point"
    with open(tmp / "db.csv", "w") as f:
        f.write("path,place_id,lat,lon\n")
        for i in range(100):
            f.write(f"{gp / 'day_right' / f'Image{i:03d}.jpg'},{i},{-27.4775 + i * 2e-5},153.028\n")
    model = load_model("effnet-lite0-gem")
    idx.build(model, tmp / "db.csv", root, spec="effnet-lite0-gem", progress=False)
    loc = Localizer(root, model)
    loc.calibrate([Frame(str(p), load_image(p)) for p in (gp / "night_right" / f"Image{i:03d}.jpg" for i in range(50))],
                  [{str(gp / "day_right" / f"Image{j:03d}.jpg") for j in range(i - 2, i + 3)} for i in range(50)],
                  0.85, Neighbourhood(radius_m=5.0), sequence=5,
                  unknown_frames=[Frame(str(p), load_image(p), "nordland") for p in
                                  sorted((data / "nordland_64x32" / "summer").glob("*.png"))[:80]])
    app = create_app(loc, ServiceLimits(max_upload_bytes=600_000, max_pixels=2_000_000, max_k=20))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline:
            pytest.fail("the test server did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", data, root
    srv.should_exit = True
    thread.join(timeout=10)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 60)).save(buf, "PNG")
    return buf.getvalue()


def test_http_upload_health_and_bad_uploads(server):
    url, data, _ = server
    with httpx.Client(base_url=url, timeout=60) as c:
        h = c.get("/api/health").json()
        assert h["status"] == "ok" and h["images"] == 100 and h["model"] == "effnet-lite0-gem"
        photo = (data / "gardens_point" / "night_right" / QUERY).read_bytes()
        r = c.post("/api/localize", params={"k": 3}, files={"image": (QUERY, photo, "image/jpeg")})
        assert r.status_code == 200, r.text
        res = r.json()
        assert [m["rank"] for m in res["matches"]] == [1, 2, 3]
        assert res["matches"][0]["name"] == QUERY and res["matches"][0]["score"] > res["matches"][2]["score"]
        thumb = c.get(res["matches"][0]["thumb"])
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size[0] <= 320

        corrupt = c.post("/api/localize", files={"image": ("x.jpg", photo[: len(photo) // 3], "image/jpeg")})
        assert corrupt.status_code == 400 and "corrupt or truncated" in corrupt.json()["detail"]
        text = c.post("/api/localize", files={"image": ("notes.txt", b"hello", "text/plain")})
        assert text.status_code == 400 and "not a readable image" in text.json()["detail"]
        big = c.post("/api/localize", files={"image": ("big.bin", b"\0" * 2_000_000, "image/png")})
        assert big.status_code == 413 and "exceeds the limit" in big.json()["detail"]
        many = c.post("/api/localize", files={"image": ("wide.png", _png(2000, 1500), "image/png")})
        assert many.status_code == 413 and "pixels exceeds" in many.json()["detail"]
        assert c.post("/api/localize").status_code == 400
        assert c.post("/api/localize", params={"k": 99}, files={"image": ("a.jpg", photo)}).status_code == 400
        assert c.get("/api/thumb/100000").status_code == 404
        knob = c.post("/api/localize", params={"keep_ratio": 0.5}, files={"image": ("a.jpg", photo)})
        assert knob.status_code == 400 and "no runtime knob 'keep_ratio'" in knob.json()["detail"]
        assert c.get("/api/health").json()["status"] == "ok"  # still serving after every refusal
        assert c.get("/api/map").json()["count"] == 100


def test_prior_decision_and_sequence_over_http(server):
    url, data, _ = server
    night = data / "gardens_point" / "night_right"
    with httpx.Client(base_url=url, timeout=120) as c:
        photo = (night / QUERY).read_bytes()
        res = c.post("/api/localize", params={"k": 3}, files={"image": (QUERY, photo)}).json()
        d = res["decision"]
        assert d["known"] is True and 0.9 <= d["confidence"] <= 1.0 and abs(d["position"]["lat"] + 27.4765) < 1e-4
        near = c.post("/api/localize", params={"k": 20, "lat": -27.4775 + 20 * 2e-5, "lon": 153.028, "radius_m": 10},
                      files={"image": (QUERY, photo)}).json()
        assert {m["place_id"] for m in near["matches"]} <= {str(i) for i in range(15, 26)}
        assert near["decision"]["searched"] == len(near["matches"])
        bad = c.post("/api/localize", params={"lat": 10, "radius_m": 5}, files={"image": (QUERY, photo)})
        assert bad.status_code == 400 and "lat and lon" in bad.json()["detail"]
        frames = [("images", (f"Image{i:03d}.jpg", (night / f"Image{i:03d}.jpg").read_bytes())) for i in range(60, 72)]
        seq = c.post("/api/localize_sequence", params={"length": 5, "k": 1}, files=frames).json()
        assert len(seq["frames"]) == 12 and seq["frames"][-1]["sequence"]["frames"] == 5
        hits = [abs(int(f["sequence"]["match"]["place_id"]) - i) <= 2 for f, i in zip(seq["frames"], range(60, 72),
                                                                                      strict=True)]
        assert all(hits[5:])
        assert c.post("/api/localize_sequence", params={"method": "nope"}, files=frames[:2]).status_code == 400


def _browser(p):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    return p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])


SHOTS = ROOT / "outputs" / "screenshots"
NO_OVERFLOW = "document.documentElement.scrollWidth <= window.innerWidth"
#: markers (circle.match-marker) whose discs overlap another's: their rank numbers would be hidden
OVERLAPS = """() => {
  const c = [...document.querySelectorAll('circle.match-marker')].map(e => e.getBoundingClientRect());
  let n = 0; for (let i = 0; i < c.length; i++) for (let j = i + 1; j < c.length; j++)
    if (Math.hypot(c[i].x - c[j].x, c[i].y - c[j].y) < c[i].width - 1) n++; return n; }"""


@pytest.mark.parametrize("width,height", [(1280, 900), (390, 844)])
def test_web_page_in_chromium(server, width, height):
    """Desktop and phone: no horizontal overflow, a loading cue, matches beside the query with the decision,
    markers that do not cover each other and link to their cards, a scale bar, a failed upload that clears
    the old results, larger previews on click; screenshots under outputs/screenshots/."""
    from playwright.sync_api import sync_playwright

    url, data, _ = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.wait_for_selector("circle.db-point")
        assert "100 database images" in page.inner_text("#info") and "calibrated" in page.inner_text("#info")
        assert page.evaluate(NO_OVERFLOW)
        page.evaluate("""window.sawSpinner = false; new MutationObserver(() => {
            if (document.querySelector('#status .spinner')) window.sawSpinner = true; })
            .observe(document.getElementById('status'), {childList: true, subtree: true});""")
        page.set_input_files("#file", str(data / "gardens_point" / "night_right" / QUERY))
        page.click("#go")
        page.wait_for_selector(".match img")
        assert page.evaluate("window.sawSpinner")
        cards = page.locator(".match")
        assert cards.count() == 5 and QUERY in cards.nth(0).inner_text()
        assert "inliers" not in cards.nth(0).inner_text()  # this service does not verify
        verified = page.evaluate("""() => matchCard({score: 0.5, inliers: 12, name: 'a.jpg', thumb: '', place_id: null,
            lat: null, lon: null, east: null, north: null}, 'card-v', '#1', false).innerText""")
        assert "0.500 · 12 inliers" in verified  # a verified match (``serve --verify``) shows its inliers
        page.wait_for_function("[...document.querySelectorAll('.match img')].every(i => i.complete && i.naturalWidth)")
        decision = page.inner_text("#decision")
        assert "Known place, P " in decision and "Position " in decision
        assert page.locator("#query-img").is_visible()
        markers = page.locator("circle.match-marker")
        assert markers.count() == 5 and all(markers.nth(i).is_visible() for i in range(5))
        assert page.evaluate(OVERLAPS) == 0  # ranks 1-5 lie within 10 m: without spreading they would overlap
        assert page.locator("g.scale-bar text").text_content().endswith("m")
        assert page.evaluate(NO_OVERFLOW)
        page.screenshot(path=str(SHOTS / f"page-{width}x{height}.png"), full_page=True)
        page.locator("a.match-link").nth(1).click()  # links go to their cards
        page.wait_for_selector(".match.flash")
        page.locator(".match img").first.click()
        assert page.locator("#viewer").is_visible()
        page.keyboard.press("Escape")
        page.set_input_files("#file", {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8broken"})
        page.click("#go")
        page.wait_for_function("document.getElementById('status').classList.contains('error')")
        assert "Refused (400)" in page.inner_text("#status")
        assert page.locator(".match").count() == 0 and page.locator("circle.match-marker").count() == 0
        assert not page.locator("#decision").is_visible() and not page.locator("#query-img").is_visible()
        page.screenshot(path=str(SHOTS / f"page-{width}x{height}-failed.png"), full_page=True)
        browser.close()


@pytest.mark.parametrize("width,height", [(1280, 900), (390, 844)])
def test_web_page_sequence_mode_headlines_the_sequence_answer(server, width, height):
    """Eight night frames 61-68, sequence length 5: the decision box, the first (orange) card and the orange map
    marker are the sequence answer, with its own calibrated decision; the last frame's own answer stays visible as
    secondary; the per-frame table marks frames 1-4 as warming up (never known) and does not break words or
    widen the phone page; the position ring is drawn over the markers. Screenshots kept."""
    from playwright.sync_api import sync_playwright

    url, data, _ = server
    night = data / "gardens_point" / "night_right"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.wait_for_selector("circle.db-point")
        page.fill("#length", "5")
        page.set_input_files("#file", [str(night / f"Image{i:03d}.jpg") for i in range(61, 69)])
        page.click("#go")
        page.wait_for_selector("#frames tbody tr")
        rows = page.locator("#frames tbody tr")
        assert rows.count() == 8
        assert "Sequence of 8 frames" in page.inner_text("#results-title")
        head = page.locator("#decision .headline").inner_text()
        assert head.startswith("Sequence answer (5 of 5 frames): Known place, P ") and "Position " in head
        assert page.locator("#decision .secondary").inner_text().startswith("Last frame alone:")
        first = page.locator(".match").nth(0)
        assert first.get_attribute("id") == "card-S" and "sequence answer" in first.inner_text()
        assert "match top" in first.get_attribute("class") and page.locator(".match.top").count() == 1
        shown = int(first.locator(".name").inner_text().split("Image")[1][:3])
        assert abs(shown - 68) <= 2, shown  # the sequence answer is right
        assert page.locator(".match").nth(1).inner_text().startswith("frame #1")
        orange = page.locator("circle.match-marker[fill='#d9480f']")
        assert orange.count() == 1 and orange.get_attribute("data-rank") == "S"
        for i in range(8):
            text = rows.nth(i).inner_text()
            assert ("warming up" in text) == (i < 4) and ("known" in text.replace("unknown", "")) <= (i >= 4)
        assert f"Image{shown:03d}.jpg" in rows.nth(7).inner_text()
        assert page.evaluate(NO_OVERFLOW)
        assert page.evaluate("[...document.querySelectorAll('#frames td')].every(td => td.scrollWidth <= "
                             "td.clientWidth + 1)")  # no cell cut or broken inside a word
        ring = page.evaluate("""() => { const svg = document.getElementById('map'), e = svg.querySelector('.estimate');
            const all = [...svg.children]; return [all.indexOf(e) > all.indexOf(
              svg.querySelector('circle.match-marker').parentNode), +e.getAttribute('r')]; }""")
        assert ring[0] and ring[1] >= 13  # over the markers, wider than a marker's disc
        page.screenshot(path=str(SHOTS / f"page-sequence-{width}x{height}.png"), full_page=True)
        if width < 1280:
            browser.close()
            return
        # a photo dropped on the drop zone (a JPEG the page fetches, wrapped as a dropped File)
        page.evaluate("""async () => { const blob = await (await fetch('/api/thumb/30')).blob();
            const dt = new DataTransfer(); dt.items.add(new File([blob], 'dropped.jpg', {type: 'image/jpeg'}));
            const ev = new DragEvent('drop', {dataTransfer: dt, bubbles: true});
            document.getElementById('drop').dispatchEvent(ev); }""")
        page.wait_for_function("document.querySelectorAll('#frames tbody tr').length === 0 && "
                               "document.querySelectorAll('.match').length === 5")
        assert "Image030.jpg" in page.locator(".match").nth(0).inner_text()
        browser.close()


def test_cli_serve_binds_localhost_and_applies_its_limits(server):
    """`edgevpr serve` as a user starts it: flags to limits (a fractional MB limit included), localhost bind."""
    import subprocess
    import sys

    _, data, root = server
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgevpr.cli", "serve", "--index", str(root), "--port", str(port),
                             "--max-upload-mb", "0.25", "--device", "cpu"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/api/health", timeout=5).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "edgevpr serve did not answer within 60 s"
                time.sleep(0.2)
        assert health["limits"]["max_upload_bytes"] == 262144
        night = (data / "gardens_point" / "night_right" / QUERY).read_bytes()
        ok = httpx.post(f"{url}/api/localize", files={"image": (QUERY, night)}, timeout=60)
        assert ok.status_code == 200 and ok.json()["matches"][0]["name"] == QUERY
        noise = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(noise, "PNG")
        assert len(noise.getvalue()) > 262144  # a valid photo, over the 0.25 MB limit
        big = httpx.post(f"{url}/api/localize", files={"image": ("noise.png", noise.getvalue())}, timeout=60)
        assert big.status_code == 413 and "exceeds the limit of 262144" in big.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
