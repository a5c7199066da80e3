"""ONNX export of a VPRModel and an onnxruntime inference path that stands in for it.

An exported model is one self-describing ``.onnx`` file: the graph (input ``images`` [B, 3, H, W] normalised,
output ``descriptors`` [B, D] L2-normalised; dynamic batch, fixed H x W; a CNN's also ``local_features``
[B, H'*W', C], its stride-16 map from the same pass, for geometric verification) plus, in the model's metadata under
the key ``edgevpr``, a JSON record of the source model (config, fingerprint), the runtime knobs baked into the
graph (keep ratio, sparsity: they select tokens and channels, so they are fixed at export time, as the input
size is), the input size and preprocessing, and whether the weights were quantised to int8.

Design choices:
* TorchScript-based exporter (``dynamo=False``): it needs no extra package and traces every head here.
* A ViT's position embeddings are resampled (bicubic, antialiased) to the export grid *before* tracing and
  enter the graph as a constant: ONNX has no antialiased bicubic resize, and the grid is fixed anyway.
* Integrity: the metadata records ``graph_sha256``, the sha256 of the graph (every node and every weight), and
  ``meta_sha256``, the sha256 of every other metadata entry (mean/std, input size, knobs, config), which
  ``OnnxModel`` recomputes at load: a file whose weight bytes or preprocessing were damaged is refused in one line
  instead of giving NaN or wrong descriptors. int8 fingerprints include the graph's.
* fp32 exports keep the source model's fingerprint (descriptors match PyTorch to cosine >= 0.9999, tested), so
  an index built with PyTorch can be queried on a device through onnxruntime. int8 exports (transformers:
  onnxruntime dynamic quantisation, int8 weights and per-batch int8 activations; CNNs: static QDQ calibrated on
  database images) compute different descriptors and get a fingerprint of their own.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..models.backbones import CNNBackbone, ViTBackbone
from ..models.model import VPRModel
from ..utils import atomic_write
from .onnx_model import (  # noqa: F401  (OnnxModel, is_onnx: re-exported)
    META_KEY,
    OnnxModel,
    file_graph_digest,
    graph_digest,
    is_onnx,
    meta_digest,
)

OPSET = 17
#: Dynamic quantisation (transformers) quantises these ops: the linears of the blocks and heads. Conv is left in
#: fp32 there (onnxruntime's dynamic ConvInteger is slower than its fp32 convolution on CPU); CNNs are quantised
#: statically instead (QDQ Conv with calibrated activation ranges).
INT8_OPS = ("MatMul", "Gemm")


@contextlib.contextmanager
def _fixed_position_embeddings(model: VPRModel, image_size: tuple[int, int]):
    """Within the block, every ViT in ``model`` adds position embeddings precomputed for ``image_size``."""
    import timm.models.vision_transformer as tvit

    vits = [m for m in model.modules() if isinstance(m, ViTBackbone)]
    if not vits:
        yield
        return
    original = tvit.resample_abs_pos_embed
    fixed = {}
    for b in vits:
        v = b.vit
        grid = (image_size[0] // b.stride, image_size[1] // b.stride)
        with torch.no_grad():
            fixed[id(v.pos_embed)] = (grid, original(v.pos_embed, new_size=grid, old_size=v.patch_embed.grid_size,
                                                     num_prefix_tokens=0 if v.no_embed_class else v.num_prefix_tokens))

    def resample(posemb, new_size, *args, **kwargs):
        hit = fixed.get(id(posemb))
        if hit is not None and tuple(new_size) == hit[0]:
            return hit[1]
        return original(posemb, new_size, *args, **kwargs)

    tvit.resample_abs_pos_embed = resample
    try:
        yield
    finally:
        tvit.resample_abs_pos_embed = original


class _WithLocal(torch.nn.Module):
    """A CNN model whose graph also outputs its own local features (``VPRModel.forward_with_local``): images
    [B, 3, H, W] -> (descriptors [B, D], local features [B, H'*W', C]) in one pass."""

    def __init__(self, model: VPRModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, local = self.model.forward_with_local(x)
        return d, local.patches


def _frozen_copy(model: VPRModel) -> VPRModel:
    """A CPU copy in eval mode whose ternary layers compute with their quantised weights as constants."""
    from ..models.ternary import Int8TernaryLinear, TernaryLinear

    if any(isinstance(m, Int8TernaryLinear) for m in model.modules()):
        raise ValueError(f"model {model.name}: export the ternary model, not its int8 PyTorch twin "
                         "(use --int8 on export for an int8 ONNX graph)")
    model = copy.deepcopy(model).cpu().eval()
    for m in model.modules():
        if isinstance(m, TernaryLinear) and m.fixed is None:
            m.set_fixed(*m.quantized())
    return model


def _quantized_ops(proto) -> dict[str, int]:
    """Ops that run in int8 in a quantised graph: QDQ-wrapped Conv/MatMul/Gemm (static) or the integer kernels
    of dynamic quantisation."""
    g = proto.graph
    dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    out: dict[str, int] = {}
    for n in g.node:
        if n.op_type in ("Conv", "MatMul", "Gemm") and any(i in dq for i in n.input):
            out[n.op_type] = out.get(n.op_type, 0) + 1
        elif n.op_type in ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"):
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed images: {"images": [b, 3, H, W]} batches."""

    def __init__(self, arrays: list[np.ndarray], batch: int = 8) -> None:
        self.batches = [np.stack(arrays[i:i + batch]) for i in range(0, len(arrays), batch)]

    def get_next(self) -> dict | None:
        return {"images": self.batches.pop(0)} if self.batches else None


def calibration_arrays(model: VPRModel, source: str | os.PathLike, count: int,
                       image_size: tuple[int, int]) -> list[np.ndarray]:
    """``count`` evenly spaced images of a folder or CSV manifest, preprocessed as the model's input."""
    from ..data.images import load_image
    from .index import read_rows

    rows = read_rows(source)
    pick = np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int)
    t = model.transform(image_size)
    return [t.array(load_image(Path(rows[i].path))) for i in sorted(set(pick.tolist()))]


def export_onnx(model: VPRModel, out: str | os.PathLike, knobs: dict | None = None,
                image_size: tuple[int, int] | None = None, int8: bool = False, opset: int = OPSET,
                calibration: str | os.PathLike | None = None, calibration_count: int = 64) -> Path:
    """Write ``model`` (with ``knobs`` baked in) as one ONNX file at ``out`` (atomically) and return its path.

    int8: CNN backbones are quantised statically (QDQ: int8 weights per channel and int8 activations whose ranges are
    calibrated on ``calibration_count`` images of ``calibration``, a folder or CSV of database images); other
    models dynamically (int8 MatMul/Gemm weights, activations quantised per batch). Refuses when nothing in the
    graph is quantisable. The metadata records what was quantised (``quantized``).
    """
    import onnx

    model = _frozen_copy(model)
    knobs = {k: float(v) for k, v in (knobs or {}).items()}
    size = tuple(int(s) for s in (image_size or model.image_size))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    cnn = isinstance(model.backbone, CNNBackbone)  # its local features go along (``_WithLocal``)
    outputs = ["descriptors", "local_features"] if cnn else ["descriptors"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "fp32.onnx"
        # autograd stays on: under no_grad, nn.MultiheadAttention / TransformerEncoderLayer (SGFS, BoQ) take
        # fused fast paths that have no ONNX form.
        with model.using(**knobs), _fixed_position_embeddings(model, size), torch.enable_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed: constants are intended
            torch.onnx.export(_WithLocal(model).eval() if cnn else model, (x,), str(fp32), dynamo=False,
                              opset_version=opset, input_names=["images"], output_names=outputs,
                              dynamic_axes={n: {0: "batch"} for n in ["images", *outputs]})
        path = fp32
        quantized: dict = {}
        if int8:
            from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre, path = Path(d) / "pre.onnx", Path(d) / "int8.onnx"
            try:  # shape inference + graph optimisation, as onnxruntime advises before quantising
                quant_pre_process(str(fp32), str(pre))
            except Exception:  # its symbolic shape inference fails on some graphs (BoQ's reshapes): plain ONNX one
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            if isinstance(model.backbone, CNNBackbone):
                if calibration is None:
                    raise ValueError(f"model {model.name}: int8 for a CNN calibrates its activations on images: "
                                     "give --calibration DB_IMAGES (a folder or CSV of database images)")
                data = _Calibration(calibration_arrays(model, calibration, calibration_count, size))
                quantize_static(str(pre), str(path), data, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["Conv", *INT8_OPS])
                quantized["method"] = f"static QDQ, calibrated on {calibration_count} images of {calibration}"
            else:
                # reduce_range: 7-bit weights. u8 x s8 products are summed in pairs into int16 on x86 CPUs without
                # VNNI (AVX2 only), which saturates with 8-bit weights (TeTRA fixture cosine 0.816 on such a CPU,
                # >= 0.999 with VNNI); a file exported on one machine runs on any other, so it must hold on both
                quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8, reduce_range=True,
                                 op_types_to_quantize=list(INT8_OPS))
                quantized["method"] = "dynamic (int8 weights in 7-bit range, per-batch int8 activations)"
            quantized["ops"] = _quantized_ops(onnx.load(str(path)))
            if not quantized["ops"]:
                raise ValueError(f"model {model.name}: nothing in its graph is quantisable to int8 (no Conv, MatMul "
                                 "or Gemm was quantised); export it without --int8")
        proto = onnx.load(str(path))
        p = model.preprocess
        meta = {"name": model.name + ("-int8" if int8 else ""), "source_fingerprint": model.fingerprint(),
                "config": model.config, "knobs": knobs, "image_size": list(size), "out_dim": model.out_dim,
                "mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation, "int8": int8,
                "opset": opset, "quantized": quantized}
        if cnn:  # the grid the runtime reads ``local_features`` on
            with torch.inference_mode():
                local = model.backbone.local_map(x[:1])
            meta["local_features"] = {"grid": list(local.grid), "dim": int(local.patches.shape[-1])}
        meta["graph_sha256"] = graph_digest(proto)
        meta["meta_sha256"] = meta_digest(meta)
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)
        atomic_write(out, lambda tmp: _save_checked(onnx, proto, tmp, meta["graph_sha256"]))
    return out


def _save_checked(onnx, proto, path: str, digest: str) -> None:
    """Save ``proto`` and check that the runtime's byte-level checksum reads what was recorded."""
    onnx.save(proto, path)
    if file_graph_digest(path) != digest:
        raise RuntimeError(f"{path}: the saved graph's bytes do not match its checksum (protobuf serialised it "
                           "non-canonically); please report this")
