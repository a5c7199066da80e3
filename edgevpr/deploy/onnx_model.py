"""An exported model run by onnxruntime (torch-free: the deployment side).

The file's metadata (key ``edgevpr``) records the source model, the runtime knobs baked into the graph, the input
size and preprocessing, ``graph_sha256``, the sha256 of the graph (every node and weight), and ``meta_sha256``, the
sha256 of every other metadata entry (preprocessing, input size, knobs, config: all the runtime reads), both
recomputed at load so that a damaged file is refused in one line. The graph's checksum is recomputed from the
file's bytes (``file_graph_digest``: the graph field of the ModelProto, found by reading the protobuf wire format),
so loading needs neither the ``onnx`` package (1.1 s of import, most of a cold start) nor a parse of the model.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np

from .. import threads as threads_policy
from ..data.transforms import ToModelInput

META_KEY = "edgevpr"


def graph_digest(proto) -> str:
    """sha256 of an ONNX model's graph: its nodes, initializers (the weights) and inputs/outputs."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


#: ModelProto's field number of its graph (onnx.proto: ``GraphProto graph = 7``)
GRAPH_FIELD = 7


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or malformed varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


#: ModelProto's field number of its metadata entries (``repeated StringStringEntryProto metadata_props = 14``)
METADATA_FIELD = 14


def _fields(buf, start: int = 0, end: int | None = None):
    """The top-level protobuf fields of ``buf[start:end]``: (field number, wire type, value or (offset, length))."""
    i, end = start, len(buf) if end is None else end
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
            yield field, wire, v
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            yield field, wire, (i, n)
            i += n
        else:
            raise ValueError(f"wire type {wire} at byte {i}")
        if i > end:
            raise ValueError("a field runs past the end of the file")


def scan_onnx(path: str | os.PathLike) -> tuple[str, list[str]]:
    """(sha256 of the graph field's bytes as they lie in the file, the keys of its metadata entries, duplicates
    included), reading the top-level ModelProto as protobuf wire format without ``onnx`` (the runtime's hot path).
    For a file written by protobuf's serializer the digest equals ``graph_digest`` of the loaded model (a GraphProto
    has no map fields, so its serialisation is canonical); ValueError when the bytes are not a ModelProto with one
    graph."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        found, keys = None, []
        for field, wire, v in _fields(buf):
            if wire != 2:
                continue
            off, n = v
            if field == GRAPH_FIELD:
                if found is not None:
                    raise ValueError("two graph fields")
                found = hashlib.sha256(buf[off:off + n]).hexdigest()
            elif field == METADATA_FIELD:
                for f2, w2, x in _fields(buf, off, off + n):  # StringStringEntryProto: key = 1, value = 2
                    if f2 == 1 and w2 == 2:
                        keys.append(bytes(buf[x[0]:x[0] + x[1]]).decode("utf-8", "replace"))
        if found is None:
            raise ValueError("no graph")
        return found, keys


def file_graph_digest(path: str | os.PathLike) -> str:
    """sha256 of the graph field's bytes as they lie in an ONNX file (``scan_onnx``)."""
    return scan_onnx(path)[0]


#: metadata entries that are checksums, not covered by ``meta_digest``
DIGEST_KEYS = ("graph_sha256", "meta_sha256")


def meta_digest(meta: dict) -> str:
    """sha256 of the canonical JSON of every metadata entry but the checksums themselves."""
    body = {k: v for k, v in meta.items() if k not in DIGEST_KEYS}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def is_onnx(spec: str | os.PathLike) -> bool:
    return str(spec).lower().endswith(".onnx")


def _loaded_graph_digest(path: Path) -> str | None:
    """``graph_digest`` of the parsed file: the slow path, for a file whose graph bytes another writer serialised
    differently (never for edgevpr's own exports); None when ``onnx`` is not installed or cannot parse it."""
    try:
        import onnx

        return graph_digest(onnx.load(str(path), load_external_data=False))
    except Exception:  # ImportError, protobuf decode errors
        return None


class OnnxModel:
    """An exported model run by onnxruntime; quacks like a VPRModel where extraction and search need it.

    ``model(x)``: images [B, 3, H, W] -> descriptors [B, D] (torch tensors, CPU). Knobs are baked in: asking
    for other values is an error, asking for the baked ones is allowed. ``local_features(x)``: a CNN export's own
    local features, for geometric verification.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        threads_policy.onnx_session_options(opts)  # the process's thread policy (``edgevpr.threads``)
        if threads:
            opts.intra_op_num_threads = threads
        if (threads or threads_policy.current() or 0) > 1:  # a shared CPU: idle pool threads sleep, not spin
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        try:
            entries = scan_onnx(self.path)[1].count(META_KEY)
        except (ValueError, OSError) as e:
            raise ValueError(f"{self.path}: damaged ONNX file ({e})") from None
        if entries > 1:  # onnxruntime would keep one of them silently
            raise ValueError(f"{self.path}: {entries} '{META_KEY}' metadata entries (an export has one): damaged or "
                             "modified file, export it again")
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
        """Refuse a file whose graph (weights included) or metadata (preprocessing, size, knobs) is not the one
        exported."""
        if not isinstance(self.meta, dict):
            raise ValueError(f"{self.path}: damaged '{META_KEY}' metadata (not a JSON object)")
        if "meta_sha256" in self.meta and meta_digest(self.meta) != self.meta["meta_sha256"]:
            raise ValueError(f"{self.path}: its '{META_KEY}' metadata (preprocessing, input size or knobs) differs "
                             "from the export's checksum (damaged or modified file): export it again")
        recorded = self.meta.get("graph_sha256")
        if recorded is None or "meta_sha256" not in self.meta:
            # a file without both checksums cannot be checked: an export older than them, or one whose checksum was
            # deleted (which would otherwise turn a refusal into a warning); refused unless the user says it is old
            what = "the weights" if recorded is None else "its metadata (preprocessing, input size, knobs)"
            if not os.environ.get("EDGEVPR_ALLOW_UNCHECKED_ONNX"):
                raise ValueError(f"{self.path}: records no checksum of {what}, so its integrity cannot be checked: "
                                 "export it again (or set EDGEVPR_ALLOW_UNCHECKED_ONNX=1 for an export made before "
                                 "edgevpr recorded it)")
            from ..integrity import warn

            warn(f"{self.path}: no checksum of {what}; used unchecked (EDGEVPR_ALLOW_UNCHECKED_ONNX)")
            if recorded is None:
                return
        try:
            digest = file_graph_digest(self.path)
        except (ValueError, OSError) as e:
            raise ValueError(f"{self.path}: damaged ONNX file ({e})") from None
        if digest != recorded and _loaded_graph_digest(self.path) != recorded:
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

    def run(self, x: np.ndarray) -> np.ndarray:
        """images [B, 3, H, W] float32 (numpy) -> descriptors [B, D] float32 (numpy)."""
        return self.session.run(["descriptors"], {"images": np.ascontiguousarray(x, np.float32)})[0]

    def local_features(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
        """images [B, 3, H, W] float32 -> (the model's own local features [B, H'*W', C] float32, grid (H', W')):
        a CNN export's stride-16 map (output ``local_features``); None for an export without it (a ViT's, or one
        made before edgevpr exported it)."""
        if self.meta.get("local_features") is None:
            return None
        return self._local(self.session.run(["local_features"], {"images": np.ascontiguousarray(x, np.float32)})[0])

    def run_with_local(self, x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, tuple[int, int]] | None]:
        """images [B, 3, H, W] float32 -> (descriptors [B, D], ``local_features`` or None) from one run of the
        graph."""
        if self.meta.get("local_features") is None:
            return self.run(x), None
        d, out = self.session.run(["descriptors", "local_features"], {"images": np.ascontiguousarray(x, np.float32)})
        return d, self._local(out)

    def _local(self, out: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """The ``local_features`` output [B, H'*W', C], checked against the grid the metadata records."""
        grid = tuple(int(g) for g in self.meta["local_features"]["grid"])
        if out.ndim != 3 or out.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{self.path}: its local_features output {list(out.shape)} does not fit the grid "
                             f"{list(grid)} its metadata records (modified file): export it again")
        return out, grid

    def __call__(self, x, **knobs):
        """A torch tensor in, a torch tensor out (the research side); a numpy array in, a numpy array out."""
        self.check_knobs(knobs)
        if isinstance(x, np.ndarray):
            return self.run(x)
        import torch

        return torch.from_numpy(self.run(x.detach().cpu().numpy()))

    def eval(self) -> OnnxModel:
        return self

    def to(self, device) -> OnnxModel:
        if str(device).split(":")[0] not in ("cpu", "auto"):
            raise ValueError(f"{self.path}: the onnxruntime path runs on the CPU only (asked for {device})")
        return self

    def file_bytes(self) -> int:
        return self.path.stat().st_size

