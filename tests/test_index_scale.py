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
    assert ivf.manifest["params"]["rerank"] == idx.DEFAULT_RERANK and ivf.backend.vectors.dtype == np.float16
    ivf.backend.configure({"rerank": 0})
    plain = np.mean(ivf.search_ids(q, 1)[1][:, 0] == fi[:, 0])
    ivf.backend.configure({"rerank": idx.DEFAULT_RERANK, "nprobe": ivf.manifest["params"]["nlist"]})
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
    assert idx.PlaceIndex.open(tmp / "ivfpq").backend.index.nprobe == chosen["nprobe"]
    assert main(["index", "tune", "--index", str(tmp / "flat")]) == 2
    assert "no search settings to tune" in capsys.readouterr().err


def test_index_tune_on_held_out_query_photos(nordland, tmp_path, capsys):
    """`index tune --queries` embeds real query photos with the index's model and measures agreement against
    exact search over the whole index: the recorded agreement is what those queries then get."""
    import shutil

    tmp, q = nordland
    shutil.copytree(tmp / "ivfpq", tmp_path / "i")
    winter = sorted((shared_data() / "nordland_64x32" / "winter").glob("*.png"))[:1000:5]
    (tmp_path / "q.txt").write_text("\n".join(str(p) for p in winter))
    assert main(["index", "tune", "--index", str(tmp_path / "i"), "--queries", str(tmp_path / "q.txt"),
                 "--target", "0.9", "--json", "--quiet"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["queries"] == "200 query photos (held out)" and rec["sample"] == 200
    pi = idx.PlaceIndex.open(tmp_path / "i")
    assert pi.manifest["params"]["nprobe"] == rec["chosen"]["nprobe"]
    exact = idx.PlaceIndex.open(tmp / "flat").search_ids(q, 1)[1][:, 0]
    agreement = np.mean(pi.search_ids(q, 1)[1][:, 0] == exact)
    assert agreement == pytest.approx(rec["chosen"]["agreement"]) and agreement >= 0.9
    with pytest.raises(ValueError, match="tuning queries have shape"):
        idx.tune(tmp_path / "i", queries=q[:, :10], progress=False)


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


#: Gardens Point day_right frame i placed at (LAT0 + i * STEP, 153.028): ~2 m apart, one session "day"
LAT0, STEP = -27.4775, 2e-5


def manifest(path, frames) -> str:
    """A CSV manifest of Gardens Point day_right ``frames`` with place ids, coordinates and a session."""
    data = shared_data() / "gardens_point"
    path.write_text("path,place_id,lat,lon,session\n" + "\n".join(
        f"{data / 'day_right' / f'Image{i:03d}.jpg'},{i},{LAT0 + i * STEP},153.028,day" for i in frames))
    return str(path)


def test_qdrant_edge_answers_as_faiss(tmp_path, capsys):
    """The default model's Gardens Point day_right index (coordinates from a CSV manifest) in FAISS, and the same
    rows in a Qdrant Edge shard (the engine in the process; made by `index merge --kind qdrant`, then extended by
    `index add`): the same localize answers, the same geo-radius results (Qdrant's native filter, FAISS's id
    selector), and a shard that lost points is refilled by the next add."""
    from edgevpr.deploy.decision import GeoPrior

    data, lat0, step = shared_data() / "gardens_point", LAT0, STEP

    common = ["--model", "effnet-lite0-gem", "--quiet"]
    assert main(["index", "build", *common, "--images", manifest(tmp_path / "a.csv", range(90)), "--out",
                 str(tmp_path / "faiss")]) == 0
    assert main(["index", "merge", str(tmp_path / "faiss"), "--kind", "qdrant", "--out", str(tmp_path / "qd")]) == 0
    rest = manifest(tmp_path / "b.csv", range(90, 100))
    for name in ("faiss", "qd"):
        assert main(["index", "add", "--index", str(tmp_path / name), "--images", rest, "--quiet"]) == 0
    capsys.readouterr()
    assert idx.read_manifest(tmp_path / "qd")["kind"] == "qdrant" and (tmp_path / "qd" / "qdrant-edge").is_dir()
    fa, qd = Localizer(tmp_path / "faiss"), Localizer(tmp_path / "qd")
    assert len(qd.index) == len(fa.index) == 100
    prior = GeoPrior(12.0, lat=lat0 + 60 * step, lon=153.028)
    for i in (5, 33, 61, 95):
        q = fa.embed([load_image(data / "night_right" / f"Image{i:03d}.jpg")])
        a, b = fa.answer(q, 5)[0], qd.answer(q, 5)[0]
        assert [m.id for m in a.matches] == [m.id for m in b.matches]
        np.testing.assert_allclose([m.score for m in a.matches], [m.score for m in b.matches], atol=1e-5)
        assert a.decision["score"] == pytest.approx(b.decision["score"], abs=1e-5)
        ga, gb = fa.answer(q, 50, prior)[0], qd.answer(q, 50, prior)[0]
        assert {m.id for m in ga.matches} == {m.id for m in gb.matches} == set(range(55, 66))
    # the CLI localizes through the collection
    photo = str(data / "night_right" / "Image050.jpg")
    assert main(["localize", "--index", str(tmp_path / "qd"), photo, "--json", "-k", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["matches"][0]["place_id"] == "50"
    # a collection that lost its last points (a killed upload) is refilled by the next add
    from qdrant_edge import UpdateOperation

    qd.index.backend.shard.update(UpdateOperation.delete_points(list(range(97, 100))))
    qd.index.backend.flush()
    with pytest.raises(ValueError, match="but 97 in .*qdrant-edge"):
        idx.PlaceIndex.open(tmp_path / "qd")
    assert main(["index", "add", "--index", str(tmp_path / "qd"), "--images", rest, "--quiet"]) == 0
    assert len(idx.PlaceIndex.open(tmp_path / "qd")) == 100


def test_qdrant_edge_snapshot_pull_partial_and_remove(tmp_path, capsys):
    """Fleet sync between Edge shards in Qdrant's snapshot format: a map (the default model's Gardens Point day_right,
    frames 0-89) snapshotted and pulled into a fresh device index answers exactly as the source; after the source
    gains frames 90-99, a partial snapshot against the device's manifest is smaller than a full one and brings the
    device to the same answers; images removed from the device are never answered again; a damaged snapshot is one
    line and leaves the device's index as it was."""
    data = shared_data() / "gardens_point"

    src, dev = str(tmp_path / "src"), str(tmp_path / "dev")
    assert main(["index", "build", "--model", "effnet-lite0-gem", "--quiet", "--kind", "qdrant", "--images",
                 manifest(tmp_path / "a.csv", range(90)), "--out", src]) == 0
    full = str(tmp_path / "full.snapshot")
    capsys.readouterr()
    assert main(["index", "snapshot", "--index", src, "--out", full, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["partial"] is False
    assert main(["index", "pull", "--index", dev, full]) == 0
    photos = [str(data / "night_right" / f"Image{i:03d}.jpg") for i in (5, 33, 61, 88, 95)]

    def answers(index):
        capsys.readouterr()
        assert main(["localize", "--index", index, *photos, "--json", "-k", "5"]) == 0
        return [[(m["id"], m["path"], m["place_id"], m["lat"], m["score"]) for m in r["matches"]]
                for r in json.loads(capsys.readouterr().out)["results"]]

    def same(a, b):  # ids, paths, places exactly; latitudes to 1e-9 degrees (Qdrant's geo payload rounds the last
        # bits of a float64) and cosines to float32 rounding (the shard re-normalises vectors)
        for x, y in zip(a, b, strict=True):
            assert [m[:3] for m in x] == [m[:3] for m in y], (x, y)
            np.testing.assert_allclose([m[3:] for m in x], [m[3:] for m in y], atol=1e-5, rtol=0)

    same(answers(dev), answers(src))
    pulled = idx.read_manifest(tmp_path / "dev")
    assert pulled["count"] == 90 and pulled["model"]["fingerprint"] == idx.read_manifest(tmp_path / "src")["model"][
        "fingerprint"] and idx.verify_index(dev)["verified"]
    assert [s["session"] for s in idx.PlaceIndex.open(dev).sessions()] == ["day"]  # every row column travels
    # the device asks only for what changed since its own state: nothing yet (only unversioned files are sent),
    # then the images the source gains
    mine = str(tmp_path / "device-manifest.json")
    assert main(["index", "snapshot", "--index", dev, "--manifest", "--out", mine]) == 0
    part, whole = str(tmp_path / "part.snapshot"), str(tmp_path / "whole.snapshot")

    def sent(*argv):
        capsys.readouterr()
        assert main(["index", "snapshot", "--index", src, *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["files"]

    assert sent("--since", mine, "--out", part) < sent("--out", whole)
    assert main(["index", "add", "--index", src, "--images", manifest(tmp_path / "b.csv", range(90, 100)),
                 "--quiet"]) == 0
    assert main(["index", "snapshot", "--index", src, "--since", mine, "--out", part]) == 0
    assert main(["index", "snapshot", "--index", src, "--out", whole]) == 0
    capsys.readouterr()
    assert main(["index", "pull", "--index", dev, part, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"count": 100, "partial": True, "source": part}
    same(answers(dev), answers(src))
    assert int(answers(dev)[4][0][2]) >= 90  # a frame only the partial snapshot brought
    # a damaged snapshot: one line, the device's index untouched
    bad = tmp_path / "bad.snapshot"
    bad.write_bytes(open(whole, "rb").read()[:5000])
    assert main(["index", "pull", "--index", dev, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.snapshot" in err and "\n" not in err and idx.verify_index(dev)["verified"]
    # a snapshot that unpacks but whose points are no edgevpr rows (no paths) is refused after staging: the device
    # index keeps its files and answers
    import qdrant_edge as qe

    from edgevpr.deploy.index.backends.qdrant_edge import edge_config, write_snapshot

    foreign = qe.EdgeShard.create(str(tmp_path / "foreign"), edge_config(qe, 1280, {}))
    foreign.update(qe.UpdateOperation.upsert_points([qe.Point(id=i, vector=np.random.default_rng(i).standard_normal(
        1280).tolist(), payload={}) for i in range(3)]))
    foreign.flush()
    foreign.close()
    write_snapshot(tmp_path / "foreign", str(tmp_path / "foreign.snapshot"))
    before = answers(dev)
    assert main(["index", "pull", "--index", dev, str(tmp_path / "foreign.snapshot")]) == 2
    err = capsys.readouterr().err.strip()
    assert "point 0 has no 'path'" in err and "\n" not in err
    assert idx.verify_index(dev)["verified"] and not (tmp_path / "dev" / ".pull").exists()
    same(answers(dev), before)
    # removed images are never answered again (the shard is rebuilt from the remaining rows)
    assert main(["index", "remove", "--index", dev, "Image03*", "Image09*"]) == 0
    gone = {f"{i}" for i in [*range(30, 40), *range(90, 100)]}
    for result in answers(dev):
        assert not gone & {m[2] for m in result}
    capsys.readouterr()
    assert main(["localize", "--index", dev, *photos, "--json", "-k", "80"]) == 0
    assert not gone & {m["place_id"] for r in json.loads(capsys.readouterr().out)["results"] for m in r["matches"]}


@pytest.mark.parametrize("record, says", [(b" " * (2 << 20), "at most 1048576"), (b"{{", "is not JSON"),
                                          (b'{"model": {"name": 1}}', "lacks model.name")])
def test_a_hostile_snapshot_record_is_one_line_before_anything_is_read_or_changed(tmp_path, capsys, record, says):
    """The model record a snapshot carries is bounded in size and checked in shape before it is used."""
    import io
    import tarfile

    snap = tmp_path / "hostile.snapshot"
    with tarfile.open(snap, "w") as tar:
        info = tarfile.TarInfo("edgevpr-index.json")
        info.size = len(record)
        tar.addfile(info, io.BytesIO(record))
    assert main(["index", "pull", "--index", str(tmp_path / "dev"), str(snap)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "hostile.snapshot" in err and "\n" not in err
    assert not (tmp_path / "dev" / "qdrant-edge").exists()
