"""The importer behind ``edgevpr.published`` (torch): reading, converting and saving a release file."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from ..integrity import sha256_file
from ..models.weights import check_tensors, too_big, torch_load
from . import boq, cosplace, mixvpr, salad, tetra  # noqa: F401  (registers the families)
from .base import FAMILIES, CheckpointError, Converted, Family, Ledger  # noqa: F401  (re-exported)


def _too_big(what: str, n: int) -> Exception | None:
    return too_big(what, n, CheckpointError)


def _unwrap(sd: object) -> object:
    """A Lightning checkpoint's ``state_dict``; anything else as it is."""
    return sd["state_dict"] if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict) else sd


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a release file (.pth/.ckpt/.pt, .safetensors, or a .zip holding one .pth); never unpickles code.

    Bounds before work: the file, a zip member (by its declared size, before it is read) and the tensors a file
    declares are each held to ``max_checkpoint_bytes``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if err := _too_big(str(path), path.stat().st_size):
        raise err
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif path.suffix == ".zip":
            with zipfile.ZipFile(path) as z, tempfile.TemporaryDirectory() as tmp:
                members = [i for i in z.infolist() if i.filename.endswith((".pth", ".pt", ".ckpt"))
                           and not i.filename.startswith("__")]
                if len(members) != 1:
                    raise CheckpointError(f"{path}: expected one .pth inside the zip, found "
                                          f"{[i.filename for i in members] or 'none'}")
                if err := _too_big(f"{path}: member {members[0].filename}", members[0].file_size):
                    raise err
                inner = Path(tmp) / "member.pth"
                with z.open(members[0]) as src, open(inner, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                sd = _unwrap(torch_load(inner))
                if isinstance(sd, dict):  # copied off the memory map before the temporary file goes
                    check_tensors(sd, path, CheckpointError)
                    sd = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
        else:
            sd = _unwrap(torch_load(path))
    except CheckpointError:
        raise
    except Exception as e:  # truncated zips, bad pickles, bad safetensors headers: one line
        raise CheckpointError(f"{path}: damaged or not a weights-only checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})"[:300]) from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    check_tensors(sd, path, CheckpointError)
    return sd


def convert(fmt: str, sd: dict[str, torch.Tensor], where: str) -> Converted:
    """Convert an upstream state dict of family ``fmt``; one-line CheckpointError for a mismatch."""
    family = FAMILIES.get(fmt)()
    led = Ledger(sd, where, fmt)
    conv = family.convert(led)
    led.close()
    return conv


def import_checkpoint(fmt: str, path: str | os.PathLike, out: str | os.PathLike, release: dict | None = None,
                      name: str | None = None):
    """Import the release file ``path`` of family ``fmt`` into an edgevpr model folder ``out`` -> the model."""
    from ..models.model import build_model, save_model

    if fmt not in FAMILIES:
        raise ValueError(f"unknown format '{fmt}' (choose from {', '.join(FAMILIES.names())})")
    path = Path(path)
    family = FAMILIES.get(fmt)()
    conv = convert(fmt, read_checkpoint(path), str(path))
    cfg = dict(conv.config)
    cfg["name"] = name or f"{fmt}-{path.stem}"
    cfg["provenance"] = {"format": fmt, "upstream": f"https://github.com/{family.upstream}",
                         "release": (release or {}).get("url"), "file": path.name, "sha256": sha256_file(path),
                         **{k: release[k] for k in ("fetched_from", "sha256_pinned") if k in (release or {})},
                         "licence": (release or {}).get("licence", family.licence),
                         "weights": "published VPR weights", "unused_keys": conv.unused}
    model = build_model(cfg).eval()
    missing, unexpected = model.load_state_dict(conv.state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: the converted weights do not fill the edgevpr model (missing "
                              f"{missing[:2]}, unexpected {unexpected[:2]})")
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k} holds NaN/Inf (damaged release file)")
    save_model(model, out)
    return model
