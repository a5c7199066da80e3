"""The thread policy (edgevpr/threads.py) really bounds the threads that compute, and the light commands stay light."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgevpr import threads
from edgevpr.catalogue import AGGREGATOR_NAMES, BACKBONE_NAMES, IMPORT_FORMATS
from tests.conftest import ROOT

#: In a fresh process: apply the policy, then count the threads that did the work of a batch of 8 images (a thread is
#: busy when it used >= 10% of the process's CPU time over three forwards, read from /proc/self/task/*/stat).
BUSY = """
import os, sys
import numpy as np
from edgevpr import threads
threads.configure(int(sys.argv[1]))
kind, spec = sys.argv[2], sys.argv[3]

def cpu():
    out = {}
    for t in os.listdir("/proc/self/task"):
        f = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
        out[t] = int(f[11]) + int(f[12])
    return out

x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
if kind == "onnx":
    from edgevpr.deploy.onnx_model import OnnxModel
    m = OnnxModel(spec)
    run = lambda: m.run(x)
else:
    import torch
    from edgevpr.models.model import load_model
    m = load_model(spec).eval()
    t = torch.from_numpy(x)
    def run():
        with torch.no_grad():
            m(t)
run()
a = cpu()
for _ in range(3):
    run()
b = cpu()
use = {k: b[k] - a.get(k, 0) for k in b}
total = sum(use.values())
print(sum(v >= 0.1 * total for v in use.values()))
"""


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    from edgevpr.deploy.export import export_onnx
    from edgevpr.models.model import load_model

    return export_onnx(load_model("effnet-lite0-gem"), tmp_path_factory.mktemp("threads") / "m.onnx")


def _busy(n: int, kind: str, spec) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.ENV)}
    r = subprocess.run([sys.executable, "-c", BUSY, str(n), kind, str(spec)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to count threads")
@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_threads_1_computes_on_one_thread_and_2_on_two(kind, onnx_file):
    spec = onnx_file if kind == "onnx" else "effnet-lite0-gem"
    assert _busy(1, kind, spec) == 1
    assert _busy(2, kind, spec) == 2  # the contrast: the count above is the policy's doing, not the model's


def test_default_width_is_the_physical_cores_of_the_affinity(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    assert 1 <= threads.resolve() == threads.physical_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.resolve() == 3 and threads.resolve(1) == 1
    monkeypatch.setenv(threads.ENV, "many")
    with pytest.raises(ValueError, match="EDGEVPR_THREADS='many'"):
        threads.resolve()


def test_catalogue_names_equal_the_registries():
    """`edgevpr models` lists these without torch: they must be what the torch side registers."""
    from edgevpr.models import AGGREGATORS, BACKBONES
    from edgevpr.published import FAMILIES

    assert list(BACKBONE_NAMES) == BACKBONES.names() and list(AGGREGATOR_NAMES) == AGGREGATORS.names()
    assert list(IMPORT_FORMATS) == FAMILIES.names()


def test_models_and_help_do_not_import_torch():
    code = ("import sys, io, contextlib\nfrom edgevpr.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['models', '--json'])\n"
            "    try:\n        main(['localize', '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'onnx', 'faiss') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_a_missing_extra_is_one_line_naming_it():
    """What the runtime install prints for a torch-only command (torch made unimportable in a fresh process)."""
    code = ("import sys\nsys.modules['torch'] = None\nfrom edgevpr.cli import main\n"
            "sys.exit(main(['train', '--config', 'configs/tat-vpr/cpu-edge.yaml', '--out', '/nonexistent']) * 10 + "
            "main(['models', '--json']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 20, r.stderr  # train: 2, models: 0
    assert r.stderr.strip().splitlines() == ["edgevpr: error: `edgevpr train` needs torch, which this install "
                                             "lacks: pip install 'edgevpr[full]'"], r.stderr
    assert json.loads(r.stdout)["import_formats"] == list(IMPORT_FORMATS)
