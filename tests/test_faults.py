"""Fault injection: hostile data files, damaged bytes, truncations, misspelt fields, oversize values and a
chunked oversize upload. Each fault must give a one-line error naming the file or field (non-zero exit in the
CLI), a recomputation, or a fallback; never code execution, a traceback, or a silently wrong answer."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgevpr.cli import main
from edgevpr.data.datasets import vprbench
from edgevpr.deploy import index as idx
from edgevpr.deploy.export import OnnxModel, export_onnx
from edgevpr.deploy.localize import Localizer
from edgevpr.eval import extract as ex
from edgevpr.integrity import StampCache
from edgevpr.models.model import load_model, save_model
from edgevpr.train.loop import load_config, train
from tests.conftest import TINY_MODEL, free_port, make_image


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(TINY_MODEL)


def _folder(root: Path, n: int, seed0: int = 0) -> Path:
    for i in range(n):
        make_image(root / f"img{i:03d}.png", seed0 + i, size=(64, 80))
    return root


def _flip(path: Path, offset: int, n: int = 16) -> None:
    """Invert ``n`` bytes of ``path`` at ``offset`` (negative: from the end), keeping its size."""
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


def _truncate(path: Path, fraction: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgevpr: error:") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------------------------------- data files run no code
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_npy_ground_truth_runs_no_code(tmp_path, capsys):
    db, q = _folder(tmp_path / "db", 3), _folder(tmp_path / "q", 2, 10)
    marker = tmp_path / "pwned"
    gt = tmp_path / "crafted.npy"
    np.save(gt, np.array([[0, _Payload(marker)]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="refused: the file's pickle names posix.system|refused: .*system"):
        vprbench(db, q, gt)
    _one_line_error(capsys, ["eval", "--model", "effnet-lite0-gem", "--db", str(db), "--queries", str(q),
                             "--gt", str(gt), "--no-cache", "--no-efficiency", "--quiet"], "crafted.npy", "refused")
    assert not marker.exists()


def test_vprbench_ground_truth_as_users_have_it_still_loads(tmp_path):
    db, q = _folder(tmp_path / "db", 5), _folder(tmp_path / "q", 3, 10)
    rows = np.empty((3, 2), dtype=object)  # VPR-Bench: rows [query_idx, [ref idxs]] as lists or int64 arrays
    rows[0] = [0, [0, 1]]
    rows[1] = [1, np.array([2, 3], dtype=np.int64)]
    rows[2] = [np.int64(2), [4]]
    np.save(tmp_path / "ground_truth_new.npy", rows, allow_pickle=True)
    ds = vprbench(db, q, tmp_path / "ground_truth_new.npy")
    assert [p.tolist() for p in ds.positives] == [[0, 1], [2, 3], [4]]
    np.save(tmp_path / "bad.npy", np.array([[0, "x"]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="bad.npy: row"):
        vprbench(db, q, tmp_path / "bad.npy")


# -------------------------------------------------------------------------------------------- damaged model files
def test_damaged_onnx_weights_are_refused(tiny, tmp_path, capsys):
    onnx_file = export_onnx(tiny, tmp_path / "m.onnx")
    idx.build(OnnxModel(onnx_file), _folder(tmp_path / "db", 6), tmp_path / "index", progress=False)
    _flip(onnx_file, onnx_file.stat().st_size // 2)  # the middle of the file: weight bytes
    with pytest.raises(ValueError, match="differ from the export's checksum"):
        OnnxModel(onnx_file)
    _one_line_error(capsys, ["localize", "--index", str(tmp_path / "index"), "--model", str(onnx_file),
                             str(tmp_path / "db" / "img000.png")], "m.onnx", "checksum")


def test_non_finite_descriptors_are_an_error_not_an_empty_answer(tmp_path):
    torch.manual_seed(0)
    broken = load_model(TINY_MODEL)
    with torch.no_grad():
        next(broken.aggregator.parameters()).fill_(float("nan"))
    images = _folder(tmp_path / "db", 4)
    with pytest.raises(ValueError, match="non-finite descriptor.*img000.png"):
        idx.build(broken, images, tmp_path / "index", progress=False)
    with pytest.raises(ValueError, match="non-finite descriptor"):
        ex.extract(broken, sorted(images.glob("*.png")), progress=False)


def test_damaged_or_truncated_model_safetensors_is_one_line(tiny, tmp_path, capsys):
    save_model(tiny, tmp_path / "m")
    _truncate(tmp_path / "m" / "model.safetensors", 0.6)
    with pytest.raises(ValueError, match="model.safetensors: damaged safetensors"):
        load_model(tmp_path / "m")
    make_image(tmp_path / "q" / "a.png", 0)
    _one_line_error(capsys, ["eval", "--model", str(tmp_path / "m"), "--db", str(tmp_path / "q"), "--queries",
                             str(tmp_path / "q"), "--aligned", "0", "--no-cache", "--quiet"], "model.safetensors")


# ------------------------------------------------------------------------------------------------ index integrity
@pytest.fixture
def index_dir(tiny, tmp_path):
    idx.build(tiny, _folder(tmp_path / "db", 10), tmp_path / "index", progress=False)
    return tmp_path / "index"


def test_flipped_faiss_bytes_are_caught_before_the_first_answer(tiny, index_dir, capsys):
    faiss_file = index_dir / idx.FAISS_FILE
    before = faiss_file.stat()
    _flip(faiss_file, -200)  # inside the stored vectors
    os.utime(faiss_file, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the mtime put back
    with pytest.raises(ValueError, match="index.faiss: checksum differs"):
        Localizer(index_dir, tiny)
    assert main(["index", "info", str(index_dir), "--verify"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] is False and "index.faiss" in report["problems"][0]


def test_open_checks_by_stat_stamp_and_rehashes_after_any_change(index_dir, monkeypatch):
    calls = []
    from edgevpr.deploy.index import store

    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    idx.PlaceIndex.open(index_dir).close()
    assert calls == []  # stamped at build: an unchanged index opens with a stat per file
    (index_dir / idx.DB_FILE).touch()  # same bytes, new ctime: checked in full once, then stamped again
    idx.PlaceIndex.open(index_dir).close()
    assert calls == [idx.DB_FILE]
    idx.PlaceIndex.open(index_dir).close()
    assert calls == [idx.DB_FILE]
    idx.PlaceIndex.open(index_dir, verify=True).close()  # --verify always reads every byte
    assert calls == [idx.DB_FILE, idx.FAISS_FILE, idx.DB_FILE]
    assert (index_dir / StampCache.NAME).is_file()


def test_broken_manifest_is_not_verified(index_dir, capsys):
    (index_dir / idx.MANIFEST_FILE).write_text('{"model": {"name": "x"}, "dim": ')
    assert main(["index", "info", str(index_dir), "--verify"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] is False and "manifest.json: not valid JSON" in report["problems"][0]
    _one_line_error(capsys, ["localize", "--index", str(index_dir), "x.png"], "manifest.json")


def test_corrupt_sqlite_is_one_line(tiny, index_dir, capsys):
    db = index_dir / idx.DB_FILE
    db.write_bytes(b"not a database" * (db.stat().st_size // 14) + b"x" * (db.stat().st_size % 14))
    _one_line_error(capsys, ["localize", "--index", str(index_dir), "x.png"], "places.sqlite")
    with pytest.raises(ValueError, match="places.sqlite: not a usable SQLite database"):
        idx.add(tiny, index_dir.parent / "db", index_dir, progress=False)


def test_index_with_zero_images_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "broken.jpg").write_bytes(b"not a jpeg")
    _one_line_error(capsys, ["index", "build", "--model", "effnet-lite0-gem", "--images", str(tmp_path / "db"),
                             "--out", str(tmp_path / "index"), "--skip-bad", "--quiet"], "nothing to index")


def test_add_retries_a_failed_image_once_it_is_fixed(tiny, tmp_path):
    images = _folder(tmp_path / "db", 5)
    (images / "img002.png").write_bytes(b"broken")
    res = idx.build(tiny, images, tmp_path / "index", skip_bad=True, progress=False)
    assert (res["count"], res["failed"]) == (4, 1)
    assert idx.add(tiny, images, tmp_path / "index", skip_bad=True, progress=False)["added"] == 0  # unchanged
    make_image(images / "img002.png", 2, size=(64, 80))  # fixed: new size and mtime
    res = idx.add(tiny, images, tmp_path / "index", skip_bad=True, progress=False)
    assert (res["added"], res["failed"], res["count"], res["failed_paths"]) == (1, 0, 5, [])


# ------------------------------------------------------------------------------------------ descriptor cache chunks
def test_damaged_or_swapped_cache_chunks_are_named_and_recomputed(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ex, "CHUNK", 4)
    paths = sorted(_folder(tmp_path / "db", 10).glob("*.png"))
    ref = ex.extract(tiny, paths, cache_dir=tmp_path / "cache", progress=False).descriptors
    chunks = sorted((tmp_path / "cache" / tiny.fingerprint()).glob("*.npz"))
    assert len(chunks) == 3
    by_size = sorted(chunks, key=lambda c: c.stat().st_size)
    full_a, full_b = by_size[-1], by_size[-2]  # two chunks of 4 images: well-formed, same shapes
    shutil.copy(full_a, full_b)  # a well-formed chunk of other images in place of this one
    _truncate(by_size[0])  # and a truncated one
    capsys.readouterr()
    out = ex.extract(tiny, paths, cache_dir=tmp_path / "cache", progress=False)
    err = capsys.readouterr().err
    assert str(full_b) in err and str(by_size[0]) in err and "recomputing" in err
    assert out.from_cache == 4 and np.array_equal(out.descriptors, ref)
    again = ex.extract(tiny, paths, cache_dir=tmp_path / "cache", progress=False)  # rewritten: all cached now
    assert again.from_cache == 10 and np.array_equal(again.descriptors, ref)


# ------------------------------------------------------------------------------------------------------ training
def _train_conf(data_root: Path) -> dict:
    n = data_root / "nordland_64x32"
    return {"seed": 0, "model": TINY_MODEL,
            "data": {"places": [{"aligned": [str(n / "summer"), str(n / "winter")], "start": 0, "stop": 64}],
                     "places_per_batch": 8, "images_per_place": 2, "image_size": [64, 64]},
            "trainable": {"mode": "tail", "stages": 3}, "steps": 6, "checkpoint_every": 2}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(data_root, tmp_path, damage, capsys):
    conf = _train_conf(data_root)
    train(conf, tmp_path / "full", progress=False)
    train(conf, tmp_path / "killed", progress=False, stop_after=5)  # checkpoints at steps 2 and 4
    newest = tmp_path / "killed" / "checkpoints" / "step_0000004" / "model.safetensors"
    _flip(newest, newest.stat().st_size // 2) if damage == "flip" else _truncate(newest)
    capsys.readouterr()
    train(conf, tmp_path / "killed", resume=True, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgevpr: warning")]
    assert any("step_0000004/model.safetensors" in w for w in warnings)
    assert any("resuming from step_0000002" in w for w in warnings)
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the fallback resumes bit-exactly too


@pytest.mark.parametrize("key, hint", [
    ("optimizer.lrr=0.5", "did you mean 'optimizer.lr'"),
    ("schedule.warmup_step=5", "did you mean 'schedule.warmup_steps'"),
    ("val.evry=5", "did you mean 'val.every'"),
    ("loss.ms.alpah=2", "did you mean 'loss.ms.alpha'"),
    ("teacher.imag_size=[64,64]", "did you mean 'teacher.image_size'"),
    ("data.places.0.strat=3", "did you mean 'data.places[0].start'"),
    ("trainable.stage=1", "did you mean 'trainable.stages'"),
])
def test_misspelt_nested_keys_are_refused_with_the_closest_name(tmp_path, key, hint):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: effnet-lite0-gem\nval: {sets: []}\nteacher: {model: effnet-lite0-gem}\n"
                   "data: {places: [{aligned: [a, b]}]}\n")
    with pytest.raises(ValueError, match=f"c.yaml: unknown field .*{re.escape(hint)}"):
        load_config(cfg, [key])
    with pytest.raises(ValueError) as e:
        load_config(cfg, [key])
    assert "\n" not in str(e.value)


def test_oversize_numeric_fields_are_refused_before_any_allocation(tmp_path, capsys):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"field 'image_size' = \[100000"):
        load_model({**TINY_MODEL, "image_size": [100000, 100000]})
    assert time.perf_counter() - t0 < 5  # refused, not attempted
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {places_per_batch: 0}\n")
    with pytest.raises(ValueError, match="'data.places_per_batch' = 0"):
        load_config(cfg)
    with pytest.raises(ValueError, match="data.image_size"):
        load_config(cfg, ["data.places_per_batch=8", "data.image_size=[100000,64]"])
    for argv in (["eval", "--dataset", "gardens_point", "--batch-size", "0"],
                 ["localize", "--index", "x", "-k", "100000", "a.jpg"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "outside [1, " in capsys.readouterr().err
    _one_line_error(capsys, ["export", "--model", "effnet-lite0-gem", "--out", str(tmp_path / "m.onnx"),
                             "--image-size", "100000"], "--image-size")


# ------------------------------------------------------------------------------------------------------- service
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_chunked_oversize_upload_is_cut_off_and_the_server_keeps_serving(tiny, index_dir, tmp_path, monkeypatch):
    import httpx
    import uvicorn

    from edgevpr.deploy.service import ServiceLimits, create_app

    spool = tmp_path / "spool"  # where the multipart parser spools uploads: watched for growth
    spool.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spool))
    limit = 1_000_000
    app = create_app(Localizer(index_dir, tiny), ServiceLimits(max_upload_bytes=limit))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    peak_spool = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak_spool
        while not done.is_set():
            peak_spool = max(peak_spool, sum(f.stat().st_size for f in spool.glob("*") if f.is_file()))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rss0 = _rss_mb()
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            boundary = "xyz"
            head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
                    "Content-Type: image/jpeg\r\n\r\n").encode()
            s.sendall(f"POST /api/localize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode())
            s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
            block = b"\xff" * 65536
            sent = 0
            try:
                while sent < 500_000_000:  # 500 MB offered; the server must stop it near 1 MB
                    s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                    sent += len(block)
            except (BrokenPipeError, ConnectionResetError):
                pass
            s.settimeout(10)
            reply = s.recv(65536).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 413") and "exceeds the limit" in reply, reply[:200]
        assert sent < 100_000_000, sent  # cut off early: the sender saw the connection close
        assert peak_spool <= 2 * limit, peak_spool
        assert _rss_mb() - rss0 < 100
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.get("/api/health").json()["status"] == "ok"
            assert c.get("/api/thumb/" + "9" * 20).status_code == 404  # beyond SQLite's integers
            assert c.get("/api/thumb/-1").status_code == 404
            photo = (index_dir.parent / "db" / "img003.png").read_bytes()
            r = c.post("/api/localize", params={"k": 1}, files={"image": ("img003.png", photo, "image/png")})
            assert r.status_code == 200 and r.json()["matches"][0]["name"] == "img003.png"
    finally:
        done.set()
        srv.should_exit = True
        thread.join(timeout=10)
