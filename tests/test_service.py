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
from tests.conftest import free_port, shared_data

QUERY = "Image050.jpg"  # a Gardens Point night photo; the default model ranks its day frame 050 first


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default model's index of Gardens Point day_right, served on a free localhost port."""
    import uvicorn

    from edgevpr.models.model import load_model

    data = shared_data()
    root = tmp_path_factory.mktemp("service") / "index"
    model = load_model("effnet-lite0-gem")
    idx.build(model, data / "gardens_point" / "day_right", root, spec="effnet-lite0-gem", progress=False)
    app = create_app(Localizer(root, model), ServiceLimits(max_upload_bytes=600_000, max_pixels=2_000_000, max_k=20))
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


def test_web_page_shows_matches_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, data, _ = server
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.wait_for_selector("circle.db-point")
        assert "100 database images" in page.inner_text("#info")
        page.set_input_files("#file", str(data / "gardens_point" / "night_right" / QUERY))
        page.click("#go")
        page.wait_for_selector(".match img")
        cards = page.locator(".match")
        assert cards.count() == 5
        assert QUERY in cards.nth(0).inner_text()
        page.wait_for_function("[...document.querySelectorAll('.match img')].every(i => i.complete && i.naturalWidth)")
        assert page.locator("circle.match-marker").count() == 5
        assert page.locator("#query-img").is_visible()
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        page.set_input_files("#file", {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8broken"})
        page.click("#go")
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert "Refused (400)" in page.inner_text("#error")
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
