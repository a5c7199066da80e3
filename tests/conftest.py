"""Shared fixtures. Real-data tests read ../shared/data (or EDGEVPR_DATA) in place and fail loudly without it."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    root = Path(os.environ.get("EDGEVPR_DATA") or ROOT.parent / "shared" / "data")  # the Makefile may export ""
    if not (root / "gardens_point" / "day_right").is_dir():
        pytest.fail(f"real data missing: {root} has no gardens_point/day_right (set EDGEVPR_DATA)")
    return root.resolve()  # indexes record resolved paths, so tests compare with those even via a symlinked folder


@pytest.fixture
def data_root() -> Path:
    return shared_data()


def make_image(path: Path, seed: int, size=(48, 64), mode="RGB") -> Path:
    """A small random-texture image (H, W) written to ``path``."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[0] // 8, size[1] // 8, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


TINY_MODEL = {"backbone": {"name": "cnn", "timm_name": "mobilenetv3_small_100"},
              "aggregator": {"name": "gem"}, "image_size": [64, 64], "name": "tiny-test"}


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(handler, **attributes):
    """An HTTP server on loopback with ``handler`` (a request handler class or factory) for the duration of the
    block -> its base URL; ``attributes`` are set on the server (handlers read them as ``self.server.NAME``)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in attributes.items():
        setattr(srv, name, value)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def serve_folder(folder: Path):
    """Serve ``folder`` over HTTP on loopback for the duration of the block -> its base URL."""
    return serve(functools.partial(_QuietHandler, directory=str(folder)))
