"""Robust image loading: any common file in, an RGB PIL image out, or a one-line error naming the file."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: Default pixel-count limit (decompression-bomb guard): 120 megapixels. ``EDGEVPR_MAX_PIXELS`` overrides.
DEFAULT_MAX_PIXELS = int(os.environ.get("EDGEVPR_MAX_PIXELS", 120_000_000))


#: The most scans a JPEG may have (``EDGEVPR_MAX_JPEG_SCANS``, default 100). A progressive JPEG has about 10; each
#: scan is another pass over every coefficient of the image, so a 36-megapixel file of 20,000 tiny scans costs minutes
#: of CPU to decode although it is under the pixel limit. Counted in the bytes before anything is decoded.
MAX_JPEG_SCANS = int(os.environ.get("EDGEVPR_MAX_JPEG_SCANS", 100))


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers (FF DA) in a JPEG's bytes: entropy-coded data stuffs every FF byte (FF 00), so each
    occurrence is a scan header."""
    return data.count(b"\xff\xda")


def decode_work_problem(fmt: str | None, data: bytes) -> str | None:
    """Why decoding these bytes would cost unbounded work (None: it is bounded): a JPEG of too many scans."""
    if fmt == "JPEG" and (n := jpeg_scans(data)) > MAX_JPEG_SCANS:
        return (f"a JPEG of {n} scans, over the limit of {MAX_JPEG_SCANS} (each scan is a pass over the whole image; "
                "EDGEVPR_MAX_JPEG_SCANS raises it)")
    return None


class ImageLoadError(OSError):
    """An image that cannot be used; ``str(err)`` is one line naming the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float scaled by their range, alpha on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int | None = None, data: bytes | None = None) -> Image.Image:
    """Load ``path`` (or the encoded image ``data``, ``path`` then naming where it came from) as an upright 8-bit
    RGB image.

    Applies the EXIF orientation; converts grayscale, RGBA, palette, 16-bit and CMYK to RGB.
    Raises ImageLoadError (one line, names the file) for missing, truncated, non-image or oversized files.
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > limit:
                    raise ImageLoadError(path, f"{w}x{h} = {w * h} pixels exceeds the limit of {limit}")
                if img.format == "JPEG" and (why := decode_work_problem(img.format, data if data is not None
                                                                         else path.read_bytes())):
                    raise ImageLoadError(path, why)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file (cannot identify format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"decompression bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in msg.lower():
            msg = "truncated or corrupt image data"
        raise ImageLoadError(path, msg) from None


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files directly in ``folder`` (and its sub-folders), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def mean_intensity(path: str | os.PathLike) -> float:
    """Mean gray level (0-255) of a 32x32 thumbnail, used to drop near-black frames."""
    img = load_image(path).convert("L")
    img.thumbnail((32, 32))
    return float(np.asarray(img, dtype=np.float32).mean())
