"""The held-out protocol every real-data benchmark here reports on: places no configuration trains or
validates on. Gardens Point 70-99 (night_right and day_left vs day_right, +-2 frames) and Nordland 64x32
places 2000-2499 (winter vs summer, +-1 frame, frames darker than 10/255 dropped). Training configs use
Gardens Point 0-59 / Nordland 0-1499 and validate on Gardens Point 60-69 / Nordland 1500-1999.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgevpr.api import EvalConf, evaluate_dataset
from edgevpr.data.datasets import VPRDataset, open_dataset

ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """EDGEVPR_DATA or ../shared/data (also exported, so configs' $EDGEVPR_DATA resolve)."""
    data = Path(os.environ.get("EDGEVPR_DATA") or ROOT.parent / "shared" / "data")  # the Makefile may export ""
    os.environ["EDGEVPR_DATA"] = str(data)
    return data


def gardens_point_queries(data: Path, folder: str, start: int, stop: int) -> VPRDataset:
    """Gardens Point ``folder`` queries start..stop-1 against the whole day_right database (+-2 frames): the
    database keeps every place, so look-alikes outside the query range still compete."""
    gp = data / "gardens_point"
    ds = open_dataset(gp / "day_right", gp / folder, aligned_tolerance=2)
    ds.q_paths, ds.positives = ds.q_paths[start:stop], ds.positives[start:stop]
    return ds


def held_out_sets(data: Path, day_left: bool = True) -> list[VPRDataset]:
    gp, nl = data / "gardens_point", data / "nordland_64x32"
    sets = [open_dataset(gp / "day_right", gp / "night_right", aligned_tolerance=2, frames=(70, 100))]
    if day_left:
        sets.append(open_dataset(gp / "day_right", gp / "day_left", aligned_tolerance=2, frames=(70, 100)))
    sets.append(open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1, frames=(2000, 2500), drop_dark=10))
    return sets


def top1_correct(model, sets: list[VPRDataset], size: tuple[int, int], **knobs) -> dict[str, np.ndarray]:
    """Per set, whether each query (with a positive, in order) has a correct top-1 [Q] bool, at ``size`` with
    runtime ``knobs`` (no descriptor cache): what paired comparisons of two models on the same queries need."""
    conf = EvalConf(cache_dir=None, efficiency=False, progress=False, image_size=size, knobs=knobs or None)
    return {ds.name: evaluate_dataset(model.eval(), ds, conf)[1]["top1_correct"] for ds in sets}


def recall1(model, sets: list[VPRDataset], size: tuple[int, int], **knobs) -> dict[str, float]:
    """R@1 per set at ``size`` with runtime ``knobs`` (no descriptor cache)."""
    return {name: float(hit.mean()) for name, hit in top1_correct(model, sets, size, **knobs).items()}
