"""Named published models: where each release file lives, its format and licence, and the fetch-import-reuse path.

``load_release(name)`` downloads the release file from its real URL into ``<EDGEVPR_CACHE>/published/<name>/``
on first use (progress bar with rate and ETA; written atomically; its sha256 recorded and, where the table knows
it, checked), imports it with ``edgevpr import``'s code into ``<...>/<name>/model`` and reuses that folder after.
``EDGEVPR_MIRROR`` (a base URL) fetches the files by name from a mirror instead. Offline, one line names the URL
and the ``edgevpr import`` command for a file obtained elsewhere. MixVPR's weights sit behind a Google Drive page
and are imported from a local file only.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..integrity import sha256_file
from ..utils import write_json

_GH = "https://github.com"


@dataclass(frozen=True)
class Release:
    name: str
    format: str
    url: str | None
    licence: str
    note: str = ""
    sha256: str | None = None  # checked when known; recorded always

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.url else ""


def _table() -> dict[str, Release]:
    rel = [
        Release("megaloc", "megaloc", "https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors", "MIT",
                "DINOv2-B + SALAD + linear, 8448-D"),
        Release("dinov2-salad", "salad", f"{_GH}/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt", "GPL-3.0",
                "DINOv2-B + SALAD, 8448-D, 322 px"),
        Release("dinov2-boq", "boq", f"{_GH}/amaralibey/Bag-of-Queries/releases/download/v1.0/dinov2_12288.pth",
                "MIT", "DINOv2-B + BoQ, 12288-D, 322 px"),
        Release("resnet50-boq", "boq", f"{_GH}/amaralibey/Bag-of-Queries/releases/download/v1.0/resnet50_16384.pth",
                "MIT", "ResNet50 (to layer3) + BoQ, 16384-D, 384 px"),
        Release("tetra-boq", "tetra", f"{_GH}/OliverGrainge/TeTRA-VPR/releases/download/V1.0/boq.pth.zip", "MIT",
                "ternary ViT-B + BoQ, 12288-D (1536 bytes binary), 322 px"),
        Release("tetra-salad", "tetra", f"{_GH}/OliverGrainge/TeTRA-VPR/releases/download/V1.0/salad.pth.zip", "MIT",
                "ternary ViT-B + SALAD, 8448-D (1056 bytes binary), 322 px"),
    ]
    for dim, (channels, rows) in {"4096": (1024, 4), "512": (256, 2), "128": (64, 2)}.items():
        rel.append(Release(f"mixvpr-{dim}", "mixvpr", None, "MIT",
                           f"ResNet50 + MixVPR {dim}-D; file resnet50_MixVPR_{dim}_channels({channels})_rows({rows})"
                           ".ckpt from the Google Drive link in amaralibey/MixVPR's README: `edgevpr import mixvpr "
                           "FILE`"))
    # the backbone / dimension pairs released by gmberton/CosPlace and gmberton/EigenPlaces (their READMEs);
    # their VGG16 models use another layout and are not supported
    cosplace = {"ResNet18": (32, 64, 128, 256, 512), "ResNet50": (32, 64, 128, 256, 512, 1024, 2048),
                "ResNet101": (32, 64, 128, 256, 512, 1024, 2048), "ResNet152": (32, 64, 128, 256, 512, 1024, 2048)}
    eigen = {"ResNet18": (256, 512), "ResNet50": (128, 256, 512, 1024, 2048),
             "ResNet101": (128, 256, 512, 1024, 2048)}
    for fam, table in (("cosplace", cosplace), ("eigenplaces", eigen)):
        repo = "CosPlace" if fam == "cosplace" else "EigenPlaces"
        for backbone, dims in table.items():
            for d in dims:
                rel.append(Release(f"{fam}-{backbone.lower()}-{d}", fam,
                                   f"{_GH}/gmberton/{repo}/releases/download/v1.0/{backbone}_{d}_{fam}.pth", "MIT",
                                   f"{backbone} + GeM + FC, {d}-D"))
    return {r.name: r for r in rel}


RELEASES: dict[str, Release] = _table()


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVPR_CACHE", Path.home() / ".cache" / "edgevpr")) / "published"


def release_url(r: Release) -> str:
    mirror = os.environ.get("EDGEVPR_MIRROR")
    return f"{mirror.rstrip('/')}/{r.file_name}" if mirror else r.url


def _download(url: str, dst: Path, progress: bool) -> None:
    """Stream ``url`` into ``dst`` atomically, with a progress bar (rate, ETA)."""
    from tqdm.auto import tqdm

    from ..utils import atomic_write

    def write(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dst.name, disable=not progress) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
            if total is not None and f.tell() != total:
                raise OSError(f"download of {url} ended after {f.tell()} of {total} bytes")

    atomic_write(dst, write)


def load_release(name: str, progress: bool = True) -> Path:
    """The imported edgevpr model folder of release ``name`` (fetched and imported on first use)."""
    from . import import_checkpoint

    r = RELEASES[name]
    folder = cache_root() / name
    model_dir = folder / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    if r.url is None:
        raise ValueError(f"{name}: {r.note}")
    src = folder / r.file_name
    url = release_url(r)
    if not src.is_file():
        try:
            _download(url, src, progress)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise ValueError(f"{name}: cannot fetch {url} ({getattr(e, 'reason', e)}); offline? get the file "
                             f"elsewhere and run `edgevpr import {r.format} FILE --out DIR`, then use --model DIR"
                             ) from None
    digest = sha256_file(src)
    if r.sha256 and digest != r.sha256:
        src.unlink()
        raise ValueError(f"{name}: {url} gave a file with sha256 {digest}, expected {r.sha256} (removed)")
    import_checkpoint(r.format, src, model_dir, {"url": r.url, "licence": r.licence}, name=name)
    write_json(folder / "fetched.json", {"url": url, "sha256": digest, "file": r.file_name})
    return model_dir


def describe(name: str) -> dict:
    """What ``edgevpr models`` shows for a release."""
    r = RELEASES[name]
    model_dir = cache_root() / name / "model"
    fetched = (cache_root() / name / "fetched.json")
    return {"name": name, "weights": "published VPR weights", "format": r.format, "licence": r.licence,
            "about": r.note, "source": r.url or "local file only (edgevpr import)",
            "cached": model_dir.is_dir(), "sha256": json.loads(fetched.read_text())["sha256"]
            if fetched.is_file() else None}
