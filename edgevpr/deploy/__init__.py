"""Deployment: place index (``index``), localization (``localize``), HTTP service (``service``), ONNX (``export``).

    from edgevpr.deploy import PlaceIndex, Localizer, build_index, export_onnx
    build_index(model, "db_images/", "my.index")            # resumable; add_images(model, "more/", "my.index")
    Localizer("my.index").localize_files(["photo.jpg"], k=5)

Everything here but ``export_onnx`` runs without torch (an ONNX model through onnxruntime).
"""

from __future__ import annotations

from .index import PlaceIndex, read_rows
from .index import add as add_images
from .index import build as build_index
from .localize import Localizer, open_model
from .onnx_model import OnnxModel

__all__ = ["Localizer", "OnnxModel", "PlaceIndex", "add_images", "build_index", "export_onnx", "open_model",
           "read_rows"]


def __getattr__(name: str):
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'edgevpr.deploy' has no attribute {name!r}")
