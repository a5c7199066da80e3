"""Fault injection, round 4: a file or a peer carries data, never instructions; every network read ends; bounded work
before decoding; one line naming the file or field. Each test was seen red once with its fix undone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from edgevpr.cli import main
from edgevpr.deploy import index as idx
from edgevpr.deploy.index.backends import qdrant_edge
from edgevpr.models.model import load_model
from tests.conftest import TINY_MODEL, serve
from tests.test_faults import _one_line_error
from tests.test_faults_round3 import _build, _Handler, _model_file


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(TINY_MODEL)


def _hostile_snapshot(tiny, tmp_path: Path, params: dict) -> Path:
    """A real snapshot of a 6-image Edge map whose ``edgevpr-index.json`` also carries ``params``."""
    src = tmp_path / "src" if (tmp_path / "src").is_dir() else _build(tiny, tmp_path, "src", kind="qdrant")
    record = {k: v for k, v in idx.read_manifest(src).items() if k in ("model", "dim", "metric")}
    snap = tmp_path / f"hostile-{len(list(tmp_path.glob('hostile-*')))}.snapshot"
    qdrant_edge.write_snapshot(src / qdrant_edge.EDGE_DIR, str(snap), None,
                               {idx.ops.SNAPSHOT_RECORD: json.dumps({**record, "kind": "qdrant",
                                                                     "params": params}).encode()})
    return snap


# ------------------------------------------------------------------------ N: a snapshot's params are never obeyed
def test_pull_never_takes_a_path_or_a_server_from_the_snapshot(tiny, tmp_path, capsys):
    victim = tmp_path / "photos"
    victim.mkdir()
    (victim / "keep.jpg").write_bytes(b"mine")
    hits = []

    class Catch(_Handler):
        def do_PUT(self):  # noqa: N802  (qdrant-client creates collections with PUT)
            hits.append(self.path)
            self.send_response(500)
            self.end_headers()

        do_POST = do_GET = do_PUT  # noqa: N815

    with serve(Catch) as url:
        for n, params in enumerate(({"edge_path": str(victim)}, {"edge_path": "../photos"},
                                    {"url": url, "collection": "stolen"})):
            snap = _hostile_snapshot(tiny, tmp_path, params)
            dev = tmp_path / f"dev{n}"
            assert main(["index", "pull", "--index", str(dev), str(snap)]) == 0
            man = idx.read_manifest(dev)
            assert man["kind"] == "qdrant" and "url" not in man["params"]
            assert man["params"]["edge_path"] == qdrant_edge.EDGE_DIR and (dev / qdrant_edge.EDGE_DIR).is_dir()
            assert idx.verify_index(dev)["verified"]
            photo = str(tmp_path / "src-db" / "img002.png")
            capsys.readouterr()
            assert main(["localize", "--index", str(dev), "--model", _model_file(tiny, tmp_path), photo,
                         "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["results"][0]["matches"][0]["path"] == photo
    assert (victim / "keep.jpg").read_bytes() == b"mine" and not hits
    # a local manifest edited to point the shard elsewhere is refused in one line, the folder untouched
    man = json.loads((tmp_path / "dev0" / "manifest.json").read_text())
    man["params"]["edge_path"] = str(victim)
    (tmp_path / "dev0" / "manifest.json").write_text(json.dumps(man))
    _one_line_error(capsys, ["index", "pull", "--index", str(tmp_path / "dev0"), str(snap)], "params.edge_path")
    _one_line_error(capsys, ["index", "remove", "--index", str(tmp_path / "dev0"), "img001*"], "params.edge_path")
    assert (victim / "keep.jpg").read_bytes() == b"mine"


# ----------------------------------------------------------- W: every network read has a limit, a stall, a deadline
def test_pull_over_http_ends_at_its_byte_limit_its_stall_timeout_and_its_deadline(tmp_path, monkeypatch, capsys):
    class Endless(_Handler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(10_000):
                    self.wfile.write(b"\0" * (64 << 10))
                    self.wfile.flush()
                    time.sleep(self.server.pause)
            except OSError:
                pass

    dev = tmp_path / "dev"
    monkeypatch.setenv("EDGEVPR_MAX_DOWNLOAD_GB", str(2 / 1024))  # 2 MiB
    with serve(Endless, pause=0.0) as url:
        err = _one_line_error(capsys, ["index", "pull", "--index", str(dev), f"{url}/s"], "0.00195 GiB download limit",
                              "EDGEVPR_MAX_DOWNLOAD_GB", f"{url}/s")
    assert ".pulled" not in err and not dev.exists()
    monkeypatch.setenv("EDGEVPR_MAX_DOWNLOAD_GB", "4")
    monkeypatch.setenv("EDGEVPR_NET_DEADLINE_S", "1.5")
    t0 = time.monotonic()
    with serve(Endless, pause=0.3) as url:  # a trickle: never stalls, never ends
        _one_line_error(capsys, ["index", "pull", "--index", str(dev), f"{url}/s"], "1.5 s overall deadline",
                        "EDGEVPR_NET_DEADLINE_S")
    assert time.monotonic() - t0 < 10 and not dev.exists()

    class Silent(_Handler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.flush()
            time.sleep(5)

    monkeypatch.setenv("EDGEVPR_NET_STALL_S", "0.5")
    with serve(Silent) as url:
        _one_line_error(capsys, ["index", "pull", "--index", str(dev), f"{url}/s"], "sent nothing for 0.5 s",
                        "EDGEVPR_NET_STALL_S")
    assert not dev.exists()


# -------------------------------------------------------------------- X: entries bounded before anything is extracted
def test_a_snapshot_of_many_empty_entries_is_refused_after_a_bounded_read(tmp_path, capsys, monkeypatch):
    import io
    import tarfile

    monkeypatch.setattr(qdrant_edge, "MAX_SNAPSHOT_ENTRIES", 1000)
    snap = tmp_path / "many.snapshot"
    with tarfile.open(snap, "w") as tar:
        for i in range(3000):
            tar.addfile(tarfile.TarInfo(f"e{i}"), io.BytesIO(b""))
    _one_line_error(capsys, ["index", "pull", "--index", str(tmp_path / "dev"), str(snap)], "more than 1000 entries",
                    "many.snapshot")
    gz = tmp_path / "gz.snapshot"
    with tarfile.open(gz, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("e"), io.BytesIO(b""))
    _one_line_error(capsys, ["index", "pull", "--index", str(tmp_path / "dev"), str(gz)], "uncompressed tar")
    assert not (tmp_path / "dev").exists()
