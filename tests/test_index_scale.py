"""The index at scale, on real descriptors: IVF-PQ with exact re-ranking agrees with flat search, `index tune`
chooses and records search settings, and the re-ranking vectors are checked like every index file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgevpr.cli import main
from edgevpr.data.images import load_image
from edgevpr.deploy import index as idx
from edgevpr.deploy.localize import Localizer
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def nordland(tmp_path_factory):
    """pixels-patchnorm indexes (flat and IVF-PQ) of 1000 Nordland summer frames, and 200 winter queries."""
    from edgevpr.models.model import load_model

    data = shared_data() / "nordland_64x32"
    tmp = tmp_path_factory.mktemp("scale")
    (tmp / "db.csv").write_text("path\n" + "\n".join(str(p) for p in sorted((data / "summer").glob("*.png"))[:1000]))
    model = load_model("pixels-patchnorm")
    for kind in ("flat", "ivfpq"):
        idx.build(model, tmp / "db.csv", tmp / kind, kind=kind, spec="pixels-patchnorm", progress=False)
    loc = Localizer(tmp / "flat")
    queries = np.concatenate([loc.embed([load_image(p)]) for p in sorted((data / "winter").glob("*.png"))[:1000:5]])
    return tmp, queries


def test_reranked_ivfpq_top1_equals_flat(nordland):
    tmp, q = nordland
    flat, ivf = idx.PlaceIndex.open(tmp / "flat"), idx.PlaceIndex.open(tmp / "ivfpq")
    fs, fi = flat.search_ids(q, 5)
    assert ivf.manifest["params"]["rerank"] == idx.DEFAULT_RERANK and ivf.vectors.dtype == np.float16
    ivf.manifest["params"]["rerank"] = 0
    plain = np.mean(ivf.search_ids(q, 1)[1][:, 0] == fi[:, 0])
    ivf.manifest["params"]["rerank"] = idx.DEFAULT_RERANK
    ivf.manifest["params"]["nprobe"] = ivf.manifest["params"]["nlist"]
    idx._configure(ivf.index, "ivfpq", ivf.manifest["params"])
    rs, ri = ivf.search_ids(q, 5)
    same = ri[:, 0] == fi[:, 0]
    # every disagreement is a float16 near-tie of the two exact scores
    assert np.all(np.abs(fs[~same, 0] - fs[~same, 1]) < 2e-3), (fs[~same, :2], ri[~same, 0])
    assert same.mean() >= 0.99 > plain  # PQ codes alone miss the exact top-1 often
    np.testing.assert_allclose(rs[same, 0], fs[same, 0], atol=2e-3)  # re-ranked scores are the exact cosines


def test_index_tune_chooses_and_records_settings(nordland, capsys):
    tmp, _ = nordland
    assert main(["index", "tune", "--index", str(tmp / "ivfpq"), "--target", "0.9", "--sample", "100", "--json",
                 "--quiet"]) == 0
    rec = json.loads(capsys.readouterr().out)
    chosen = rec["chosen"]
    assert rec["reached"] and chosen["agreement"] >= 0.9
    faster_ok = [t for t in rec["trials"] if t["agreement"] >= 0.9 and t["ms_per_query"] < chosen["ms_per_query"]]
    assert not faster_ok  # the fastest setting that reaches the target
    man = idx.read_manifest(tmp / "ivfpq")
    assert man["params"]["nprobe"] == chosen["nprobe"] and man["params"]["rerank"] == chosen["rerank"]
    assert idx.PlaceIndex.open(tmp / "ivfpq").index.nprobe == chosen["nprobe"]
    assert main(["index", "tune", "--index", str(tmp / "flat")]) == 2
    assert "no search settings to tune" in capsys.readouterr().err


def test_reranking_vectors_are_checked_at_open(nordland, tmp_path):
    import shutil

    tmp, _ = nordland
    shutil.copytree(tmp / "ivfpq", tmp_path / "i")
    f = tmp_path / "i" / idx.VECTORS_FILE
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="vectors.f16.npy: checksum differs"):
        idx.PlaceIndex.open(tmp_path / "i")
    assert not idx.verify_index(tmp_path / "i")["verified"]


def test_shards_merged_equal_a_single_build(tmp_path, capsys):
    """Three shards of 90 Gardens Point frames (built through the CLI, given to merge out of order) join into the
    index a single build makes: same rows in the same order, same descriptors, same answers."""
    data = shared_data() / "gardens_point"
    db = tmp_path / "db.csv"
    db.write_text("path,place_id\n" + "\n".join(f"{data / 'day_right' / f'Image{i:03d}.jpg'},{i}" for i in range(90)))
    common = ["--model", "pixels-patchnorm", "--images", str(db), "--quiet"]
    assert main(["index", "build", *common, "--out", str(tmp_path / "whole")]) == 0
    for i in range(3):
        assert main(["index", "build", *common, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/3"]) == 0
    assert [idx.read_manifest(tmp_path / f"s{i}")["count"] for i in range(3)] == [30, 30, 30]
    parts = [str(tmp_path / f"s{i}") for i in (2, 0, 1)]
    assert main(["index", "merge", *parts, "--out", str(tmp_path / "merged")]) == 0
    whole, merged = idx.PlaceIndex.open(tmp_path / "whole"), idx.PlaceIndex.open(tmp_path / "merged")
    assert merged.manifest["model"]["fingerprint"] == whole.manifest["model"]["fingerprint"]
    assert merged.rows(list(range(90))) == whole.rows(list(range(90)))
    np.testing.assert_array_equal(merged.descriptors(), whole.descriptors())
    q = Localizer(tmp_path / "whole").embed([load_image(data / "night_right" / "Image045.jpg")])
    assert [m.id for m in merged.search(q, 10)[0]] == [m.id for m in whole.search(q, 10)[0]]
    capsys.readouterr()
    # a missing shard, or a part of another model, is refused in one line
    assert main(["index", "merge", parts[0], parts[1], "--out", str(tmp_path / "bad")]) == 2
    assert "shards 0..n-1" in capsys.readouterr().err
    assert main(["index", "build", "--model", "effnet-lite0-gem", "--images", str(db), "--quiet", "--out",
                 str(tmp_path / "other"), "--shard", "2/3"]) == 0
    assert main(["index", "merge", parts[1], parts[2], str(tmp_path / "other"), "--out", str(tmp_path / "bad2")]) == 2
    assert "fingerprint" in capsys.readouterr().err
