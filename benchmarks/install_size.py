"""Installed size of each edgevpr extra, measured in fresh virtual environments.

    python benchmarks/install_size.py [--extras runtime runtime,calibrate ...] [--torch "torch==2.14.1 ..."]

Each row: a new venv (``python -m venv``), ``pip install ".[EXTRAS]"`` from this checkout (``full`` also gets the
torch pair the Makefile installs), then the bytes of every file under the venv's site-packages (what the install
put there, pip and setuptools included: about 12 MB), and the five largest distributions. The goal for the base
runtime is under 350 MB. Writes benchmarks/results/install_size.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("runtime", "runtime,video", "runtime,calibrate", "runtime,verify", "runtime,plot", "runtime,qdrant",
          "runtime,video,calibrate,verify,plot", "full")
TORCH = "torch==2.14.1 torchvision==0.29.1"


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def measure(extras: str, torch: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="edgevpr-size-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        t0 = time.perf_counter()
        if extras == "full":
            subprocess.run([*pip, *torch.split()], check=True, capture_output=True)
        r = subprocess.run([*pip, f"{ROOT}[{extras}]"], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"pip install .[{extras}] failed: {r.stderr[-2000:]}")
        site = next((venv / "lib").glob("python*/site-packages"))
        dists: dict[str, int] = {}
        for top in site.iterdir():
            if top.name.endswith((".dist-info", ".pth")) or top.name == "__pycache__":
                continue
            dists[top.name] = tree_bytes(top) if top.is_dir() else top.stat().st_size
        largest = sorted(dists.items(), key=lambda kv: -kv[1])[:5]
        return {"extras": extras, "mb": tree_bytes(site) / 1e6, "install_s": time.perf_counter() - t0,
                "largest": [[name, size / 1e6] for name, size in largest]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extras", nargs="+", default=list(EXTRAS), help=f"extras to measure (default: {EXTRAS})")
    ap.add_argument("--torch", default=TORCH, help=f"the torch pair of `full` (default: {TORCH})")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from edgevpr.utils import write_json, write_text

    rows = []
    for extras in args.extras:
        rows.append(measure(extras, args.torch))
        print(rows[-1], flush=True)
    write_json(ROOT / "benchmarks" / "results" / "install_size.json", {"python": sys.version.split()[0],
                                                                         "rows": rows})
    lines = [f"# Installed size of each extra (`python benchmarks/install_size.py`, Python {sys.version.split()[0]}, "
             "fresh venvs)", "",
             "| pip install | installed MB | largest parts (MB) |", "|---|---:|---|"]
    for r in rows:
        parts = ", ".join(f"{n} {mb:.0f}" for n, mb in r["largest"])
        lines.append(f"| `edgevpr[{r['extras']}]` | {r['mb']:.0f} | {parts} |")
    write_text(ROOT / "benchmarks" / "results" / "install_size.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
