"""Localize photos against a place index: embed with the index's model (PyTorch or onnxruntime), search.

Torch is imported only for a PyTorch model: with an exported ``.onnx`` model this runs on numpy, PIL,
onnxruntime and faiss alone (``pip install "edgevpr[runtime]"``).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.images import load_image
from ..integrity import check_finite
from .embed import embed
from .index import Match, PlaceIndex, check_model


def open_model(spec: str | os.PathLike, device="cpu", int8: bool = False):
    """A VPRModel (named preset, config file, saved folder) or, for a ``.onnx`` file, an onnxruntime model."""
    from .onnx_model import OnnxModel, is_onnx

    if is_onnx(spec):
        if int8:
            raise ValueError(f"{spec}: --int8 applies to PyTorch ternary models; export with --int8 instead")
        return OnnxModel(spec).to(device)
    try:
        from ..models.model import load_model
    except ImportError as e:
        raise ValueError(f"model {spec}: a PyTorch model needs the full install (pip install edgevpr[full]: "
                         f"{e.name} is missing); the runtime install runs exported .onnx models") from None

    from ..utils import pick_device

    model = load_model(spec, pick_device(device))
    if int8:
        from ..compress.ternary import TernaryLinear, to_int8

        if not any(isinstance(m, TernaryLinear) for m in model.modules()):
            raise ValueError(f"--int8: model {model.name} has no ternary layers")
        to_int8(model)
    return model


class Localizer:
    """Index + model, checked to belong together. Thread-safe (one forward at a time)."""

    def __init__(self, index: str | os.PathLike | PlaceIndex, model=None, mmap: bool = True,
                 device="cpu") -> None:
        self.index = index if isinstance(index, PlaceIndex) else PlaceIndex.open(index, mmap=mmap)
        rec = self.index.model
        if model is None:
            if not rec.get("spec"):
                raise ValueError(f"{self.index.root}: the index does not record a loadable model; give --model")
            model = rec["spec"]
        self.model = open_model(model, device) if isinstance(model, (str, os.PathLike)) else model
        check_model(rec, self.model.name, self.model.fingerprint(), str(self.index.root))
        self.knobs = rec["knobs"]
        self.transform = self.model.transform(tuple(rec["image_size"]))
        self._lock = threading.Lock()

    def embed(self, images: list[Image.Image], knobs: dict | None = None) -> np.ndarray:
        """RGB images -> descriptors [B, D] float32. ``knobs`` override the index's for these queries only
        (e.g. a lower keep_ratio for faster queries against a database embedded unpruned)."""
        x = np.stack([self.transform.array(im) for im in images])
        with self._lock:
            self.model.eval()
            d = embed(self.model, x, {**self.knobs, **(knobs or {})})
        check_finite(d, [getattr(im, "filename", "") or f"query {i}" for i, im in enumerate(images)], self.model.name)
        return d

    def localize(self, images: list[Image.Image], k: int = 5, knobs: dict | None = None) -> list[list[Match]]:
        return self.index.search(self.embed(images, knobs), k)

    def localize_files(self, paths: list[str | os.PathLike], k: int = 5,
                       knobs: dict | None = None) -> tuple[list[list[Match]], list[float]]:
        """Per photo (loaded, embedded and searched one at a time, as a live query is): matches and ms."""
        out, ms = [], []
        for p in paths:
            t0 = time.perf_counter()
            out.append(self.localize([load_image(Path(p))], k, knobs)[0])
            ms.append((time.perf_counter() - t0) * 1000)
        return out, ms


def latency_summary(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"photos": len(ms), "p50_ms": statistics.median(s), "p90_ms": s[min(len(s) - 1, int(0.9 * len(s)))],
            "mean_ms": statistics.fmean(s)}
