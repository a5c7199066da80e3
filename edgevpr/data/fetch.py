"""Where the benchmark datasets live: ``EDGEVPR_DATA`` or a download cache."""

from __future__ import annotations

import os
import urllib.request
import zipfile
from pathlib import Path

from ..utils import atomic_write

#: Public Gardens Point Walking archive (Glover 2014, Zenodo record 4590133). Override with EDGEVPR_GP_URL.
GARDENS_POINT_URL = "https://zenodo.org/records/4590133/files/GardensPointWalking.zip?download=1"
GP_FOLDERS = ("day_left", "day_right", "night_right")


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVPR_CACHE", Path.home() / ".cache" / "edgevpr"))


def _find_gp(root: Path) -> Path | None:
    if all((root / f).is_dir() for f in GP_FOLDERS):
        return root
    for d in sorted(root.rglob("day_right")):
        if all((d.parent / f).is_dir() for f in GP_FOLDERS):
            return d.parent
    return None


def gardens_point_root(download: bool = True) -> Path:
    """Folder holding day_left/, day_right/, night_right/ (from EDGEVPR_DATA, else downloaded once)."""
    env = os.environ.get("EDGEVPR_DATA")
    if env:
        found = _find_gp(Path(env) / "gardens_point") or _find_gp(Path(env))
        if found:
            return found
    target = cache_root() / "datasets" / "gardens_point"
    found = _find_gp(target) if target.exists() else None
    if found:
        return found
    if not download:
        raise FileNotFoundError("Gardens Point Walking not found: set EDGEVPR_DATA to a folder with gardens_point/")
    url = os.environ.get("EDGEVPR_GP_URL", GARDENS_POINT_URL)
    archive = target.parent / "GardensPointWalking.zip"
    print(f"downloading Gardens Point Walking from {url} into {target} (set EDGEVPR_DATA to skip)")
    try:
        atomic_write(archive, lambda tmp: urllib.request.urlretrieve(url, tmp))
    except OSError as e:
        raise RuntimeError(
            f"cannot download Gardens Point Walking ({e.__class__.__name__}: offline?). "
            "Set EDGEVPR_DATA to a folder that contains gardens_point/{day_left,day_right,night_right}"
        ) from None
    with zipfile.ZipFile(archive) as z:
        z.extractall(target)
    found = _find_gp(target)
    if not found:
        raise RuntimeError(f"{archive}: the archive holds no day_left/day_right/night_right folders")
    return found
