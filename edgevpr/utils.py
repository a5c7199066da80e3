"""Small shared helpers: atomic file writes, seeding, devices (torch is imported only where needed)."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a killed job never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:  # disk full, a read-only folder: one line naming the file, the old one left as it was
        if e.filename is not None and str(path) in str(e):
            raise
        raise OSError(e.errno, f"{path}: could not be written ({e.strerror or e}); the previous file, if any, is "
                               "unchanged") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, _w)


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def default_cache_dir() -> Path:
    """Where descriptor caches live: ``$EDGEVPR_CACHE/descriptors`` (default ``~/.cache/edgevpr``)."""
    return Path(os.environ.get("EDGEVPR_CACHE", Path.home() / ".cache" / "edgevpr")) / "descriptors"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)


def pick_device(device: str | None = None):
    """'auto'/None -> CUDA when available, else CPU (a torch.device)."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def module_device(module):
    """The device of a torch module's first parameter or buffer; ``"cpu"`` for one without any (e.g. the
    parameter-free ``pixels-patchnorm`` model)."""
    first = next(iter([*module.parameters(), *module.buffers()]), None)
    return first.device if first is not None else "cpu"


def read_yaml(path: str | os.PathLike, text: str | None = None):
    """A YAML file (or ``text`` said to come from it) parsed with ``safe_load`` -> its object; ValueError in one
    line naming the file, line and column of a syntax error, or an unsupported tag (``!!python/...`` runs no code
    and is refused like any other error)."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text() if text is None else text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{where} ({what})") from None
    except (RecursionError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable YAML file ({type(e).__name__})") from None


#: the largest Unix time accepted (the year 3000): ``inf`` or ``1e20`` in a track is refused, not an overflow
MAX_UNIX_S = 32503680000.0


def parse_time(text: str, where: str) -> float:
    """A time as ISO 8601 (no zone: UTC) or Unix seconds -> Unix seconds; ValueError naming ``where``."""
    from datetime import datetime, timezone

    text = str(text).strip()
    try:
        t = float(text)
    except ValueError:
        pass
    else:
        if not (math.isfinite(t) and abs(t) <= MAX_UNIX_S):
            raise ValueError(f"{where}: time {text!r} is not a Unix time (finite, within +-{MAX_UNIX_S:g} s)")
        return t
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{where}: time {text!r} is neither ISO 8601 nor Unix seconds") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
