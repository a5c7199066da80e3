"""The command line as a user meets it: bad input, the skip option, and the main job on real data."""

import json
import os
import subprocess
import sys

import numpy as np
import yaml
from PIL import Image

from tests.conftest import ROOT, TINY_MODEL, make_image


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgevpr.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)


def _bad_folder(root):
    root.mkdir(parents=True)
    img = Image.new("RGB", (80, 60), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 8
    img.save(root / "a_exif.jpg", exif=exif)
    Image.new("RGB", (64, 48), (20, 120, 30)).convert("CMYK").save(root / "b_cmyk.jpg")
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(root / "c_16bit.png")
    make_image(root / "full.jpg", 1)
    data = (root / "full.jpg").read_bytes()
    (root / "d_truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "full.jpg").unlink()
    (root / "e_text.jpg").write_text("this is not a JPEG")


def test_bad_input_one_line_error_then_skip(tmp_path):
    _bad_folder(tmp_path / "queries")
    for i in range(5):
        make_image(tmp_path / "db" / f"{i}.jpg", i)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_MODEL))
    common = ["eval", "--model", tmp_path / "tiny.yaml", "--db", tmp_path / "db", "--queries", tmp_path / "queries",
              "--aligned", "1", "--no-cache", "--no-efficiency", "--quiet", "--out", tmp_path / "out"]
    res = run_cli(*common)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "d_truncated.jpg" in lines[0] and lines[0].startswith("edgevpr: error:")

    res = run_cli(*common, "--skip-bad", "--json")
    assert res.returncode == 0, res.stderr
    assert "d_truncated.jpg" in res.stderr and "e_text.jpg" in res.stderr and "a_exif" not in res.stderr
    out = json.loads(res.stdout)
    (name, r), = out["datasets"].items()
    assert r["num_queries"] == 3 and len(r["failed_images"]) == 2


def test_main_job_on_gardens_point(data_root, tmp_path):
    """README's main job: the default model on Gardens Point Walking, +-2 frames, 100 places here.

    Measured on this machine (2026-11-23, effnet-lite0-gem, 224 px): night_right vs day_right R@1 0.870,
    day_left vs day_right R@1 0.920. Thresholds sit 0.05 below.
    """
    res = run_cli("eval", "--dataset", "gardens_point", "--no-efficiency", "--quiet", "--json",
                  "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", env={"EDGEVPR_DATA": str(data_root)})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["model"]["name"] == "effnet-lite0-gem"
    night = out["datasets"]["night_right_vs_day_right"]
    day = out["datasets"]["day_left_vs_day_right"]
    assert night["num_db"] == night["num_queries"] == 100
    assert night["recall"]["R@1"] >= 0.82
    assert day["recall"]["R@1"] >= 0.87
    assert (tmp_path / "out" / "results.md").read_text().count("| night_right_vs_day_right |") == 1


def test_every_option_states_its_default_and_every_command_has_an_example():
    import argparse

    from edgevpr.cli import _with_examples, build_parser

    problems = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        text = parser.format_help()
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    if not sp.epilog or not sp.epilog.startswith("example: edgevpr ") or not sp.description:
                        problems.append(f"{path} {name}: description or example missing")
                    walk(sp, f"{path} {name}")
            elif a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                shown = parser._get_formatter()._get_help_string(a)
                if not a.help or (not a.required and "default" not in shown):
                    problems.append(f"{path} {a.option_strings[0]}: help without its default")
        assert "usage:" in text

    walk(_with_examples(build_parser()), "edgevpr")
    assert problems == []


def test_every_help_shows_its_example_once():
    """`export --help` printed its example twice (a description and the epilog)."""
    import contextlib
    import io

    import pytest

    from edgevpr.cli import main

    for argv in (["export", "--help"], ["localize", "--help"], ["index", "relocate", "--help"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(argv)
        assert out.getvalue().lower().count("example") <= 1, argv
