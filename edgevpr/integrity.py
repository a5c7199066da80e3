"""Integrity helpers shared by every read path (torch-free: the deployment side uses them too).

* ``sha256_file``: streaming checksum of a file.
* ``check_finite``: descriptors with NaN/Inf are an error naming the images, never a silent empty answer.
* ``StampCache``: proof that a file was fully checksummed since it last changed. A file's ``st_ctime_ns`` moves
  on every write *and* on every ``utime`` (it cannot be set back by a user), so (device, inode, size, mtime,
  ctime) equal to the values recorded right after a full sha256 check means the bytes are the ones checked.
  Opening a multi-GB memory-mapped index then costs a ``stat`` per file instead of reading every byte.
* ``warn``: one-line warnings on stderr (``edgevpr: warning: ...``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def warn(message: str) -> None:
    print(f"edgevpr: warning: {message}", file=sys.stderr, flush=True)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_finite(desc: np.ndarray, names: Iterable[str], model: str) -> None:
    """desc [B, D]: raise ValueError naming the first image whose descriptor has NaN or Inf."""
    bad = ~np.isfinite(desc).all(axis=1)
    if bad.any():
        names = list(names)
        first = names[int(np.argmax(bad))] if names else "?"
        raise ValueError(f"model {model} gave a non-finite descriptor (NaN/Inf) for {first} and {int(bad.sum()) - 1} "
                         "more image(s) in its batch: its weights are probably damaged")


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class StampCache:
    """``<folder>/.verified.json``: {file name: {"sha256": ..., "stat": [dev, ino, size, mtime_ns, ctime_ns]}}."""

    NAME = ".verified.json"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / self.NAME
        try:
            self.stamps: dict = json.loads(self.path.read_text())
            if not isinstance(self.stamps, dict):
                self.stamps = {}
        except (OSError, ValueError, RecursionError):  # unreadable or hostile stamps: every file is checked in full
            self.stamps = {}

    def fresh(self, file: Path, sha256: str) -> bool:
        """True when ``file`` was fully checked against ``sha256`` and has not changed since."""
        s = self.stamps.get(file.name)
        try:
            return isinstance(s, dict) and s.get("sha256") == sha256 and s.get("stat") == _stat_key(file)
        except OSError:
            return False

    def record(self, file: Path, sha256: str) -> None:
        self.stamps[file.name] = {"sha256": sha256, "stat": _stat_key(file)}

    def save(self) -> None:
        """Best effort (a read-only index folder is fine: it is then fully checked at every open)."""
        from .utils import write_text

        try:
            write_text(self.path, json.dumps(self.stamps, indent=1) + "\n")
        except OSError:
            pass


def unknown_field(where: str, key: str, known: Iterable[str]) -> ValueError:
    """A one-line error for a misspelt field, with the closest known name when there is one."""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ValueError(f"{where}: unknown field '{key}' ({hint}known: {', '.join(known)})")
