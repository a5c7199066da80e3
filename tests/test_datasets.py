import numpy as np
import pytest
import utm

from edgevpr.data.datasets import aligned, manifest, open_dataset, utm_names, vprbench
from tests.conftest import make_image


def _folder(root, names, seed=0):
    for i, n in enumerate(names):
        make_image(root / n, seed + i)
    return root


def test_aligned_tolerance(tmp_path):
    names = [f"Image{i:03d}.jpg" for i in range(10)]
    ds = aligned(_folder(tmp_path / "db", names), _folder(tmp_path / "q", names, 50), tolerance=2)
    assert ds.num_db == ds.num_queries == 10
    assert ds.positives[0].tolist() == [0, 1, 2]
    assert ds.positives[5].tolist() == [3, 4, 5, 6, 7]
    assert ds.positives[9].tolist() == [7, 8, 9]


def test_aligned_count_mismatch_is_clear(tmp_path):
    _folder(tmp_path / "db", ["a.jpg", "b.jpg"])
    _folder(tmp_path / "q", ["a.jpg"])
    with pytest.raises(ValueError, match="same number of images"):
        aligned(tmp_path / "db", tmp_path / "q")


def test_utm_names_radius(tmp_path):
    db = _folder(tmp_path / "database", ["@100.0@200.0@x@.jpg", "@130.0@200.0@y@.jpg", "@500@500@z@.jpg"])
    q = _folder(tmp_path / "queries", ["@110.0@200.0@q@.jpg"], 9)
    ds = utm_names(db, q, radius=25)
    assert ds.positives[0].tolist() == [0, 1]
    assert utm_names(db, q, radius=15).positives[0].tolist() == [0]
    assert open_dataset(db, q).info["format"] == "utm"


def test_csv_manifest_latlon_to_utm(tmp_path):
    lat, lon = -27.4766, 153.0281  # Brisbane
    east, north, _, _ = utm.from_latlon(lat, lon)
    d_lat = 20 / 111_320  # ~20 m north
    make_image(tmp_path / "img" / "a.jpg", 1)
    make_image(tmp_path / "img" / "b.jpg", 2)
    make_image(tmp_path / "img" / "q.jpg", 3)
    rows = f"img/a.jpg,{lat + d_lat},{lon}\nimg/b.jpg,{lat + 5 * d_lat},{lon}\n"
    (tmp_path / "db.csv").write_text("path,lat,lon\n" + rows)
    (tmp_path / "q.csv").write_text(f"path,utm_east,utm_north\nimg/q.jpg,{east},{north}\n")
    ds = manifest(tmp_path / "db.csv", tmp_path / "q.csv", radius=25)
    assert ds.positives[0].tolist() == [0]
    assert abs(ds.db_utm[0, 1] - north - 20) < 0.5
    (tmp_path / "bad.csv").write_text("file,lat\nx.jpg,1\n")
    with pytest.raises(ValueError, match="bad.csv: missing column 'path'"):
        manifest(tmp_path / "bad.csv", tmp_path / "q.csv")


def test_vprbench_ground_truth(tmp_path):
    db = _folder(tmp_path / "ref", [f"{i:07d}.jpg" for i in range(4)])
    q = _folder(tmp_path / "query", [f"{i:07d}.jpg" for i in range(2)], 20)
    gt = np.empty((2, 2), dtype=object)
    gt[0] = [0, [0, 1]]
    gt[1] = [1, [3]]
    np.save(tmp_path / "ground_truth_new.npy", gt, allow_pickle=True)
    ds = vprbench(db, q, tmp_path / "ground_truth_new.npy")
    assert [p.tolist() for p in ds.positives] == [[0, 1], [3]]


def test_drop_dark_and_subset_remap(tmp_path):
    names = [f"{i:02d}.png" for i in range(6)]
    _folder(tmp_path / "db", names)
    _folder(tmp_path / "q", names, 10)
    make_image(tmp_path / "db" / "02.png", 0, mode="L")  # overwritten below with a black frame
    from PIL import Image

    Image.new("RGB", (64, 48)).save(tmp_path / "db" / "02.png")
    Image.new("RGB", (64, 48), (3, 3, 3)).save(tmp_path / "q" / "04.png")
    ds = open_dataset(tmp_path / "db", tmp_path / "q", aligned_tolerance=1, drop_dark=10)
    assert ds.num_db == 5 and ds.num_queries == 5
    assert ds.info["dropped_dark"] == {"db": 1, "queries": 1, "threshold": 10}
    # query 3 (frame 3) had db frames 2,3,4 -> frame 2 dropped -> new db indices of frames 3,4 are 2,3
    assert ds.positives[3].tolist() == [2, 3]


def test_unknown_layout_is_explained(tmp_path):
    _folder(tmp_path / "db", ["a.jpg"])
    _folder(tmp_path / "q", ["a.jpg"])
    with pytest.raises(ValueError, match="--aligned"):
        open_dataset(tmp_path / "db", tmp_path / "q")
