"""A GSV-Cities-shaped mini dataset built from ../shared/data (symlinks, nothing copied): three "cities".

``Images/<City>/<City>_<place:07d>_<year>_<month>_<north>_<lat>_<lon>_<pano>.jpg`` + ``Dataframes/<City>.csv``
with the published columns (place_id, year, month, northdeg, lat, lon, panoid). A place is four images:
Nordland frames 2i and 2i+1 in summer and winter (cities Nordland1, Nordland2), Gardens Point frames 2i and 2i+1
in day_left and day_right (city Gardens; its last three places have only three images, so min_images=4 drops them).
"""

from __future__ import annotations

import csv
from pathlib import Path


def build(data: Path, root: Path, places_per_city: int = 40) -> Path:
    nl, gp = data / "nordland_64x32", data / "gardens_point"
    nl_frames = sorted(p.name for p in (nl / "summer").iterdir())
    cities = {
        "Nordland1": [[nl / s / nl_frames[f] for f in (2 * i, 2 * i + 1) for s in ("summer", "winter")]
                      for i in range(places_per_city)],
        "Nordland2": [[nl / s / nl_frames[f] for f in (2 * i, 2 * i + 1) for s in ("summer", "winter")]
                      for i in range(500, 500 + places_per_city)],
        "Gardens": [[gp / s / f"Image{f:03d}.jpg" for f in (2 * i, 2 * i + 1) for s in ("day_left", "day_right")]
                    for i in range(min(places_per_city, 50))],
    }
    for p in cities["Gardens"][-3:]:
        p.pop()  # three places with 3 images: below GSV-Cities' min_img_per_place = 4
    (root / "Dataframes").mkdir(parents=True, exist_ok=True)
    for city, places in cities.items():
        (root / "Images" / city).mkdir(parents=True, exist_ok=True)
        with open(root / "Dataframes" / f"{city}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"])
            for pid, images in enumerate(places):
                for j, src in enumerate(images):
                    row = [pid, 2015 + j, 1 + j, 90 * j, city, f"{50 + pid * 1e-4:.6f}", f"{j * 1e-4:.6f}",
                           f"pano{pid}x{j}"]
                    w.writerow(row)
                    name = (f"{city}_{pid:07d}_{row[1]:04d}_{row[2]:02d}_{row[3]:03d}_{row[5]}_{row[6]}_{row[7]}.jpg")
                    link = root / "Images" / city / name
                    if not link.exists():
                        link.symlink_to(src.resolve())
    return root
