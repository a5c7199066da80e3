"""Place index (build, resume, add, refuse), localize, ONNX export and the onnxruntime path."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

from edgevpr.cli import main
from edgevpr.deploy import index as idx
from edgevpr.deploy.embed import embed, embed_with_local, patch_tokens
from edgevpr.deploy.export import OnnxModel, export_onnx
from edgevpr.deploy.index.backends import faiss_kinds as fk
from edgevpr.deploy.localize import Localizer
from edgevpr.models.model import load_model
from tests.conftest import TINY_MODEL, make_image


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(TINY_MODEL)


def _folder(root, n, seed0=0):
    for i in range(n):
        make_image(root / f"img{i:03d}.png", seed0 + i, size=(64, 80))
    return root


def _entries(root):
    con = sqlite3.connect(root / idx.DB_FILE)
    try:
        return con.execute("SELECT id, path, descriptor FROM images ORDER BY id").fetchall()
    finally:
        con.close()


class _Stop(Exception):
    pass


def test_interrupted_build_resumes_to_the_same_entries(tiny, tmp_path):
    images = _folder(tmp_path / "db", 23)
    full = idx.build(tiny, images, tmp_path / "full", batch_size=4, progress=False)
    assert full["count"] == 23

    def stop_after_three(n_added):
        if n_added >= 12:
            raise _Stop

    with pytest.raises(_Stop):
        idx.build(tiny, images, tmp_path / "resumed", batch_size=4, progress=False, on_batch=stop_after_three)
    assert len(_entries(tmp_path / "resumed")) == 12  # three whole batches kept, no manifest yet
    with pytest.raises(FileNotFoundError, match="interrupted build"):
        idx.PlaceIndex.open(tmp_path / "resumed")
    res = idx.build(tiny, images, tmp_path / "resumed", batch_size=4, progress=False)
    assert (res["already_stored"], res["added"]) == (12, 11)
    assert _entries(tmp_path / "resumed") == _entries(tmp_path / "full")  # same ids, paths, descriptor bytes
    a, b = idx.PlaceIndex.open(tmp_path / "full"), idx.PlaceIndex.open(tmp_path / "resumed")
    q = a.descriptors()[:5]
    assert [[m.id for m in r] for r in a.search(q, 3)] == [[m.id for m in r] for r in b.search(q, 3)]
    with pytest.raises(FileExistsError, match="index add"):
        idx.build(tiny, images, tmp_path / "full", progress=False)


def test_add_then_search_finds_the_new_images(tiny, tmp_path):
    idx.build(tiny, _folder(tmp_path / "a", 12), tmp_path / "index", batch_size=5, progress=False)
    new = _folder(tmp_path / "b", 4, seed0=100)
    res = idx.add(tiny, new, tmp_path / "index", progress=False)
    assert (res["added"], res["count"]) == (4, 16)
    again = idx.add(tiny, new, tmp_path / "index", progress=False)  # nothing twice
    assert (again["added"], again["count"]) == (0, 16)
    loc = Localizer(tmp_path / "index", tiny)
    paths = sorted(new.glob("*.png"))
    found, _ = loc.localize_files(paths, k=1)
    assert [m[0].path for m in found] == [str(p.resolve()) for p in paths]
    assert all(m[0].id >= 12 and m[0].score > 0.9999 for m in found)
    q = loc.index.descriptors()[:3]
    mapped, read = (idx.PlaceIndex.open(tmp_path / "index", mmap=m, verify=True) for m in (True, False))
    assert [[m.id for m in r] for r in mapped.search(q, 2)] == [[m.id for m in r] for r in read.search(q, 2)]


def test_a_different_model_is_refused(tiny, tmp_path):
    idx.build(tiny, _folder(tmp_path / "a", 6), tmp_path / "index", progress=False)
    other = load_model({**TINY_MODEL, "aggregator": {"name": "gem", "p": 4.0}})
    with pytest.raises(ValueError, match="fingerprint .* not comparable"):
        Localizer(tmp_path / "index", other)
    with pytest.raises(ValueError, match="fingerprint"):
        idx.add(other, tmp_path / "a", tmp_path / "index", progress=False)


def test_unreadable_images_stop_or_are_skipped_and_reported(tiny, tmp_path):
    images = _folder(tmp_path / "db", 5)
    (images / "img002.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match="img002.png.*--skip-bad"):
        idx.build(tiny, images, tmp_path / "strict", progress=False)
    res = idx.build(tiny, images, tmp_path / "lenient", skip_bad=True, progress=False)
    assert res["count"] == 4 and [p for p, _ in res["failed_paths"]] == [str((images / "img002.png").resolve())]
    assert json.loads((tmp_path / "lenient" / idx.MANIFEST_FILE).read_text())["failed_images"] == 1


def test_csv_manifest_coordinates_and_map_positions(tiny, tmp_path):
    images = _folder(tmp_path / "db", 4)
    rows = ["path,place_id,lat,lon"] + [f"db/img{i:03d}.png,p{i},-27.4775,{153.0280 + i * 1e-4:.4f}" for i in range(4)]
    (tmp_path / "db.csv").write_text("\n".join(rows) + "\n")
    assert images.exists()
    idx.build(tiny, tmp_path / "db.csv", tmp_path / "index", progress=False)
    pi = idx.PlaceIndex.open(tmp_path / "index")
    m = pi.search(pi.descriptors()[2:3], 1)[0][0]
    assert (m.place_id, m.lat, m.lon) == ("p2", -27.4775, 153.0282)
    pos = pi.positions()
    assert pos["has_coordinates"] and np.allclose(np.diff(pos["east"]), pos["east"][1] - pos["east"][0], atol=0.1)
    (tmp_path / "bad.csv").write_text("path,lat,lon\ndb/img000.png,north,153\n")
    with pytest.raises(ValueError, match="bad.csv: line 2: column 'lat'"):
        idx.read_rows(tmp_path / "bad.csv")


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_kinds_find_what_flat_finds(kind):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64))
    x = (centres[rng.integers(0, 40, 2000)] + 0.3 * rng.standard_normal((2000, 64))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat, _ = fk._make_faiss("flat", 64, len(x), {})
    approx, params = fk._make_faiss(kind, 64, len(x), {})
    fk._configure(approx, kind, params)
    for index in (flat, approx):
        if not index.is_trained:
            index.train(x)
        index.add(x)
    q = x[:200] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)
    agree = np.mean(flat.search(q, 1)[1][:, 0] == approx.search(q, 1)[1][:, 0])
    assert agree >= 0.9, f"{kind} top-1 agrees with exact search on {agree:.2f} of queries"
    with pytest.raises(ValueError, match="at least 256 images"):
        fk._make_faiss("ivfpq", 64, 100, {})


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def test_onnx_matches_pytorch_for_the_default_model(data_root, tmp_path):
    model = load_model("effnet-lite0-gem")
    out = export_onnx(model, tmp_path / "m.onnx")
    onnx_model = OnnxModel(out)
    assert onnx_model.fingerprint() == model.fingerprint()  # same descriptors: same identity
    tf = model.transform()
    from edgevpr.data.images import load_image

    x = torch.stack([tf(load_image(data_root / "gardens_point" / f / "Image010.jpg"))
                     for f in ("day_right", "night_right", "day_left")])
    with torch.inference_mode():
        assert _cos(onnx_model(x), model(x)) >= 0.9999
        local = model.backbone.local_map(x)
    # the CNN's own local features (verification, torch-free) come out of the same graph: the stride-16 map
    tokens, grid = patch_tokens(onnx_model, x.numpy())
    assert grid == local.grid == (14, 14) and _cos(torch.from_numpy(tokens), local.patches) >= 0.9999
    # a grid in the metadata that the output does not fit (re-signed, so the checksum passes) is one line, not a
    # 10^10-cell allocation
    import onnx

    from edgevpr.deploy.onnx_model import meta_digest

    proto = onnx.load(str(out))
    meta = json.loads(proto.metadata_props[0].value)
    meta["local_features"]["grid"] = [100000, 100000]
    meta["meta_sha256"] = meta_digest(meta)
    proto.metadata_props[0].value = json.dumps(meta, sort_keys=True)
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    for read in (patch_tokens, embed_with_local):
        with pytest.raises(ValueError, match=r"bad.onnx: its local_features output \[3, 196, 112\] does not fit"):
            read(OnnxModel(tmp_path / "bad.onnx"), x.numpy())
    # a verified query's descriptor and features come from one forward, in torch and in the export alike
    for m, ref in ((model, model(x).detach().numpy()), (onnx_model, onnx_model.run(x.numpy()))):
        d, (got, g) = embed_with_local(m, x.numpy())
        assert g == (14, 14) and np.abs(d - ref).max() < 1e-5 and _cos(torch.from_numpy(got), local.patches) >= 0.9999
    q8 = OnnxModel(export_onnx(model, tmp_path / "m8.onnx", int8=True, calibration=data_root / "gardens_point" /
                               "day_right", calibration_count=8))
    assert q8.fingerprint() != model.fingerprint() and q8.fingerprint(runtime=False) == model.fingerprint()
    assert patch_tokens(q8, x.numpy())[0].shape == tokens.shape


VIT = {"name": "dinov2_vits14", "weights": None, "init_values": 1.0}


def test_a_vit_gives_its_tokens_from_the_descriptor_pass_only_when_it_keeps_every_patch():
    """``embed_with_local`` on a WeiToP-pruned ViT: at keep ratio 1.0 its descriptor and patch tokens come from one
    pass and equal the two separate ones (``embed``, ``patch_tokens``); at 0.5 the pass has no full grid, so no
    local features (verification then runs a pass of its own) and the descriptor is still the pruned one."""
    torch.manual_seed(0)
    model = load_model({"image_size": [112, 112], "backbone": {**VIT, "pruning": {"block": 3, "method": "weitop"}},
                        "aggregator": {"name": "weiad"}}).eval()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)).numpy()
    d, (tokens, grid) = embed_with_local(model, x, {"keep_ratio": 1.0})
    ref, ref_grid = patch_tokens(model, x)
    assert grid == ref_grid == (8, 8) and np.abs(tokens - ref).max() < 1e-5
    assert np.abs(d - embed(model, x, {"keep_ratio": 1.0})).max() < 1e-5
    d, local = embed_with_local(model, x, {"keep_ratio": 0.5})
    assert local is None and np.abs(d - embed(model, x, {"keep_ratio": 0.5})).max() < 1e-5
    assert np.abs(d - embed(model, x, {"keep_ratio": 1.0})).max() > 1e-3  # pruning changed the descriptor


@pytest.mark.parametrize("cfg,knobs,tol", [
    ({"backbone": {**VIT, "pruning": {"block": 3, "method": "weitop"}}, "aggregator": {"name": "weiad"}},
     {"keep_ratio": 0.5}, 0.9999),
    ({"backbone": {**VIT, "prompts": {"mode": "scene"}}, "aggregator": {"name": "efficientvpr"}}, {}, 0.9999),
    ({"backbone": VIT, "aggregator": {"name": "boq"}, "image_size": [98, 126]}, {}, 0.9999),
    ({"backbone": {**VIT, "stem": {"name": "mobilenetv2", "crop": ["blocks.5", "blocks.6", "conv_head", "bn2"]},
                   "pruning": {"block": 3, "method": "weitop"}}, "aggregator": {"name": "salad"}},
     {"keep_ratio": 0.5}, 0.9999),
    # hard per-token top-k: float rounding can swap near-tied channels, so a looser bound with sparsity
    ({"backbone": VIT, "aggregator": {"name": "salad"}, "ternary": {}}, {"sparsity": 0.4}, 0.999),
])
def test_onnx_matches_pytorch_for_vit_heads_and_knobs(cfg, knobs, tol, tmp_path):
    torch.manual_seed(0)
    model = load_model({"image_size": [112, 112], **cfg})
    onnx_model = OnnxModel(export_onnx(model, tmp_path / "m.onnx", knobs=knobs))
    assert onnx_model.baked_knobs == knobs
    x = torch.randn(3, 3, *model.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert _cos(onnx_model(x, **knobs), model(x, **knobs)) >= tol
    if knobs:
        name = next(iter(knobs))
        with pytest.raises(ValueError, match="baked in at export"):
            onnx_model(x, **{name: 0.1})


def test_cli_index_localize_export_and_onnx_query(tiny, tmp_path, capsys):
    from edgevpr.models.model import save_model

    save_model(tiny, tmp_path / "model")
    images = _folder(tmp_path / "db", 8)
    assert main(["index", "build", "--model", str(tmp_path / "model"), "--images", str(images),
                 "--out", str(tmp_path / "index"), "--quiet"]) == 0
    assert main(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    photo = str(images / "img005.png")
    assert main(["localize", "--index", str(tmp_path / "index"), "--model", str(tmp_path / "m.onnx"), "--json",
                 photo, "-k", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    top = res["results"][0]["matches"][0]
    assert top["path"].endswith("img005.png") and top["score"] > 0.9999 and len(res["results"][0]["matches"]) == 3
    assert main(["eval", "--model", str(tmp_path / "m.onnx"), "--db", str(images), "--queries", str(images),
                 "--aligned", "0", "--no-cache", "--quiet", "--json", "--out", str(tmp_path / "eval")]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["datasets"]["db_vs_db"]["recall"]["R@1"] == 1.0 and ev["efficiency"]["runtime"] == "onnxruntime"
    assert ev["model"]["fingerprint"] == tiny.fingerprint()
    other = tmp_path / "other"
    save_model(load_model({**TINY_MODEL, "aggregator": {"name": "gem", "p": 4.0}}), other)
    assert main(["localize", "--index", str(tmp_path / "index"), "--model", str(other), photo]) == 2
    assert "not comparable" in capsys.readouterr().err


def test_killed_cli_build_resumes_to_the_same_entries(tiny, tmp_path):
    """A real SIGKILL of `edgevpr index build` mid-way, then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from edgevpr.models.model import save_model

    save_model(tiny, tmp_path / "model")
    images = _folder(tmp_path / "db", 120)
    cmd = [sys.executable, "-m", "edgevpr.cli", "index", "build", "--model", str(tmp_path / "model"), "--images",
           str(images), "--batch-size", "1", "--quiet", "--device", "cpu"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    db, deadline = tmp_path / "killed" / idx.DB_FILE, time.monotonic() + 120
    while True:
        if db.exists():
            con = sqlite3.connect(db)
            try:
                n = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0
            con.close()
            if n >= 5:
                break
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the build stored nothing in 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(_entries(tmp_path / "killed"))
    assert 5 <= kept < 120 and not (tmp_path / "killed" / idx.MANIFEST_FILE).exists()
    subprocess.run([*cmd, "--out", str(tmp_path / "killed")], check=True, capture_output=True)
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    assert _entries(tmp_path / "killed") == _entries(tmp_path / "whole")


def test_query_knobs_override_the_index_knobs(tmp_path):
    """A WeiToP model indexed unpruned answers queries at any keep ratio; 1.0 is the index's own embedding."""
    torch.manual_seed(0)
    model = load_model({"backbone": {"name": "vit", "timm_name": "vit_tiny_patch16_224",
                                     "pruning": {"block": 3, "method": "weitop"}},
                        "aggregator": {"name": "weiad"}, "image_size": [96, 96]})
    images = _folder(tmp_path / "db", 6)
    idx.build(model, images, tmp_path / "index", knobs={"keep_ratio": 1.0}, progress=False)
    loc = Localizer(tmp_path / "index", model)
    photo = [images / "img003.png"]
    same, _ = loc.localize_files(photo, 1, {"keep_ratio": 1.0})
    assert same[0][0].path.endswith("img003.png") and same[0][0].score == pytest.approx(1.0, abs=1e-5)
    pruned, _ = loc.localize_files(photo, 6, {"keep_ratio": 0.5})
    assert len(pruned[0]) == 6 and pruned[0][0].score < same[0][0].score
    with pytest.raises(ValueError, match="no runtime knob 'sparsity'"):
        loc.localize_files(photo, 1, {"sparsity": 0.4})


def test_int8_export_of_a_ternary_vit_with_boq_head(tmp_path):
    """onnxruntime's symbolic shape inference fails on BoQ's graph; the export falls back and still quantises."""
    torch.manual_seed(0)
    model = load_model({"backbone": VIT, "aggregator": {"name": "boq"}, "image_size": [98, 98], "ternary": {}})
    q8 = OnnxModel(export_onnx(model, tmp_path / "q8.onnx", int8=True))
    x = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert q8.int8 and _cos(q8(x), model(x)) >= 0.99


def test_composed_edge_export_ternary_pruned_int8_matches_pytorch(tmp_path):
    """The composed edge model (configs/tat-vpr/cpu-edge.yaml's kind: ternary ViT on a CNN stem, WeiToP after block 3,
    WeiAD) exported with keep 0.5 baked in and int8 weights gives the PyTorch model's keep-0.5 descriptors, and not
    its unpruned ones."""
    torch.manual_seed(0)
    stem = {"name": "efficientnet_lite0", "crop": ["blocks.5", "blocks.6", "conv_head", "bn2"]}
    model = load_model({"backbone": {**VIT, "init_values": 0.1, "stem": stem,
                                     "pruning": {"block": 3, "method": "weitop"}},
                        "aggregator": {"name": "weiad"}, "image_size": [160, 160], "ternary": {}})
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    model(x, keep_ratio=0.5)  # a forward with autograd first (as a FLOP count does): export must still copy it
    q8 = OnnxModel(export_onnx(model, tmp_path / "edge.onnx", knobs={"keep_ratio": 0.5}, int8=True))
    with torch.inference_mode():
        pruned, full = model(x, keep_ratio=0.5), model(x)
        out = q8(x)
    assert q8.int8 and q8.baked_knobs == {"keep_ratio": 0.5}
    assert _cos(out, pruned) >= 0.9999 and _cos(out, full) < 0.995  # pruned vs full: 0.989 here


def test_manifest_coordinates_share_one_utm_zone(tmp_path):
    """Points either side of a zone border (6 deg E) stay in one frame: ~1.4 km apart, not ~660 km."""
    (tmp_path / "z.csv").write_text("path,lat,lon\na.png,50.0,5.99\nb.png,50.0,6.01\n")
    a, b = idx.read_rows(tmp_path / "z.csv")
    assert abs(b.east - a.east) == pytest.approx(1430, abs=20) and abs(b.north - a.north) < 100


def test_binary_index_stores_sign_bits_and_ranks_by_hamming(tiny, tmp_path):
    images = _folder(tmp_path / "db", 12)
    res = idx.build(tiny, images, tmp_path / "bin", kind="binary", batch_size=5, progress=False)
    assert res["count"] == 12
    pi = idx.PlaceIndex.open(tmp_path / "bin")
    d = tiny.out_dim
    assert pi.manifest["kind"] == "binary" and all(len(b) == d // 8 for (_, _, b) in _entries(tmp_path / "bin"))
    idx.build(tiny, images, tmp_path / "flat", progress=False)
    floats = idx.PlaceIndex.open(tmp_path / "flat")
    desc = floats.descriptors()
    assert np.array_equal(pi.descriptors(), np.packbits(desc > 0, axis=1))  # TeTRA hub bits: MSB first
    q = desc[:4] + 0.01
    found = pi.search(q, 12)
    bits_q, bits_db = np.unpackbits(idx.pack_bits(q), axis=1), np.unpackbits(pi.descriptors(), axis=1)
    hamming = (bits_q[:, None, :] != bits_db[None]).sum(-1)  # brute force
    for qi, matches in enumerate(found):
        assert [m.score for m in matches] == pytest.approx(sorted(1 - 2 * hamming[qi] / d, reverse=True))
        assert matches[0].id == qi or hamming[qi, matches[0].id] == hamming[qi, qi]
    idx.add(tiny, _folder(tmp_path / "more", 3, seed0=50), tmp_path / "bin", progress=False)
    again = idx.PlaceIndex.open(tmp_path / "bin")
    assert len(again) == 15 and again.search(np.ascontiguousarray(desc[:1]), 1)[0][0].score == 1.0
    with pytest.raises(_Stop):
        idx.build(tiny, images, tmp_path / "half", kind="binary", batch_size=4, progress=False, on_batch=_stop_now)
    with pytest.raises(ValueError, match="same --kind"):
        idx.build(tiny, images, tmp_path / "half", kind="flat", progress=False)


def _stop_now(n_added):
    raise _Stop


def test_int8_export_of_a_cnn_is_static_qdq_and_says_what_it_quantised(tiny, tmp_path, monkeypatch):
    import edgevpr.deploy.export as ex

    images = _folder(tmp_path / "db", 8)
    with pytest.raises(ValueError, match="--calibration"):
        export_onnx(tiny, tmp_path / "x.onnx", int8=True)
    fp32 = OnnxModel(export_onnx(tiny, tmp_path / "fp32.onnx"))
    q = OnnxModel(export_onnx(tiny, tmp_path / "int8.onnx", int8=True, calibration=images, calibration_count=8))
    assert q.meta["quantized"]["ops"].get("Conv", 0) > 10 and "static QDQ" in q.meta["quantized"]["method"]
    assert q.file_bytes() < 0.5 * fp32.file_bytes() and q.fingerprint() != fp32.fingerprint()
    from edgevpr.data.images import load_image

    x = np.stack([tiny.transform().array(load_image(p)) for p in sorted(images.glob("*.png"))])
    cos = (q.run(x) * fp32.run(x)).sum(-1)
    assert float(cos.min()) > 0.9  # calibrated on these images: close to fp32
    monkeypatch.setattr(ex, "_quantized_ops", lambda proto: {})
    with pytest.raises(ValueError, match="nothing in its graph is quantisable"):
        export_onnx(tiny, tmp_path / "none.onnx", int8=True, calibration=images, calibration_count=8)


def test_compact_descriptors_pca_whitening_float16_int8(tiny, tmp_path):
    images = _folder(tmp_path / "db", 24)
    idx.build(tiny, images, tmp_path / "flat", progress=False)
    flat = idx.PlaceIndex.open(tmp_path / "flat")
    q = flat.descriptors()
    exact = [[m.id for m in r] for r in flat.search(q, 3)]
    sizes = {}
    for name, params in (("f16", {"storage": "float16"}), ("i8", {"storage": "int8"}),
                         ("pca", {"pca_dim": 16, "storage": "float32"}), ("pca8", {"pca_dim": 16, "storage": "int8"})):
        idx.build(tiny, images, tmp_path / name, progress=False, params=params)
        pi = idx.PlaceIndex.open(tmp_path / name)
        assert pi.manifest["params"]["storage"] == params["storage"]
        assert pi.manifest["params"].get("pca_dim") == params.get("pca_dim")
        found = pi.search(q, 3)  # queries go through the same (PCA, storage) transform inside the index
        assert [r[0].id for r in found] == [e[0] for e in exact]  # every image still finds itself first
        if name == "f16":
            assert [[m.id for m in r] for r in found] == exact
        sizes[name] = pi.manifest["params"]["bytes_per_vector"]
    full = (tmp_path / "flat" / idx.FAISS_FILE).stat().st_size
    d = tiny.out_dim
    assert sizes == {"f16": 2 * d, "i8": d, "pca": 64, "pca8": 16}
    assert (tmp_path / "i8" / idx.FAISS_FILE).stat().st_size < 0.35 * full  # the codes are what the file holds
    with pytest.raises(ValueError, match="more database images than dimensions"):
        idx.build(tiny, images, tmp_path / "bad", progress=False, params={"pca_dim": 30})
