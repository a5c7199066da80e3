"""ONNX export of a VPRModel and an onnxruntime inference path that stands in for it.

An exported model is one self-describing ``.onnx`` file: the graph (input ``images`` [B, 3, H, W] normalised,
output ``descriptors`` [B, D] L2-normalised; dynamic batch, fixed H x W) plus, in the model's metadata under
the key ``edgevpr``, a JSON record of the source model (config, fingerprint), the runtime knobs baked into the
graph (keep ratio, sparsity: they select tokens and channels, so they are fixed at export time, as the input
size is), the input size and preprocessing, and whether the weights were quantised to int8.

Design choices:
* TorchScript-based exporter (``dynamo=False``): it needs no extra package and traces every head here.
* A ViT's position embeddings are resampled (bicubic, antialiased) to the export grid *before* tracing and
  enter the graph as a constant: ONNX has no antialiased bicubic resize, and the grid is fixed anyway.
* Integrity: the metadata records ``graph_sha256``, the sha256 of the graph (every node and every weight),
  which ``OnnxModel`` recomputes at load: a file whose weight bytes were damaged is refused in one line instead
  of giving NaN or wrong descriptors. int8 fingerprints include it.
* fp32 exports keep the source model's fingerprint (descriptors match PyTorch to cosine >= 0.9999, tested), so
  an index built with PyTorch can be queried on a device through onnxruntime. int8 exports (onnxruntime
  dynamic quantisation: int8 weights, per-batch int8 activations) compute different descriptors and get a
  fingerprint of their own.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..data.transforms import ToModelInput
from ..models.backbones import ViTBackbone
from ..models.model import VPRModel
from ..utils import atomic_write

META_KEY = "edgevpr"
OPSET = 17
#: onnxruntime dynamic quantisation quantises these ops by default: the linears of transformers and heads.
#: Conv is left in fp32: onnxruntime's ConvInteger is slower than its fp32 convolution on CPU.
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


def _frozen_copy(model: VPRModel) -> VPRModel:
    """A CPU copy in eval mode whose ternary layers compute with their quantised weights as constants."""
    from ..compress.ternary import Int8TernaryLinear, TernaryLinear

    if any(isinstance(m, Int8TernaryLinear) for m in model.modules()):
        raise ValueError(f"model {model.name}: export the ternary model, not its int8 PyTorch twin "
                         "(use --int8 on export for an int8 ONNX graph)")
    model = copy.deepcopy(model).cpu().eval()
    for m in model.modules():
        if isinstance(m, TernaryLinear) and m.fixed is None:
            m.set_fixed(*m.quantized())
    return model


def export_onnx(model: VPRModel, out: str | os.PathLike, knobs: dict | None = None,
                image_size: tuple[int, int] | None = None, int8: bool = False, opset: int = OPSET) -> Path:
    """Write ``model`` (with ``knobs`` baked in) as one ONNX file at ``out`` (atomically) and return its path."""
    import onnx

    model = _frozen_copy(model)
    knobs = {k: float(v) for k, v in (knobs or {}).items()}
    size = tuple(int(s) for s in (image_size or model.image_size))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "fp32.onnx"
        # autograd stays on: under no_grad, nn.MultiheadAttention / TransformerEncoderLayer (SGFS, BoQ) take
        # fused fast paths that have no ONNX form.
        with model.using(**knobs), _fixed_position_embeddings(model, size), torch.enable_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed: constants are intended
            torch.onnx.export(model, (x,), str(fp32), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["descriptors"],
                              dynamic_axes={"images": {0: "batch"}, "descriptors": {0: "batch"}})
        path = fp32
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre, path = Path(d) / "pre.onnx", Path(d) / "int8.onnx"
            try:  # shape inference + graph optimisation, as onnxruntime advises before quantising
                quant_pre_process(str(fp32), str(pre))
            except Exception:  # its symbolic shape inference fails on some graphs (BoQ's reshapes): plain ONNX one
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OPS))
        proto = onnx.load(str(path))
        p = model.preprocess
        meta = {"name": model.name + ("-int8" if int8 else ""), "source_fingerprint": model.fingerprint(),
                "config": model.config, "knobs": knobs, "image_size": list(size), "out_dim": model.out_dim,
                "mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation, "int8": int8,
                "opset": opset}
        meta["graph_sha256"] = graph_digest(proto)
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)
        atomic_write(out, lambda tmp: onnx.save(proto, tmp))
    return out


def graph_digest(proto) -> str:
    """sha256 of an ONNX model's graph: its nodes, initializers (the weights) and inputs/outputs."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def is_onnx(spec: str | os.PathLike) -> bool:
    return str(spec).lower().endswith(".onnx")


class OnnxModel:
    """An exported model run by onnxruntime; quacks like a VPRModel where extraction and search need it.

    ``model(x)``: images [B, 3, H, W] -> descriptors [B, D] (torch tensors, CPU). Knobs are baked in: asking
    for other values is an error, asking for the baked ones is allowed.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise ValueError(f"{self.path}: not an edgevpr export (no '{META_KEY}' metadata); use `edgevpr export`")
        try:
            self.meta = json.loads(raw)
        except ValueError:
            raise ValueError(f"{self.path}: damaged '{META_KEY}' metadata (not JSON)") from None
        self._verify()
        self.config = self.meta["config"]
        self.baked_knobs: dict[str, float] = self.meta["knobs"]

    def _verify(self) -> None:
        """Refuse a file whose graph (weights included) is not the one exported."""
        import onnx

        recorded = self.meta.get("graph_sha256")
        if recorded is None:
            from ..integrity import warn

            warn(f"{self.path}: exported before edgevpr recorded a checksum of the weights; its integrity cannot be "
                 "checked (export it again)")
            return
        try:
            digest = graph_digest(onnx.load(str(self.path), load_external_data=False))
        except Exception as e:  # protobuf decode errors
            raise ValueError(f"{self.path}: damaged ONNX file ({str(e).splitlines()[0]})") from None
        if digest != recorded:
            raise ValueError(f"{self.path}: the weights or graph differ from the export's checksum (damaged or "
                             "modified file): export it again")

    name = property(lambda self: self.meta["name"])
    out_dim = property(lambda self: int(self.meta["out_dim"]))
    image_size = property(lambda self: tuple(self.meta["image_size"]))
    int8 = property(lambda self: bool(self.meta["int8"]))

    def fingerprint(self, runtime: bool = True) -> str:
        """The source model's fingerprint (fp32: same descriptors); int8 exports get one of their own."""
        fp = self.meta["source_fingerprint"]
        if self.int8 and runtime:
            fp = hashlib.sha256(f"{fp}|onnx-int8|{self.meta.get('graph_sha256', '')}".encode()).hexdigest()[:16]
        return fp

    def knob_names(self) -> list[str]:
        return sorted(self.baked_knobs)

    def transform(self, image_size: tuple[int, int] | None = None) -> ToModelInput:
        if image_size is not None and tuple(image_size) != self.image_size:
            raise ValueError(f"{self.path}: exported for {self.image_size[0]}x{self.image_size[1]} input; "
                             f"re-export for {image_size[0]}x{image_size[1]}")
        m = self.meta
        return ToModelInput(self.image_size, tuple(m["mean"]), tuple(m["std"]), m["interpolation"])

    def check_knobs(self, knobs: dict | None) -> None:
        for k, v in (knobs or {}).items():
            if v is not None and (k not in self.baked_knobs or abs(self.baked_knobs[k] - float(v)) > 1e-9):
                raise ValueError(f"{self.path}: knob {k}={v} differs from the value baked in at export "
                                 f"({self.baked_knobs.get(k, 'none')}); export again with --knob {k}={v}")

    def __call__(self, x: torch.Tensor, **knobs) -> torch.Tensor:
        self.check_knobs(knobs)
        out = self.session.run(None, {"images": np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})[0]
        return torch.from_numpy(out)

    def eval(self) -> OnnxModel:
        return self

    def to(self, device) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise ValueError(f"{self.path}: the onnxruntime path runs on the CPU only (asked for {device})")
        return self

    def file_bytes(self) -> int:
        return self.path.stat().st_size

