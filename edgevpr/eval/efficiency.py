"""Efficiency measured on this machine: parameters, GFLOPs, latency, peak memory, bytes."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..utils import module_device


def count_params(model: nn.Module) -> dict[str, int]:
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (= the safetensors payload)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def gflops(model: nn.Module, image_size: tuple[int, int], **knobs) -> float:
    """GFLOPs of one image's forward pass (torch.utils.flop_counter; a multiply-add counts 2).

    Runs with autograd enabled: under no_grad/inference_mode, nn.TransformerEncoderLayer (BoQ) takes its
    fused fast path, which FlopCounterMode's module tracker cannot follow (same FLOPs either way).
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, *image_size, device=module_device(model))
    with torch.inference_mode(False), torch.enable_grad(), FlopCounterMode(display=False) as fc:
        model(x, **knobs)
    return fc.get_total_flops() / 1e9


def peak_memory(model: nn.Module, image_size: tuple[int, int], batch_size: int = 1) -> dict[str, float]:
    """Peak resident memory (MB) of a fresh process that loads ``model`` and embeds one batch.

    ``peak_rss_mb`` is the whole process (Python + torch + weights + activations);
    ``inference_mb`` is the part added by the forward pass over the loaded model.
    """
    import json
    import subprocess
    import sys
    import tempfile

    from ..models.model import save_model

    int8 = any(type(m).__name__ == "Int8TernaryLinear" for m in model.modules())
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d, packed=int8)
        cmd = [sys.executable, "-m", "edgevpr.eval.memprobe", d, *map(str, image_size), str(batch_size),
               str(torch.get_num_threads()), *(["int8"] if int8 else [])]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit code {res.returncode}"
        raise RuntimeError(f"memory probe failed: {why}")
    m = json.loads(res.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": m["peak_rss_mb"], "inference_mb": m["peak_rss_mb"] - m["rss_after_load_mb"]}


@torch.inference_mode()
def latency(model, image_size: tuple[int, int], batch_size: int = 1, warmup: int = 2,
            repeats: int = 5, **knobs) -> dict[str, float]:
    """Median ms per image over ``repeats`` timed forwards of a [batch_size, 3, H, W] batch (after warm-up)."""
    device = torch.device(module_device(model)) if isinstance(model, nn.Module) else torch.device("cpu")
    x = torch.randn(batch_size, 3, *image_size, device=device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        model(x, **knobs)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x, **knobs)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000 / batch_size)
    return {"ms_per_img": statistics.median(times), "batch_size": batch_size, "repeats": repeats}


def profile(model: nn.Module, image_size: tuple[int, int], out_dim: int, batch_size: int = 16,
            repeats: int = 5, **knobs) -> dict:
    """Everything efficiency-related for one model at one input size, as a flat dict."""
    model.eval()
    b1 = latency(model, image_size, 1, repeats=repeats, **knobs)
    bn = latency(model, image_size, batch_size, warmup=1, repeats=max(2, repeats // 2), **knobs)
    device = torch.device(module_device(model))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        latency(model, image_size, 1, warmup=0, repeats=1, **knobs)
        mem = {"peak_mem_mb_b1": torch.cuda.max_memory_allocated() / 2**20}
    else:
        m1, mn = peak_memory(model, image_size, 1), peak_memory(model, image_size, batch_size)
        mem = {"peak_rss_mb_b1": m1["peak_rss_mb"], "inference_mem_mb_b1": m1["inference_mb"],
               f"peak_rss_mb_b{batch_size}": mn["peak_rss_mb"], f"inference_mem_mb_b{batch_size}": mn["inference_mb"]}
    return {
        **count_params(model),
        "gflops": gflops(model, image_size, **knobs),
        "ms_per_img_b1": b1["ms_per_img"],
        f"ms_per_img_b{batch_size}": bn["ms_per_img"],
        **mem,
        "model_bytes": model_bytes(model),
        "descriptor_dim": out_dim,
        "descriptor_bytes_fp32": out_dim * 4,
        "descriptor_bytes_fp16": out_dim * 2,
        "image_size": list(image_size),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def onnx_profile(model, image_size: tuple[int, int], out_dim: int, batch_size: int = 16, repeats: int = 5) -> dict:
    """Latency, file bytes and descriptor size of an exported model run by onnxruntime (``OnnxModel``)."""
    b1 = latency(model, image_size, 1, repeats=repeats, **model.baked_knobs)
    bn = latency(model, image_size, batch_size, warmup=1, repeats=max(2, repeats // 2), **model.baked_knobs)
    return {"runtime": "onnxruntime", "int8": model.int8, "ms_per_img_b1": b1["ms_per_img"],
            f"ms_per_img_b{batch_size}": bn["ms_per_img"], "model_bytes": model.file_bytes(),
            "descriptor_dim": out_dim, "descriptor_bytes_fp32": out_dim * 4, "image_size": list(image_size),
            "threads": model.session.get_session_options().intra_op_num_threads, "device": "cpu"}
