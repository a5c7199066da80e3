"""Peak memory of inference, measured in a fresh process so nothing else is counted.

``python -m edgevpr.eval.memprobe MODEL_DIR H W BATCH [THREADS] [int8]`` prints JSON with the process RSS after imports,
after loading the model, and the high-water mark during one forward of a [BATCH, 3, H, W] batch (the
kernel's VmHWM, reset after loading through /proc/self/clear_refs so loading transients are not counted).
"""

from __future__ import annotations

import json
import sys


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str]) -> None:
    import torch

    from edgevpr.models.model import load_model

    model_dir, h, w, b = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    torch.set_num_threads(int(argv[4]) if len(argv) > 4 else torch.get_num_threads())
    base = _rss_mb()
    model = load_model(model_dir)
    if "int8" in argv[5:]:
        from edgevpr.models.ternary import to_int8

        to_int8(model)
    loaded = _rss_mb()
    x = torch.randn(b, 3, h, w)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (Linux >= 4.0)
    except OSError:
        pass
    with torch.inference_mode():
        model(x)
    peak = _vm_hwm_mb()
    print(json.dumps({"rss_after_imports_mb": base, "rss_after_load_mb": loaded, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main(sys.argv[1:])
