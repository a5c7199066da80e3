"""One thread policy for every library that computes (torch-free: the deployment side uses it too).

A robot's CPU is shared: torch, onnxruntime, FAISS (OpenMP) and OpenCV each start a pool as wide as the machine by
default, and together they oversubscribe it (measured on a busy 2-core machine: 866 ms per photo at p50 with the
defaults, 72 ms with one OpenMP thread). ``configure(n)`` sets one width for all of them:

* before the libraries load: ``OMP_NUM_THREADS`` (FAISS, torch's OpenMP), ``MKL_NUM_THREADS``,
  ``OPENBLAS_NUM_THREADS`` (numpy's BLAS) and ``OPENCV_FOR_THREADS_NUM``, so the CLI calls it first;
* once loaded: ``torch.set_num_threads(n)`` and one inter-op thread, ``faiss.omp_set_num_threads(n)``,
  ``cv2.setNumThreads(n)``; onnxruntime sessions read ``current()`` when created (``intra_op_num_threads`` = n,
  ``inter_op_num_threads`` = 1, sequential execution).

The default (``--threads`` not given, ``EDGEVPR_THREADS`` unset) is the number of *physical* cores the process may
run on (its CPU affinity, SMT siblings counted once): a second hyperthread of a busy core adds little to these
kernels and a pool wider than the allowed CPUs only adds contention.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "EDGEVPR_THREADS"
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENCV_FOR_THREADS_NUM")
_current: int | None = None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once; >= 1)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:  # no sysfs (macOS, containers without it): every allowed CPU counts
            cores.add(str(c))
    return max(1, len(cores))


def resolve(n: int | None = None) -> int:
    """The width to use: ``n``, else ``EDGEVPR_THREADS``, else ``physical_cores()``; ValueError on a bad value."""
    if n is None:
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return physical_cores()
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{ENV}={raw!r}: expected a whole number of threads >= 1") from None
    if n < 1:
        raise ValueError(f"threads {n}: must be >= 1")
    return n


def configure(n: int | None = None) -> int:
    """Apply the policy (see the module notes) to every library, loaded or not -> the width applied."""
    global _current
    n = resolve(n)
    _current = n
    for var in _ENV_VARS:
        os.environ[var] = str(n)
    if sys.modules.get("torch") is not None:
        apply_torch()
    if sys.modules.get("faiss") is not None:
        sys.modules["faiss"].omp_set_num_threads(n)
    if sys.modules.get("cv2") is not None:
        sys.modules["cv2"].setNumThreads(n)
    return n


def current() -> int | None:
    """The width ``configure`` applied, or None when it has not run (libraries keep their own defaults)."""
    return _current


def apply_torch() -> None:
    """torch's intra-op width (and one inter-op thread, which torch accepts only before its first parallel work)."""
    if _current is None:
        return
    import torch

    torch.set_num_threads(_current)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # inter-op work already ran: its pool is fixed now
        pass


def onnx_session_options(opts) -> None:
    """Set an onnxruntime ``SessionOptions`` to the policy (no-op when ``configure`` has not run)."""
    if _current is None:
        return
    import onnxruntime as ort

    opts.intra_op_num_threads = _current
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
