"""Named published models: where each release file lives, its format and licence, and the fetch-import-reuse path.

``load_release(name)`` downloads the release file from its real URL into ``<EDGEVPR_CACHE>/published/<name>/``
on first use (progress bar with rate and ETA; size-bounded, streamed to a temporary file and cached only once it
is complete, plausible and the architecture its name promises; its sha256 recorded and, where the table pins it,
checked: no release in the table is pinned yet, since none of their files could be obtained here to identify),
imports it with ``edgevpr import``'s code into ``<...>/<name>/model`` and reuses that folder after.
``EDGEVPR_MIRROR`` (a base URL) fetches the files by name from a mirror instead. Offline, one line names the URL
and the ``edgevpr import`` command for a file obtained elsewhere. MixVPR's weights sit behind a Google Drive page
and are imported from a local file only.
"""

from __future__ import annotations

import json
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from .. import netio
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
    sha256: str | None = None  # pinned: checked when known; recorded always
    #: what the name promises, checked on the imported model before anything is cached: descriptor dimension,
    #: and the backbone (timm name of a CNN, or a ViT's width) where the name says it
    out_dim: int | None = None
    backbone: dict | None = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.url else ""


def _table() -> dict[str, Release]:
    rel = [
        Release("megaloc", "megaloc", "https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors", "MIT",
                "DINOv2-B + SALAD + linear, 8448-D", out_dim=8448),
        Release("dinov2-salad", "salad", f"{_GH}/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt", "GPL-3.0",
                "DINOv2-B + SALAD, 8448-D, 322 px", out_dim=8448),
        Release("dinov2-boq", "boq", f"{_GH}/amaralibey/Bag-of-Queries/releases/download/v1.0/dinov2_12288.pth",
                "MIT", "DINOv2-B + BoQ, 12288-D, 322 px", out_dim=12288),
        Release("resnet50-boq", "boq", f"{_GH}/amaralibey/Bag-of-Queries/releases/download/v1.0/resnet50_16384.pth",
                "MIT", "ResNet50 (to layer3) + BoQ, 16384-D, 384 px", out_dim=16384,
                backbone={"timm_name": "resnet50"}),
        Release("tetra-boq", "tetra", f"{_GH}/OliverGrainge/TeTRA-VPR/releases/download/V1.0/boq.pth.zip", "MIT",
                "ternary ViT-B + BoQ, 12288-D (1536 bytes binary), 322 px", out_dim=12288),
        Release("tetra-salad", "tetra", f"{_GH}/OliverGrainge/TeTRA-VPR/releases/download/V1.0/salad.pth.zip", "MIT",
                "ternary ViT-B + SALAD, 8448-D (1056 bytes binary), 322 px", out_dim=8448),
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
                                   f"{backbone} + GeM + FC, {d}-D", out_dim=d,
                                   backbone={"timm_name": backbone.lower()}))
    return {r.name: r for r in rel}


RELEASES: dict[str, Release] = _table()


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVPR_CACHE", Path.home() / ".cache" / "edgevpr")) / "published"


def release_url(r: Release) -> str:
    mirror = os.environ.get("EDGEVPR_MIRROR")
    return f"{mirror.rstrip('/')}/{r.file_name}" if mirror else r.url


def max_download_bytes() -> int:
    """The largest release file fetched or read (bytes); ``EDGEVPR_MAX_DOWNLOAD_GB`` raises it."""
    return int(netio.limit("bytes"))


def _download(url: str, tmp: Path, progress: bool) -> None:
    """Stream ``url`` into ``tmp`` with a progress bar (rate, ETA) under ``netio``'s byte limit, stall timeout and
    overall deadline; an HTML page is refused."""
    netio.download(url, tmp, progress=progress, refuse_html=True)


#: the most members a release zip may have (a PyTorch checkpoint has one per tensor storage plus a few)
MAX_ZIP_MEMBERS = 100_000


def check_plausible(path: Path, file_name: str) -> None:
    """Refuse a file that cannot be the release ``file_name`` (an error page, a body cut short): a safetensors file
    must have a JSON header whose tensors end exactly at the end of the file; a ``.pth``/``.ckpt``/``.zip`` must be
    a complete zip (PyTorch's format since 1.6, and TeTRA's archive) whose members all pass their CRC."""
    import struct
    import zipfile

    size = path.stat().st_size
    if file_name.endswith(".safetensors"):
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            try:
                header = json.loads(f.read(n)) if 0 < n <= min(size - 8, 100 << 20) else None
            except ValueError:
                header = None
        ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__" and isinstance(v, dict)
                and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
        if not ends or 8 + n + max(ends) != size:
            raise ValueError("not a complete safetensors file (an error page, or a body cut short)")
        return
    if not zipfile.is_zipfile(path):
        raise ValueError("not a complete PyTorch checkpoint (no zip directory: an error page, or a body cut short)")
    from ..models.weights import too_big

    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise ValueError(f"{len(infos)} zip members (at most {MAX_ZIP_MEMBERS}): not a checkpoint")
        for info in infos:  # declared sizes first: nothing is decompressed past the checkpoint limit
            if err := too_big(f"member {info.filename}", info.file_size):
                raise err
        if err := too_big("its members together", sum(i.file_size for i in infos)):
            raise err
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"member {bad} fails its CRC (damaged download)")


def check_promise(r: Release, model) -> None:
    """Refuse an imported model that is not the architecture release ``r``'s name promises."""
    if r.out_dim is not None and model.out_dim != r.out_dim:
        raise ValueError(f"{r.name}: the file gives {model.out_dim}-D descriptors, the release is {r.out_dim}-D "
                         "(another release's file under this name?)")
    for key, want in (r.backbone or {}).items():
        got = model.config["backbone"].get(key)
        if got != want:
            raise ValueError(f"{r.name}: the file's backbone has {key} {got}, the release {want} (another release's "
                             "file under this name?)")


def load_release(name: str, progress: bool = True) -> Path:
    """The imported edgevpr model folder of release ``name`` (fetched and imported on first use).

    Nothing reaches the cache unless it is complete and plausible: the file streams into a temporary name, is
    checked (``check_plausible``, the pinned sha256 where the table has one), imported into a temporary folder,
    checked against what the name promises (``check_promise``), and only then moved into place; any failure
    removes both, so the next run asks the server (or mirror) again."""
    import shutil
    import tempfile

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
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder))
    try:
        tmp = work / r.file_name
        if src.is_file():  # a file kept by an earlier edgevpr: checked like a new download
            shutil.copyfile(src, tmp)
        else:
            try:
                _download(url, tmp, progress)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise ValueError(f"{name}: cannot fetch {url} ({getattr(e, 'reason', e)}); offline? get the file "
                                 f"elsewhere and run `edgevpr import {r.format} FILE --out DIR`, then use --model DIR"
                                 ) from None
        try:
            check_plausible(tmp, r.file_name)
        except ValueError as e:
            raise ValueError(f"{name}: {url} gave {tmp.stat().st_size} bytes that are {e}; nothing was cached"
                             ) from None
        digest = sha256_file(tmp)
        if r.sha256 and digest != r.sha256:
            raise ValueError(f"{name}: {url} gave a file with sha256 {digest}, expected {r.sha256}; nothing was cached")
        provenance = {"url": r.url, "fetched_from": url, "licence": r.licence, "sha256_pinned": r.sha256 is not None}
        model = import_checkpoint(r.format, tmp, work / "model", provenance, name=name)
        check_promise(r, model)
        os.replace(tmp, src)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(work / "model", model_dir)
        write_json(folder / "fetched.json", {"url": url, "sha256": digest, "file": r.file_name,
                                             "sha256_pinned": r.sha256 is not None})
    except Exception:
        if src.is_file() and not (model_dir / "config.json").is_file():
            src.unlink()  # a kept file that failed its checks is not reused
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
