"""Image -> normalised array, as each model expects (size, interpolation, mean/std); torch only for tensors."""

from __future__ import annotations

import numpy as np
from PIL import Image

_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


class ToModelInput:
    """RGB PIL image -> float [3, H, W]: resize to ``size`` (H, W), scale to [0,1], normalise.

    ``array(img)`` gives a numpy float32 array (the deployment side, no torch); calling the object gives the same
    values as a torch tensor.
    """

    def __init__(self, size: tuple[int, int], mean, std, interpolation: str = "bicubic") -> None:
        if interpolation not in _INTERP:
            raise ValueError(f"interpolation '{interpolation}' is not one of {', '.join(_INTERP)}")
        self.size = (int(size[0]), int(size[1]))
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.interpolation = interpolation

    def resize(self, img: Image.Image) -> Image.Image:
        """The resize step alone (PIL returns an unchanged copy for an image already at ``size``)."""
        return img.resize((self.size[1], self.size[0]), _INTERP[self.interpolation])

    def array(self, img: Image.Image) -> np.ndarray:
        """[3, H, W] float32."""
        x = np.asarray(self.resize(img), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        return (x - self.mean) / self.std

    def __call__(self, img: Image.Image):
        """[3, H, W] float32 torch tensor."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.array(img)))
