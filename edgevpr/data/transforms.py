"""Image -> normalised tensor, as each model expects (size, interpolation, mean/std)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


class ToModelInput:
    """RGB PIL image -> float tensor [3, H, W]: resize to ``size`` (H, W), scale to [0,1], normalise."""

    def __init__(self, size: tuple[int, int], mean, std, interpolation: str = "bicubic") -> None:
        if interpolation not in _INTERP:
            raise ValueError(f"interpolation '{interpolation}' is not one of {', '.join(_INTERP)}")
        self.size = (int(size[0]), int(size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.interpolation = interpolation

    def resize(self, img: Image.Image) -> Image.Image:
        """The resize step alone (PIL returns an unchanged copy for an image already at ``size``)."""
        return img.resize((self.size[1], self.size[0]), _INTERP[self.interpolation])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self.resize(img)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std
