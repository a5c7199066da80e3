"""Place-labelled training data and the P x K batch sampler.

A ``PlaceSet`` is a list of places, each a list of image paths of that place. Builders read the formats
users have: GSV-Cities (``Images/<City>/...jpg`` + ``Dataframes/<City>.csv``), aligned traversals
(image i of every folder = place i: Nordland summer+winter gives 2 images per place, Gardens Point 3),
and CSV manifests (a ``place_id`` column, or places formed by grouping images within a radius).

Batches are a pure function of (seed, step, rank), so resuming at step s replays exactly the batches an
uninterrupted run would have seen, and under DDP each rank takes its own share of the places of the global batch.
Samplers (``data.sampler``):

* ``in-city`` (GSV-Cities as published, amaralibey/gsv-cities: its loader shuffles each city's places once per
  epoch and walks the cities in order without global shuffling): an epoch is every place exactly once; each
  city's places are permuted with a generator seeded by (seed, epoch, city), the cities are concatenated in
  order and cut into consecutive batches of P places (the last one shorter), so a batch holds places of one city
  (hard same-city negatives) except where a city ends inside it.
* ``epoch``: every place exactly once per epoch, one global permutation per epoch.
* ``images``: every *image* exactly once per epoch (a flat, shuffled image list, P images per batch, K = 1), as
  TAT-VPR's stage-1 distillation runs over GSV-Cities' images (its epochs count images, not places).
* ``uniform``: each step draws P places without replacement from all places (with ``weight``), independently
  of the other steps (an "epoch" is then N / P steps, which shows about 63% of the places).
* ``auto`` (default): ``in-city`` when every source is GSV-Cities, else ``uniform``.

In every sampler the K images of a place are drawn without replacement (with, when the place has fewer) by a
generator seeded by (seed, step, place).
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.datasets import read_manifest
from ..data.images import list_images, load_image, mean_intensity


@dataclass
class PlaceSet:
    """places[i]: image paths of place i (at least one); weights[i]: its relative sampling weight."""

    places: list[list[Path]]
    name: str = "places"
    weights: list[float] | None = None
    groups: list[str] | None = None  # the city (or source) of each place, for in-city batches

    def __len__(self) -> int:
        return len(self.places)

    def _w(self) -> list[float]:
        return self.weights if self.weights is not None else [1.0] * len(self.places)

    def _g(self) -> list[str]:
        return self.groups if self.groups is not None else [self.name] * len(self.places)

    def filter(self, min_images: int) -> PlaceSet:
        """The places with at least ``min_images`` images (GSV-Cities' min_img_per_place rule)."""
        keep = [i for i, p in enumerate(self.places) if len(p) >= min_images]
        return PlaceSet([self.places[i] for i in keep], self.name,
                        None if self.weights is None else [self.weights[i] for i in keep],
                        [self._g()[i] for i in keep])

    def weighted(self, weight: float) -> PlaceSet:
        """Every place drawn ``weight`` times as often as an unweighted one (balances small sources)."""
        if weight <= 0:
            raise ValueError(f"{self.name}: a place weight must be positive, got {weight}")
        return PlaceSet(self.places, self.name, [w * weight for w in self._w()], self._g())

    def __add__(self, other: PlaceSet) -> PlaceSet:
        weights = None if self.weights is None and other.weights is None else self._w() + other._w()
        return PlaceSet(self.places + other.places, f"{self.name}+{other.name}", weights, self._g() + other._g())


def aligned_places(folders: list[str | os.PathLike], start: int = 0, stop: int | None = None,
                   drop_dark: float | None = None) -> PlaceSet:
    """Image i (sorted by name) of every folder shows place i; keep places ``start <= i < stop``.

    drop_dark: leave out images darker than this mean gray level (0-255); places left with no image go.
    """
    lists = [list_images(f) for f in folders]
    n = len(lists[0])
    if any(len(x) != n for x in lists):
        counts = ", ".join(f"{f}={len(x)}" for f, x in zip(folders, lists, strict=True))
        raise ValueError(f"aligned folders differ in length: {counts}")
    places = []
    for i in range(start, n if stop is None else min(stop, n)):
        imgs = [x[i] for x in lists]
        if drop_dark:
            imgs = [p for p in imgs if mean_intensity(p) >= drop_dark]
        if imgs:
            places.append(imgs)
    return PlaceSet(places, "+".join(Path(f).name for f in folders))


def gsv_cities(root: str | os.PathLike, cities: list[str] | None = None) -> PlaceSet:
    """GSV-Cities: ``Dataframes/<City>.csv`` rows (place_id, year, month, northdeg, lat, lon, panoid)
    name the images ``Images/<City>/<city>_<place:07d>_<year:04d>_<month:02d>_<north:03d>_<lat>_<lon>_<pano>.jpg``."""
    root = Path(root)
    frames = sorted((root / "Dataframes").glob("*.csv"))
    if cities:
        frames = [root / "Dataframes" / f"{c}.csv" for c in cities]
    if not frames:
        raise FileNotFoundError(f"{root}: no Dataframes/*.csv (is this GSV-Cities?)")
    places: dict[tuple[str, int], list[Path]] = defaultdict(list)
    for f in frames:
        city = f.stem
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                pid = int(row["place_id"])
                name = (f"{city}_{pid:07d}_{int(row['year']):04d}_{int(row['month']):02d}_"
                        f"{int(row['northdeg']):03d}_{row['lat']}_{row['lon']}_{row['panoid']}.jpg")
                places[(city, pid)].append(root / "Images" / city / name)
    keys = sorted(places)
    return PlaceSet([places[k] for k in keys], "gsv-cities", groups=[city for city, _ in keys])


def manifest_places(csv_path: str | os.PathLike, radius: float | None = None) -> PlaceSet:
    """Places from a CSV manifest: by its ``place_id`` column, or (``radius``) by greedy grouping of
    images within ``radius`` metres of a group's first image, in file order."""
    paths, utm, place_ids = read_manifest(csv_path)
    if place_ids is not None and radius is None:
        groups: dict[str, list[Path]] = defaultdict(list)
        for p, pid in zip(paths, place_ids, strict=True):
            groups[pid].append(p)
        return PlaceSet([groups[k] for k in sorted(groups)], Path(csv_path).stem)
    if radius is None:
        raise ValueError(f"{csv_path}: no place_id column; give a grouping radius in metres")
    unassigned = np.ones(len(paths), bool)
    places = []
    for i in range(len(paths)):
        if unassigned[i]:
            near = unassigned & (((utm - utm[i]) ** 2).sum(1) <= radius * radius)
            places.append([paths[j] for j in np.nonzero(near)[0]])
            unassigned &= ~near
    return PlaceSet(places, Path(csv_path).stem)


SAMPLERS = ("auto", "uniform", "epoch", "in-city", "images")


def steps_per_epoch(num_places: int, places_per_batch: int, sampler: str, world: int = 1,
                    num_images: int | None = None) -> int:
    """Steps of one epoch: every place (``images``: every image) once, ceil(N / P), for the epoch samplers;
    N // P for ``uniform``. Under DDP (world > 1) the epoch samplers drop a last, shorter batch (ranks must
    gather equal shares)."""
    n = num_images if sampler == "images" and num_images is not None else num_places
    if sampler == "uniform" or world > 1:
        return max(1, n // places_per_batch)
    return -(-n // places_per_batch)


def epoch_batches(groups: list[str], places_per_batch: int, seed: int, epoch: int, in_city: bool) -> list[np.ndarray]:
    """The place indices of every batch of ``epoch`` (each place exactly once), see the module notes."""
    if in_city:
        order, names = [], list(dict.fromkeys(groups))
        for g, name in enumerate(names):
            members = np.array([i for i, x in enumerate(groups) if x == name])
            order.append(members[np.random.default_rng([seed, epoch, g, 23]).permutation(len(members))])
        perm = np.concatenate(order)
    else:
        perm = np.random.default_rng([seed, epoch, 29]).permutation(len(groups))
    return [perm[i:i + places_per_batch] for i in range(0, len(perm), places_per_batch)]


def images_of(places: np.ndarray, sizes: list[int], images_per_place: int, seed: int, step: int,
              rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """(place, image) pairs of this rank's share: K images per place, without replacement when it has K."""
    pairs = []
    for p in places[rank::world]:
        rng = np.random.default_rng([seed, step, int(p), 31])
        imgs = rng.choice(sizes[p], images_per_place, replace=sizes[p] < images_per_place)
        pairs += [(int(p), int(i)) for i in imgs]
    return pairs


def draw_batch(num_places: int, places_per_batch: int, sizes: list[int], images_per_place: int, seed: int,
               step: int, rank: int = 0, world: int = 1, weights: list[float] | None = None) -> list[tuple[int, int]]:
    """(place, image) pairs of this rank's share of the global batch of ``step``.

    The P places are drawn without replacement (with probability proportional to ``weights`` if given);
    K images per place without replacement when the place has K or more (else with). Rank r takes places
    r, r+world, ... of the global draw.
    """
    if places_per_batch > num_places:
        raise ValueError(f"places_per_batch={places_per_batch} exceeds the {num_places} training places")
    rng = np.random.default_rng([seed, step])
    p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
    chosen = rng.choice(num_places, places_per_batch, replace=False, p=p)
    pairs = []
    for p in chosen:
        k = sizes[p]
        imgs = rng.choice(k, images_per_place, replace=k < images_per_place)
        pairs.append([(int(p), int(i)) for i in imgs])
    return [pair for place in pairs[rank::world] for pair in place]


class PlaceBatches(Dataset):
    """Item s = the batch of step s: (images [P*K, 3, H, W], place labels [P*K], image ids [P*K], views).

    Image ids number every image of the place set (place by place), e.g. to key a feature cache.
    ``views`` maps a name to another transform of the same images before augmentation, e.g. a teacher's own
    input size: {"teacher": [P*K, 3, H', W']} (the teacher sees the clean image, as in TAT-VPR's distillation).
    """

    def __init__(self, places: PlaceSet, places_per_batch: int, images_per_place: int, transform, seed: int,
                 rank: int = 0, world: int = 1, augment=None, num_steps: int = 10**9,
                 views: dict | None = None, sampler: str = "uniform") -> None:
        if sampler not in SAMPLERS[1:]:
            raise ValueError(f"data.sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
        self.sampler = sampler
        if sampler == "images" and images_per_place != 1:
            raise ValueError(f"data.sampler 'images' draws single images: set data.images_per_place: 1 "
                             f"(got {images_per_place})")
        self.steps_per_epoch = steps_per_epoch(len(places), places_per_batch, sampler, world,
                                               sum(len(p) for p in places.places))
        self._epoch: tuple[int, list[np.ndarray]] | None = None
        self.places, self.P, self.K = places, places_per_batch, images_per_place
        self.transform, self.augment, self.seed = transform, augment, seed
        self.rank, self.world, self.num_steps = rank, world, num_steps
        self.views = views or {}
        self.sizes = [len(p) for p in places.places]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int).tolist()

    def __len__(self) -> int:
        return self.num_steps

    def pairs(self, step: int) -> list[tuple[int, int]]:
        """(place, image) pairs of this rank's share of step ``step``'s batch."""
        if self.sampler == "uniform":
            return draw_batch(len(self.places), self.P, self.sizes, self.K, self.seed, step, self.rank, self.world,
                              self.places.weights)
        epoch, b = divmod(step, self.steps_per_epoch)
        if self.sampler == "images":
            if self._epoch is None or self._epoch[0] != epoch:
                self._epoch = (epoch, [np.random.default_rng([self.seed, epoch, 37]).permutation(sum(self.sizes))])
            chosen = self._epoch[1][0][b * self.P:(b + 1) * self.P][self.rank::self.world]
            place = np.searchsorted(np.asarray(self.offsets), chosen, side="right") - 1
            return [(int(p), int(g - self.offsets[p])) for p, g in zip(place, chosen, strict=True)]
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.places._g(), self.P, self.seed, epoch, self.sampler == "in-city"))
        return images_of(self._epoch[1][b], self.sizes, self.K, self.seed, step, self.rank, self.world)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        pairs = self.pairs(step)
        xs: list[torch.Tensor] = []
        vs: dict[str, list[torch.Tensor]] = {k: [] for k in self.views}
        for j, (p, i) in enumerate(pairs):
            img = load_image(self.places.places[p][i])
            for k, t in self.views.items():
                vs[k].append(t(img))
            if self.augment is not None:  # resize first, then augment (GSV-Cities' order; cheap at train size)
                # timm's RandAugment draws its ops from numpy's global RNG and their magnitudes from `random`:
                # both are seeded from (seed, step, rank, image), so a resumed run augments identically.
                draw = hash((self.seed, step, self.rank, j)) & 0xFFFFFFFF
                random.seed(draw)
                np.random.seed(draw)
                img = self.augment(self.transform.resize(img) if hasattr(self.transform, "resize") else img)
            xs.append(self.transform(img))
        ids = torch.tensor([self.offsets[p] + i for p, i in pairs])
        return torch.stack(xs), torch.tensor([p for p, _ in pairs]), ids, {k: torch.stack(v) for k, v in vs.items()}
