"""Images -> descriptors for either kind of model, without importing torch unless the model is a torch one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..data.images import ImageLoadError, load_image


def embed(model, x: np.ndarray, knobs: dict | None = None) -> np.ndarray:
    """images [B, 3, H, W] float32 -> descriptors [B, D] float32 (an OnnxModel, or a torch VPRModel)."""
    knobs = knobs or {}
    if hasattr(model, "session"):  # onnxruntime
        model.check_knobs(knobs)
        return model.run(x)
    import torch

    from ..utils import module_device

    with torch.inference_mode():
        device = module_device(model)
        return model(torch.from_numpy(np.ascontiguousarray(x)).to(device), **knobs).float().cpu().numpy()


def embed_with_local(model, x: np.ndarray, knobs: dict | None = None
                     ) -> tuple[np.ndarray, tuple[np.ndarray, tuple[int, int]] | None]:
    """images [B, 3, H, W] float32 -> (descriptors [B, D] float32, as ``embed``; the model's own local features
    of the same pass [B, H'*W', C] with their grid (H', W'), as ``patch_tokens`` gives them, or None when the pass
    has none: a pruned ViT pass, a ViT's ONNX export, a model with no local features). One forward instead of two
    for a query that is verified on the model's own features."""
    knobs = knobs or {}
    if hasattr(model, "session"):
        model.check_knobs(knobs)
        return model.run_with_local(x)
    if not hasattr(model, "forward_with_local"):
        return embed(model, x, knobs), None
    import torch

    from ..utils import module_device

    with torch.inference_mode():
        d, t = model.forward_with_local(torch.from_numpy(np.ascontiguousarray(x)).to(module_device(model)), **knobs)
    local = None if t is None else (t.patches.float().cpu().numpy(), tuple(t.grid))
    return d.float().cpu().numpy(), local


def patch_tokens(model, x: np.ndarray, knobs: dict | None = None) -> tuple[np.ndarray, tuple[int, int]] | None:
    """images [B, 3, H, W] float32 -> (the model's own local features [B, H'*W', C] float32, grid (H', W')): a torch
    ViT's every patch token (pruning knobs set to keep every patch), a torch CNN's stride-16 feature map
    (``CNNBackbone.local_map``) or a CNN ONNX export's (``OnnxModel.local_features``: the same map, torch-free); None
    for any other model (ViT ONNX exports give descriptors only)."""
    if hasattr(model, "session"):
        return model.local_features(x)
    if not hasattr(model, "forward_tokens"):
        return None
    import torch

    from ..utils import module_device

    local = getattr(getattr(model, "backbone", None), "local_map", None)
    keep = {"keep_ratio": 1.0} if "keep_ratio" in model.knob_names() else {}
    with torch.inference_mode(), model.using(**{**(knobs or {}), **keep}):
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(module_device(model))
        t = local(xt) if local is not None else model.forward_tokens(xt)
    if local is None and (t.cls is None or t.index is not None):
        return None
    return t.patches.float().cpu().numpy(), tuple(t.grid)


def image_batches(paths: list[Path], transform, batch_size: int, max_pixels: int | None = None
                  ) -> Iterator[tuple[np.ndarray | None, list[int], list[tuple[int, str]]]]:
    """Batches of (images [b, 3, H, W] or None, positions in ``paths`` loaded, [(position, reason)] unreadable)."""
    for start in range(0, len(paths), batch_size):
        xs, ok, bad = [], [], []
        for j in range(start, min(len(paths), start + batch_size)):
            try:
                xs.append(transform.array(load_image(paths[j], max_pixels)))
                ok.append(j)
            except ImageLoadError as e:
                bad.append((j, e.reason))
        yield (np.stack(xs) if xs else None), ok, bad
