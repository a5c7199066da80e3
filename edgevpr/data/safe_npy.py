"""Read ``.npy`` files without running code from them.

``np.load(..., allow_pickle=True)`` executes whatever a file's pickle asks for. VPR-Bench ships its ground truth
(``ground_truth_new.npy``) as an *object* array, whose payload is a pickle, so a plain ``allow_pickle=False``
cannot read it. ``load_npy`` reads numeric arrays with ``allow_pickle=False`` and object arrays with a restricted
unpickler that resolves only the few numpy constructors an object array of numbers, lists and numeric arrays
needs (``ndarray`` / ``dtype`` / ``_reconstruct`` / ``scalar``); any other global (``os.system``, ``eval``,
``subprocess.Popen``, ...) is refused in one line before anything is called.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

#: (module, name) pairs an object array's pickle may name: numpy's own array and scalar constructors only.
_ALLOWED = {
    (mod, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class UnsafeFileError(ValueError):
    """A data file asked for something a data file has no business doing (e.g. to call a function)."""


class _Restricted(pickle.Unpickler):
    def __init__(self, f, where: str) -> None:
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise UnsafeFileError(f"{self.where}: refused: the file's pickle names {module}.{name}, which is not "
                                  "part of a numeric object array (edgevpr never runs code from data files)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafeFileError(f"{self.where}: refused: the file's pickle uses persistent ids")


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """An array from a ``.npy`` file; object arrays are read by the restricted unpickler (never code)."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in reader:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = reader[version](f)
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            payload = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None
    except UnsafeFileError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{where}: not a readable .npy file ({str(e).splitlines()[0]})") from None
    try:
        arr = _Restricted(io.BytesIO(payload), where).load()
    except UnsafeFileError:
        raise
    except Exception as e:  # a damaged pickle raises many kinds of errors; all mean the same to the user
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{where}: damaged object array ({type(e).__name__}: {detail})") from None
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
        raise ValueError(f"{where}: header says an array of shape {tuple(shape)}, the payload is not one")
    return arr
