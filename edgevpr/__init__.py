"""edgevpr: visual place recognition for robots, drones and phones.

The research side (models, training, evaluation) needs torch; the deployment side (index, localize, serve, ONNX
models) does not, so the names below load lazily: ``import edgevpr`` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Tokens", "VPRModel", "build_model", "load_model", "save_model", "__version__"]


def __getattr__(name: str):
    if name == "Tokens":
        from .tokens import Tokens

        return Tokens
    if name in ("VPRModel", "build_model", "load_model", "save_model"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'edgevpr' has no attribute {name!r}")
