"""The torch-free runtime: a fresh virtual environment with only ``edgevpr[runtime]`` builds an index with an
exported model and localizes a Gardens Point night photo (its own frame first); torch cannot be imported there;
verification, calibration fitting, plots and video are named extras (one line each until installed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from edgevpr.deploy.export import export_onnx
from edgevpr.deploy.inputs import write_video
from edgevpr.models.model import load_model
from tests.conftest import ROOT


def _timed(cmd: list, **kw) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd`` under /usr/bin/time -v -> (result, wall s, peak RSS MB)."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t0
    rss = next((int(line.split()[-1]) / 1024 for line in r.stderr.splitlines() if "Maximum resident" in line), -1.0)
    return r, wall, rss


def test_runtime_install_localizes_without_torch(data_root, tmp_path):
    onnx = export_onnx(load_model("effnet-lite0-gem"), tmp_path / "m.onnx")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                          f"{ROOT}[runtime]"], capture_output=True, text=True, timeout=1200)
    assert pip.returncode == 0, pip.stderr[-2000:]
    py, cli = venv / "bin" / "python", venv / "bin" / "edgevpr"
    for mod in ("torch", "timm"):
        assert subprocess.run([str(py), "-c", f"import {mod}"], capture_output=True).returncode != 0, mod
    gp = data_root / "gardens_point"
    build = subprocess.run([str(cli), "index", "build", "--model", str(onnx), "--images", str(gp / "day_right"),
                            "--out", str(tmp_path / "idx"), "--quiet"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    r, wall, rss = _timed([cli, "localize", "--index", tmp_path / "idx", "--model", onnx,
                           gp / "night_right" / "Image050.jpg", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    top = json.loads(r.stdout)["results"][0]["matches"][0]
    assert top["path"].endswith("day_right/Image050.jpg") and top["rank"] == 1
    # the base runtime is slim: verification, fitting a calibration and plots are extras, each one line naming it
    for argv, extra in (([cli, "localize", "--index", tmp_path / "idx", "--model", onnx, "--verify", "10",
                          gp / "night_right" / "Image068.jpg"], "edgevpr[verify]"),
                        ([cli, "calibrate", "--index", tmp_path / "idx", "--model", onnx, "--db", gp / "day_right",
                          "--queries", gp / "night_right", "--aligned", "2", "--quiet"], "edgevpr[calibrate]"),
                        ([cli, "index", "info", tmp_path / "idx", "--plot", tmp_path / "c.png"], "edgevpr[plot]"),
                        ([cli, "localize", "--index", tmp_path / "idx", "--model", onnx, write_video(
                            tmp_path / "w.mp4", [gp / "day_left" / "Image000.jpg"] * 3)], "edgevpr[video]")):
        r = subprocess.run(list(map(str, argv)), capture_output=True, text=True)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and extra in err[0], (argv[1], r.stderr[-1000:])
    models = subprocess.run([str(cli), "models"], capture_output=True, text=True)
    assert "none of the named models below runs here" in models.stdout
    assert all(line.split()[1] == "no" for line in models.stdout.splitlines() if line.startswith("effnet-lite0-gem"))
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                          f"{ROOT}[runtime,verify]"], capture_output=True, text=True, timeout=1200)
    assert pip.returncode == 0, pip.stderr[-2000:]
    # verification without torch, on the CNN export's own feature map: night 68, whose descriptor top-1 is place
    # 71 (wrong), comes out within +-2 frames
    r = subprocess.run([str(cli), "localize", "--index", str(tmp_path / "idx"), "--model", str(onnx), "--verify", "10",
                        str(gp / "night_right" / "Image068.jpg"), "--json", "-k", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)["results"][0]
    check = out["decision"]["verification"]
    assert check["features"] == "feature map" and check["moved"], check
    assert abs(int(out["matches"][0]["path"][-7:-4]) - 68) <= 2, out["matches"][0]
    info = subprocess.run([str(cli), "index", "info", str(tmp_path / "idx"), "--verify"], capture_output=True,
                          text=True)
    assert info.returncode == 0 and json.loads(info.stdout)["verified"] is True
    _, help_wall, _ = _timed([cli, "--help"])
    models, models_wall, models_rss = _timed([cli, "models"])
    assert models.returncode == 0 and "effnet-lite0-gem" in models.stdout, models.stderr[-2000:]
    # a torch-only command says in one line which extra it needs
    train = subprocess.run([str(cli), "eval", "--model", "effnet-lite0-gem", "--db", str(gp / "day_right"),
                            "--queries", str(gp / "night_right"), "--aligned", "2"], capture_output=True, text=True)
    assert train.returncode == 2 and train.stderr.strip().splitlines() == [
        "edgevpr: error: `edgevpr eval` needs torch, which this install lacks: pip install 'edgevpr[full]'"], \
        train.stderr
    # the hot path of localize never imports onnx (1.1 s of a cold start): the checksum is read from the file bytes
    code = ("import sys\nfrom edgevpr.cli import main\nmain(sys.argv[1:])\n"
            "print('onnx' in sys.modules, file=sys.stderr)")
    hot = subprocess.run([str(py), "-c", code, "localize", "--index", str(tmp_path / "idx"), "--model", str(onnx),
                          str(gp / "night_right" / "Image050.jpg")], capture_output=True, text=True)
    assert hot.returncode == 0 and hot.stderr.strip().splitlines()[-1] == "False", hot.stderr
    print(f"runtime venv: localize cold {wall:.2f} s, peak RSS {rss:.0f} MB; --help {help_wall:.2f} s; models "
          f"{models_wall:.2f} s, {models_rss:.0f} MB")
