"""Bounded network reads: every download has a byte limit, a stall timeout and an overall deadline.

Each limit has a default and an environment variable that raises it; the error line names the URL, the limit and the
variable. Used by release downloads (``published/releases.py``) and ``index pull URL``; stream URLs have their own
stall timeout (``localize --stream-timeout``)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

#: (environment variable, default, unit) of each limit
LIMITS = {"bytes": ("EDGEVPR_MAX_DOWNLOAD_GB", 4.0, "GiB"), "stall": ("EDGEVPR_NET_STALL_S", 30.0, "s"),
          "deadline": ("EDGEVPR_NET_DEADLINE_S", 3600.0, "s")}


def limit(name: str) -> float:
    """The limit ``name`` ("bytes" in bytes, "stall" and "deadline" in seconds) from its variable or its default."""
    var, default, unit = LIMITS[name]
    raw = os.environ.get(var, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a number ({unit})") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{var}={raw!r} must be a positive finite number ({unit})")
    return value * 2**30 if name == "bytes" else value


def _over(url: str, name: str, what: str) -> OSError:
    var, default, unit = LIMITS[name]
    return OSError(f"{url} {what} (set {var}, default {default:g} {unit}, to raise it)")


def download(url: str, dest: str | os.PathLike, progress: bool = False, refuse_html: bool = False) -> int:
    """Stream ``url`` into ``dest`` -> bytes written. Raises ``OSError`` (one line naming the URL and the limit) on a
    declared or actual body over the byte limit, no byte for the stall timeout, the overall deadline passed, a body
    shorter than its Content-Length, or (``refuse_html``) an HTML page; ``dest`` may then hold a partial body."""
    from tqdm.auto import tqdm

    max_bytes, stall, deadline = limit("bytes"), limit("stall"), limit("deadline")
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=stall) as resp, open(dest, "wb") as f:
            if refuse_html and "html" in (resp.headers.get("Content-Type") or "").lower():
                raise OSError(f"{url} answered with an HTML page, not the file")
            total = int(resp.headers.get("Content-Length") or 0) or None
            if total is not None and total > max_bytes:
                raise _over(url, "bytes", f"declares {total / 2**30:.3g} GiB, over the {max_bytes / 2**30:.3g} GiB "
                                          "download limit")
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(dest).name, disable=not progress) as bar:
                while True:
                    block = resp.read1(1 << 20)  # what has arrived: a slow sender cannot hold one call past `stall`
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
                    if f.tell() > max_bytes:
                        raise _over(url, "bytes", f"sent more than the {max_bytes / 2**30:.3g} GiB download limit")
                    if time.monotonic() - start > deadline:
                        raise _over(url, "deadline", f"took longer than the {deadline:g} s overall deadline "
                                                     f"({f.tell()} bytes so far)")
            if total is not None and f.tell() != total:
                raise OSError(f"download of {url} ended after {f.tell()} of {total} bytes")
            return f.tell()
    except TimeoutError:
        raise _over(url, "stall", f"sent nothing for {stall:g} s (the stall timeout)") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _over(url, "stall", f"sent nothing for {stall:g} s (the stall timeout)") from None
        raise OSError(f"{url}: {e.reason}") from None
