"""Fault injection, round 3: no code from an index folder, no laundered corruption, bounds before work, bad
downloads never cached, silent config changes refused, and one-line errors where tracebacks were. Each test was
checked red by undoing its fix once (the closing note of the reliability issue lists how)."""

from __future__ import annotations

import fcntl
import http.server
import json
import pickle
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevpr.cli import main
from edgevpr.deploy import index as idx
from edgevpr.deploy import localize as loc_mod
from edgevpr.deploy import sequence as seq_mod
from edgevpr.deploy.export import META_KEY, OnnxModel, export_onnx
from edgevpr.integrity import sha256_file
from edgevpr.models.model import load_model, save_model
from edgevpr.published import CheckpointError, read_checkpoint
from edgevpr.published import releases as rel
from edgevpr.train.loop import load_config, train
from tests.conftest import TINY_MODEL, make_image, serve
from tests.test_faults import _folder, _one_line_error, _Payload, _train_conf
from tests.test_published import fixture


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(TINY_MODEL)


def _model_file(tiny, tmp_path: Path) -> str:
    """The module's tiny model saved as a folder (its config alone would draw new random weights)."""
    path = tmp_path / "tiny-model"
    if not path.is_dir():
        save_model(tiny, path)
    return str(path)


def _build(tiny, tmp_path: Path, name: str = "index", n: int = 6, **kw) -> Path:
    images = tmp_path / f"{name}-db"
    if not images.exists():
        _folder(images, n)
    idx.build(tiny, images, tmp_path / name, progress=False, **kw)
    return tmp_path / name


# ------------------------------------------------------------------------------------- no code from an index folder
def test_qdrant_index_runs_no_planted_pickle_on_any_read_path(tiny, tmp_path, capsys):
    """A planted pickle where qdrant-client's local mode kept its points (``qdrant/collection/<name>/storage.sqlite``)
    and inside the Edge shard never runs: not from ``index info --verify``, ``localize``, ``serve``'s app, nor from
    an index whose manifest still names local mode (refused before anything is opened)."""
    from edgevpr.deploy.localize import Localizer
    from edgevpr.deploy.service import create_app

    root = _build(tiny, tmp_path, kind="qdrant")
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    # the layout qdrant-client's local mode writes (a real collection), with its stored point replaced by the payload
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(root / "qdrant"))
    client.create_collection(f"edgevpr-{root.name}", models.VectorParams(size=4, distance=models.Distance.COSINE))
    client.upsert(f"edgevpr-{root.name}", [models.PointStruct(id=0, vector=[1.0, 0, 0, 0])])
    client.close()
    storage = root / "qdrant" / "collection" / f"edgevpr-{root.name}" / "storage.sqlite"
    con = sqlite3.connect(storage)
    con.execute("UPDATE points SET point = ?", (payload,))
    con.commit()
    con.close()
    for seg in (root / "qdrant-edge").rglob("*.json"):  # and one beside the engine's own files
        seg.with_suffix(".pkl").write_bytes(payload)
    photo = str(tmp_path / "index-db" / "img002.png")
    assert main(["index", "info", str(root), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    assert main(["localize", "--index", str(root), "--model", _model_file(tiny, tmp_path), photo, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["matches"][0]["path"] == photo
    create_app(Localizer(root, tiny))
    assert not marker.exists()
    # an index made with local mode is refused, never handed to qdrant-client
    man = json.loads((root / "manifest.json").read_text())
    man["params"] = {"url": None, "collection": f"edgevpr-{root.name}", "path": "qdrant"}
    (root / "manifest.json").write_text(json.dumps(man))
    capsys.readouterr()
    assert main(["index", "info", str(root), "--verify"]) == 1
    assert "local mode" in json.loads(capsys.readouterr().out)["problems"][0]
    _one_line_error(capsys, ["index", "info", str(root)], "local mode", "pickle")
    with pytest.raises(ValueError, match="local mode"):
        Localizer(root, tiny)
    assert not marker.exists()


def test_damaged_edge_shard_is_one_line_and_a_changed_point_is_caught(tiny, tmp_path, capsys):
    root = _build(tiny, tmp_path, kind="qdrant")
    photo = str(tmp_path / "index-db" / "img002.png")
    # points whose vectors no longer match their rows: caught by the spot check at every open
    from qdrant_edge import Point, UpdateOperation

    from edgevpr.deploy.index.backends.qdrant_edge import EdgeStore

    store = EdgeStore(root, {"edge_path": "qdrant-edge"}, tiny.out_dim)
    vec = np.zeros(tiny.out_dim, np.float32)
    vec[0] = 1.0
    store.shard.update(UpdateOperation.upsert_points([Point(id=i, vector=vec.tolist(), payload={}) for i in range(6)]))
    store.close()
    assert main(["index", "info", str(root), "--verify"]) == 1
    assert "differs from its row" in json.loads(capsys.readouterr().out)["problems"][0]
    _one_line_error(capsys, ["localize", "--index", str(root), "--model", _model_file(tiny, tmp_path), photo],
                    "qdrant-edge", "differs from its row")
    # garbage in the engine's files
    for f in (root / "qdrant-edge").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage" * 7)
    assert main(["index", "info", str(root), "--verify"]) == 1
    assert "not a readable Qdrant Edge shard" in json.loads(capsys.readouterr().out)["problems"][0]
    model = _model_file(tiny, tmp_path)
    for argv in (["index", "info", str(root)], ["localize", "--index", str(root), "--model", model, photo]):
        _one_line_error(capsys, argv, "qdrant-edge")


# -------------------------------------------------------------------------------------- corruption is not laundered
def _corrupt_row(root: Path, row: int = 0) -> None:
    con = sqlite3.connect(root / idx.DB_FILE)
    blob = con.execute("SELECT descriptor FROM images WHERE id = ?", (row,)).fetchone()[0]
    bad = np.frombuffer(blob, np.float32).copy()
    bad[:4] = 1e36
    con.execute("UPDATE images SET descriptor = ? WHERE id = ?", (bad.tobytes(), row))
    con.commit()
    con.close()


def test_add_and_merge_refuse_flipped_descriptor_bytes(tiny, tmp_path, capsys):
    root = _build(tiny, tmp_path)
    more = _folder(tmp_path / "more", 2, 50)
    _corrupt_row(root)
    with pytest.raises(ValueError, match="places.sqlite: its first 6 rows differ from the manifest's checksum"):
        idx.add(tiny, more, root, progress=False)
    assert not idx.verify_index(root)["verified"]  # nothing was re-recorded as valid
    with pytest.raises(ValueError, match="places.sqlite"):
        idx.merge([root], tmp_path / "merged")
    with pytest.raises(ValueError, match="places.sqlite"):
        idx.update_manifest(root, calibration={"threshold": 0.5})
    # the last line of defence: a database whose checksum was re-recorded still cannot seed a new index
    man = json.loads((root / "manifest.json").read_text())
    con = sqlite3.connect(root / idx.DB_FILE)
    man["rows_sha256"] = idx.rows_digest(con, man["count"])
    con.close()
    man["files"][idx.DB_FILE] = {"bytes": (root / idx.DB_FILE).stat().st_size,
                                 "sha256": sha256_file(root / idx.DB_FILE)}
    (root / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="not unit-length finite vectors"):
        idx.merge([root], tmp_path / "merged2")


def test_add_still_finishes_an_interrupted_add(tiny, tmp_path):
    root = _build(tiny, tmp_path)
    more = _folder(tmp_path / "more", 4, 50)

    def kill(n: int) -> None:
        if n >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        idx.add(tiny, more, root, batch_size=2, progress=False, on_batch=kill)
    assert idx.add(tiny, more, root, batch_size=2, progress=False)["count"] == 10
    assert idx.verify_index(root)["verified"]


def test_merge_refuses_shards_cut_from_different_image_lists(tiny, tmp_path, capsys):
    a, b = _folder(tmp_path / "a", 8), _folder(tmp_path / "b", 8)
    make_image(b / "img100.png", 100, size=(64, 80))  # b: one more image, so its halves split elsewhere
    idx.build(tiny, a, tmp_path / "s0", shard=(0, 2), progress=False)
    idx.build(tiny, b, tmp_path / "s1", shard=(1, 2), progress=False)
    _one_line_error(capsys, ["index", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                             str(tmp_path / "m")], "cut from another image list", "source_images")
    # the same count, other images: the recorded listing differs
    c = _folder(tmp_path / "c", 8, 30)
    idx.build(tiny, c, tmp_path / "c1", shard=(1, 2), progress=False)
    _one_line_error(capsys, ["index", "merge", str(tmp_path / "s0"), str(tmp_path / "c1"), "--out",
                             str(tmp_path / "m2")], "source_sha256")
    idx.build(tiny, a, tmp_path / "a1", shard=(1, 2), progress=False)
    assert idx.merge([tmp_path / "s0", tmp_path / "a1"], tmp_path / "ok")["count"] == 8


# --------------------------------------------------------------------------------- ONNX metadata inside the checksum
def test_onnx_preprocessing_metadata_is_checksummed(tiny, tmp_path, capsys):
    import onnx

    path = export_onnx(tiny, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    meta = json.loads(proto.metadata_props[0].value)
    meta["mean"] = [m + 2 ** -10 for m in meta["mean"]]  # a flip of low mantissa bits: every descriptor moves
    proto.metadata_props[0].value = json.dumps(meta, sort_keys=True)
    assert proto.metadata_props[0].key == META_KEY
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match="m.onnx: its 'edgevpr' metadata .* differs from the export's checksum"):
        OnnxModel(path)
    _one_line_error(capsys, ["index", "build", "--model", str(path), "--images", str(_folder(tmp_path / "db", 2)),
                             "--out", str(tmp_path / "i"), "--quiet"], "m.onnx", "checksum")


# ----------------------------------------------------------------------------------------------- bounds before work
def test_zip_member_over_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import edgevpr.published.importer as pub

    monkeypatch.setenv("EDGEVPR_MAX_CHECKPOINT_GB", str(1 / 1024))  # 1 MiB
    z = tmp_path / "boq.pth.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as f:
        f.writestr("boq.pth", b"\0" * (3 << 20))  # 3 MiB of zeros: a few KiB compressed
    assert z.stat().st_size < 64 << 10
    monkeypatch.setattr(pub, "torch_load", lambda p: pytest.fail("the member was read"))
    with pytest.raises(CheckpointError, match=r"boq.pth.zip: member boq.pth is 0.00293 GiB, over the 0.000977 GiB "
                                              r"checkpoint limit \(EDGEVPR_MAX_CHECKPOINT_GB raises it\)"):
        read_checkpoint(z)


def test_stride0_tensor_declaring_gigabytes_is_refused_before_any_copy(tmp_path, capsys):
    pth = tmp_path / "crafted.pth"
    torch.save({"backbone.0.weight": torch.zeros(512).expand(2 ** 21, 512)}, pth)  # 4 GiB over 2 KiB
    assert pth.stat().st_size < 64 << 10
    with pytest.raises(CheckpointError, match=r"tensor backbone.0.weight declares shape \[2097152, 512\] .* "
                                              "overlapping or stride-0 view"):
        read_checkpoint(pth)
    _one_line_error(capsys, ["import", "cosplace", str(pth), "--out", str(tmp_path / "m")], "crafted.pth", "stride-0")
    assert not (tmp_path / "m").exists()
    from edgevpr.models.weights import WeightsError, read_state_dict

    with pytest.raises(WeightsError, match="stride-0"):  # a backbone's local weights file: the same bound
        read_state_dict(pth)


def test_planted_pickles_in_checkpoints_run_no_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": _Payload(marker)}, tmp_path / "evil.pth")
    with zipfile.ZipFile(tmp_path / "evil.pth.zip", "w") as z:
        z.write(tmp_path / "evil.pth", "boq.pth")
    for f in ("evil.pth", "evil.pth.zip"):
        with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
            read_checkpoint(tmp_path / f)
    assert not marker.exists()


def test_a_sequence_request_over_its_pixel_budget_is_refused_before_decoding(tiny, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    from PIL import Image

    from edgevpr.deploy.localize import Localizer
    from edgevpr.deploy.service import ServiceLimits, create_app

    root = _build(tiny, tmp_path)
    app = create_app(Localizer(root, tiny), ServiceLimits(max_pixels=10**6, max_request_pixels=50_000))
    client = TestClient(app)
    frames = [make_image(tmp_path / f"f{i}.png", i, size=(120, 160)) for i in range(3)]  # 19200 px each
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or real_load(self))
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in frames]
    r = client.post("/api/localize_sequence?length=3", files=files)
    assert r.status_code == 413 and "57600 pixels in all exceed the request limit of 50000" in r.json()["detail"]
    assert not decoded
    r = client.post("/api/localize_sequence?length=3", files=files[:2])
    assert r.status_code == 200 and [f["width"] for f in r.json()["frames"]] == [160, 160]


def test_sequence_tracking_costs_the_same_at_every_frame(tiny, tmp_path, monkeypatch):
    """The ring holds L rows and each frame normalises one row and searches L rows once for itself and once per
    other order of them for the order test, a fixed number (before: all rows of the ring were normalised and
    searched for every one of its queries, L times the work at L frames)."""
    root = _build(tiny, tmp_path, n=12)
    pi = idx.PlaceIndex.open(root)
    normalised, searched = [], []
    real_n, real_ts = seq_mod.normalise, seq_mod.trajectory_scores

    def norm(s, *a, **k):
        normalised.append(len(s))
        return real_n(s, *a, **k)

    def ts(norm, *a, **k):
        searched.append(len(norm))
        return real_ts(norm, *a, **k)

    for mod in (seq_mod, loc_mod):
        monkeypatch.setattr(mod, "normalise", norm, raising=False)
        monkeypatch.setattr(mod, "trajectory_scores", ts, raising=False)
    tracker = loc_mod.Tracker(pi, length=4)
    desc = pi.descriptors()
    answers = [tracker.push(desc[i % len(desc)]) for i in range(10)]
    # per frame one search of at most L rows for the sequence itself and one per other order of its frames (the
    # temporal-order null: the reversal and fixed shuffles, ``sequence.reorderings``): constant once the ring is full
    from edgevpr.deploy.sequence import reorderings

    per_frame = [1 + len(reorderings(min(i + 1, 4))) for i in range(10)]
    assert sum(normalised) == 10 and max(searched) == 4 and len(searched) == sum(per_frame)
    assert per_frame[3:] == [per_frame[3]] * 7
    assert [a["frames"] for a in answers] == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    # and it answers as the offline search over the whole stream does
    monkeypatch.undo()
    s = pi.similarities(desc[np.arange(10) % len(desc)])
    offline, _ = seq_mod.seqslam(s, length=4, db_segments=pi.segments())
    assert [a["match"]["id"] for a in answers] == offline.tolist()
    pi.close()


# ------------------------------------------------------------------------------------- downloads: complete or nothing
class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``: name -> (body bytes, headers dict, cut: bytes to send before closing or None)."""

    def do_GET(self):  # noqa: N802
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.server.files:
            self.send_error(404)
            return
        body, headers, cut = self.server.files[name]
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def _server(files: dict):
    return serve(_Handler, files=files)


def _cosplace_release(tmp_path, monkeypatch, url: str) -> Path:
    monkeypatch.setenv("EDGEVPR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEVPR_MIRROR", url)
    return tmp_path / "cache" / "published" / "cosplace-resnet18-512"


def test_bad_downloads_are_never_cached_and_a_good_mirror_is_asked_again(tmp_path, monkeypatch, capsys):
    meta, path = fixture("cosplace")
    ckpt, name, dim = path.read_bytes(), "ResNet18_512_cosplace.pth", meta["arch"]["fc_output_dim"]
    for files, needle in (
            ({name: (b"<html>rate limited</html>", {"Content-Type": "text/html"}, None)}, "HTML page"),
            ({name: (ckpt, {}, len(ckpt) // 2)}, "body cut short"),  # no Content-Length: only the format tells
            ({name: (ckpt, {"Content-Length": str(len(ckpt))}, len(ckpt) - 100)}, "ended after"),
            ({name: (ckpt, {}, None)}, f"gives {dim}-D descriptors, the release is 512-D")):
        with _server(files) as url:
            folder = _cosplace_release(tmp_path, monkeypatch, url)
            with pytest.raises(ValueError, match=needle):
                load_model("cosplace-resnet18-512")
        assert not folder.exists() or not any(p.is_file() for p in folder.rglob("*")), list(folder.rglob("*"))
    # the same file under a name whose promise it keeps is cached, with where it came from and what was pinned
    promise = rel.Release("cosplace-resnet18-512", "cosplace", rel.RELEASES["cosplace-resnet18-512"].url, "MIT",
                          out_dim=dim, backbone={"timm_name": "resnet18"})
    monkeypatch.setitem(rel.RELEASES, "cosplace-resnet18-512", promise)
    with _server({name: (ckpt, {}, None)}) as url:
        folder = _cosplace_release(tmp_path, monkeypatch, url)
        model = load_model("cosplace-resnet18-512")
    prov = model.config["provenance"]
    assert prov["release"] == promise.url and prov["fetched_from"] == f"{url}/{name}" and prov["sha256_pinned"] is False
    assert (folder / name).is_file() and (folder / "model" / "config.json").is_file()


def test_an_endless_download_stops_at_the_limit(tmp_path, monkeypatch):
    class Endless(_Handler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(10_000):  # 640 MiB if nobody stops reading
                    self.wfile.write(b"\0" * (64 << 10))
            except OSError:
                pass

    monkeypatch.setenv("EDGEVPR_MAX_DOWNLOAD_GB", str(2 / 1024))  # 2 MiB
    with serve(Endless) as url:
        folder = _cosplace_release(tmp_path, monkeypatch, url)
        with pytest.raises(ValueError, match=r"sent more than the 0.00195 GiB download limit"):
            rel.load_release("cosplace-resnet18-512", progress=False)
    assert not any(p.is_file() for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------ silent changes refused
def test_resume_refuses_a_changed_config_unless_allowed(data_root, tmp_path, capsys):
    conf = _train_conf(data_root)
    train(conf, tmp_path / "run", progress=False, stop_after=3)
    changed = {**conf, "seed": 1, "optimizer": {"lr": 3e-4}}
    with pytest.raises(ValueError, match=r"--resume with a changed config \(optimizer.lr, seed\)"):
        train(changed, tmp_path / "run", resume=True, progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 0  # nothing rewritten
    lr_only = {**conf, "optimizer": {"lr": 3e-4}}
    train(lr_only, tmp_path / "run", resume=True, progress=False, allow_change=("optimizer.lr",))
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    lrs = [float(r.split(",")[header.index("lr")]) for r in rows[1:]]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(3e-4)  # the new rate took effect


@pytest.mark.parametrize("override, needle", [
    ("precision=fp8", "'precision' = 'fp8' is not one of fp32, bf16"),
    ("epochs=-1", "'epochs' = -1 must be a number in"),
    ("steps=0", "'steps' = 0 must be a number in"),
    ("trainable.mode=tial", "'trainable.mode' = 'tial' is not one of"),
    ("schedule.name=cosin", "'schedule.name' = 'cosin' is not one of"),
])
def test_unknown_enum_values_and_out_of_range_numbers_are_refused_at_parse_time(tmp_path, override, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: effnet-lite0-gem\n")
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        load_config(cfg, [override])


@pytest.mark.parametrize("value", ["nan", "2", "-1", "0", "inf"])
def test_index_tune_target_must_be_a_fraction(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["index", "tune", "--index", str(tmp_path), "--target", value])
    assert e.value.code == 2 and "--target" in capsys.readouterr().err
    with pytest.raises(ValueError, match="index tune: target"):
        idx.tune(tmp_path, float(value))


# ------------------------------------------------------------------------------------------ one line, not a traceback
def test_disk_full_during_a_build_is_one_line_and_the_build_resumes(tiny, tmp_path, monkeypatch, capsys):
    images = _folder(tmp_path / "db", 6)
    from edgevpr.deploy.index import ops

    real = ops._extract_into

    def full(con, *a, **k):
        con.execute("INSERT INTO meta VALUES ('x', 'y')")
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(ops, "_extract_into", full)
    argv = ["index", "build", "--model", _model_file(tiny, tmp_path), "--images", str(images), "--out",
            str(tmp_path / "i"), "--quiet"]
    _one_line_error(capsys, argv, "places.sqlite: database or disk is full", "run the same command again")
    monkeypatch.setattr(ops, "_extract_into", real)
    assert main(argv) == 0


def test_a_second_writer_is_refused_in_one_line(tiny, tmp_path, capsys):
    images = _folder(tmp_path / "db", 4)
    (tmp_path / "i").mkdir()
    with open(tmp_path / "i" / idx.LOCK_FILE, "a+") as held:  # another process's build, mid-way
        fcntl.flock(held, fcntl.LOCK_EX)
        _one_line_error(capsys, ["index", "build", "--model", _model_file(tiny, tmp_path), "--images", str(images),
                                 "--out", str(tmp_path / "i"), "--quiet"], "another edgevpr process is writing")
    assert not (tmp_path / "i" / idx.DB_FILE).exists()  # it touched nothing
    idx.build(tiny, images, tmp_path / "i", progress=False)
    assert idx.verify_index(tmp_path / "i")["verified"]


def test_resume_config_check_names_an_unreadable_config(tmp_path):
    from edgevpr.train.loop import check_resume

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: the run's config cannot be read"):
        check_resume(tmp_path, {"seed": 0})
