"""The README is the door: short, and every command in it parses as written; the tour's commands run on real data
(compress and serve run in tests/test_compress.py and tests/test_service.py, as the README says)."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from edgevpr.cli import build_parser, main
from tests.conftest import ROOT, shared_data

README = ROOT / "README.md"


def _commands() -> list[str]:
    """Every `edgevpr ...` line of the README's bash blocks, comments and line continuations removed."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [line.split("  #")[0].strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith("edgevpr ")]


def _argv(command: str) -> list[str]:
    data = shared_data() / "gardens_point"
    return shlex.split(command.replace("$D", str(data)))[1:]


def test_the_readme_is_a_short_door():
    assert len(README.read_text().splitlines()) < 200


def test_every_readme_command_parses_as_written():
    commands = _commands()
    assert {c.split()[1] for c in commands} == {"eval", "index", "calibrate", "localize", "compress", "serve"}
    parser = build_parser()
    for c in commands:
        try:
            parser.parse_args(_argv(c))
        except SystemExit:
            pytest.fail(f"README command does not parse: {c}")


def test_the_tour_runs_on_real_data(tmp_path, monkeypatch, capsys):
    """index build, calibrate, eval and localize --sequence --json-lines, as the README writes them (about 60-100
    s here: four real commands end to end over 100 frames each, which is what a doc test is for)."""
    monkeypatch.chdir(tmp_path)
    ran = set()
    for c in _commands():
        name = c.split()[1]
        if name in ("compress", "serve"):
            continue  # tests/test_compress.py and tests/test_service.py run them
        argv = _argv(c) + (["--quiet"] if name in ("index", "calibrate") else [])
        assert main(argv) == 0, c
        ran.add(name)
    assert ran == {"eval", "index", "calibrate", "localize"}
    lines = capsys.readouterr().out.strip().splitlines()
    frames = [json.loads(x) for x in lines if x.startswith('{"schema_version"')]
    assert frames[-1]["type"] == "summary" and frames[-1]["stream"]["answered"] == 100
    right = sum(abs(int(f["headline"]["match"]["path"][-7:-4]) - int(f["frame"][-7:-4])) <= 2
                for f in frames if f["type"] == "frame" and f["headline"].get("match"))
    assert right >= 90  # the sequence answers of the night walk against the map: a real run, not an empty one
