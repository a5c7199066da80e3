"""VPRModel = backbone + aggregator, described entirely by a JSON-able config.

A saved model is a folder with ``config.json`` and ``model.safetensors``; ``load_model`` rebuilds it
from those alone (no pickle). ``fingerprint`` identifies the architecture and the exact weights, so
descriptor caches and place indexes can refuse descriptors made by another model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import threads
from ..catalogue import head_untrained, preset_names, weights_status  # noqa: F401  (re-exported)
from ..catalogue import preset_config as _preset_config
from ..data.transforms import ToModelInput
from ..tokens import Tokens
from ..utils import atomic_write, write_json
from .aggregators import AGGREGATORS, HeadContext
from .backbones import BACKBONES, Backbone, Preprocess

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
#: Input sides outside this range are mistakes (2048 px is 4x the largest published VPR evaluation size).
MIN_SIDE, MAX_SIDE = 16, 2048


def check_image_size(size, where: str) -> tuple[int, int]:
    """[H, W] (or one int: square) of positive ints in [MIN_SIDE, MAX_SIDE] -> (H, W); one-line ValueError."""
    sides = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
    if not isinstance(sides, (list, tuple)) or len(sides) != 2 or \
            not all(isinstance(v, int) and not isinstance(v, bool) and MIN_SIDE <= v <= MAX_SIDE for v in sides):
        raise ValueError(f"{where} = {size!r}: must be [height, width] in pixels, each an integer in "
                         f"[{MIN_SIDE}, {MAX_SIDE}]")
    return int(sides[0]), int(sides[1])


class VPRModel(nn.Module):
    """images [B, 3, H, W] (normalised) -> L2-normalised descriptors [B, D].

    config keys: ``backbone`` {name, weights, ...}, ``aggregator`` {name, ...}, ``image_size`` [H, W],
    optional ``mean``/``std``/``interpolation`` overriding the backbone's preprocessing, ``name``, and
    ``ternary`` {patterns, full_precision_last_ffn, eps} (TAT-VPR ternary linears in the backbone).

    Runtime knobs (``forward(x, sparsity=0.4)``) are attributes of the modules that declare them in a
    ``knobs`` tuple; ``knob_names()`` lists what a model offers.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)
        for key in ("backbone", "aggregator"):
            if not isinstance(self.config.get(key), dict) or "name" not in self.config[key]:
                raise ValueError(f"model config: field '{key}' must be a mapping with a 'name'")
        check_image_size(self.config.get("image_size", [224, 224]), "model config: field 'image_size'")
        bcfg = dict(self.config["backbone"])
        self.backbone: Backbone = BACKBONES.get(bcfg.pop("name"))(**bcfg)
        if self.config.get("ternary") is not None:
            from .ternary import apply_ternary

            apply_ternary(self.backbone, **self.config["ternary"])
        acfg = dict(self.config["aggregator"])
        ctx = HeadContext(self.backbone.out_dim, self.backbone.has_cls, self.backbone.grid_for(self.image_size))
        self.aggregator = AGGREGATORS.get(acfg.pop("name"))(ctx, **acfg)

    @property
    def name(self) -> str:
        return self.config.get("name") or f"{self.config['backbone']['name']}-{self.config['aggregator']['name']}"

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.config.get("image_size", [224, 224])
        return (int(size[0]), int(size[1]))

    @property
    def out_dim(self) -> int:
        return self.aggregator.out_dim

    @property
    def preprocess(self) -> Preprocess:
        p = self.backbone.preprocess
        c = self.config
        return Preprocess(tuple(c.get("mean", p.mean)), tuple(c.get("std", p.std)),
                          c.get("interpolation", p.interpolation))

    def transform(self, image_size: tuple[int, int] | None = None) -> ToModelInput:
        p = self.preprocess
        return ToModelInput(image_size or self.image_size, p.mean, p.std, p.interpolation)

    def forward_tokens(self, x: torch.Tensor) -> Tokens:
        return self.backbone(x)

    def forward(self, x: torch.Tensor, **knobs) -> torch.Tensor:
        """images [B, 3, H, W] -> descriptors [B, D]; ``knobs`` (e.g. sparsity=0.4) apply to this call only."""
        if not knobs:
            return self.aggregator(self.forward_tokens(x))
        with self.using(**knobs):
            return self.aggregator(self.forward_tokens(x))

    def forward_with_local(self, x: torch.Tensor, **knobs) -> tuple[torch.Tensor, Tokens | None]:
        """images [B, 3, H, W] -> (descriptors [B, D], as ``forward``; the model's own local features from the
        same pass, or None when this pass has none): a CNN's stride-16 map (``CNNBackbone.forward_with_local``), a
        ViT's patch tokens when ``knobs`` keep every patch (a pruned pass has no full grid; verification then needs
        a pass of its own, ``deploy.embed.patch_tokens``). One forward for a verified query's descriptor and
        features, and the two outputs of a CNN's ONNX export."""
        with self.using(**knobs):
            with_local = getattr(self.backbone, "forward_with_local", None)
            if with_local is not None:
                final, local = with_local(x)
                return self.aggregator(final), local
            t = self.forward_tokens(x)
            return self.aggregator(t), (t if t.cls is not None and t.is_full_grid else None)

    def knob_names(self) -> list[str]:
        return sorted({k for m in self.modules() for k in getattr(m, "knobs", ())})

    @contextlib.contextmanager
    def using(self, **knobs):
        """Set runtime knobs on every module that has them for the duration of a ``with`` block (None: leave)."""
        saved = []
        try:
            for name, value in knobs.items():
                if value is None:
                    continue
                mods = [m for m in self.modules() if name in getattr(m, "knobs", ())]
                if not mods:
                    raise ValueError(f"model {self.name} has no runtime knob '{name}' "
                                     f"(it has: {', '.join(self.knob_names()) or 'none'})")
                for m in mods:
                    saved.append((m, name, getattr(m, name)))
                    setattr(m, name, value)
            yield self
        finally:
            for m, name, old in reversed(saved):
                setattr(m, name, old)

    def train(self, mode: bool = True) -> VPRModel:
        """Like nn.Module.train, but normalisation layers whose parameters are all frozen stay in eval
        mode, so their running statistics never drift while the rest trains."""
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    params = list(m.parameters(recurse=False))
                    if params and not any(p.requires_grad for p in params):
                        m.eval()
        return self

    def state_for_identity(self) -> dict[str, torch.Tensor]:
        """The state dict with every ternary layer's weights given as the weight it computes with (delta * q),
        so a packed model, its fp-latent original and its int8 twin identify as the same weights."""
        sd = dict(self.state_dict())
        for name, m in self.named_modules():
            if hasattr(m, "effective_weight"):
                for key in ("q", "delta"):
                    sd.pop(f"{name}.{key}", None)
                sd[f"{name}.weight"] = m.effective_weight().detach()
        return sd

    def fingerprint(self, runtime: bool = True) -> str:
        """sha256 (16 hex) of the architecture config (weights source excluded) and every tensor's bytes.

        runtime: also mark an int8 inference path (its descriptors differ slightly from the reference's, so
        descriptor caches and indexes must tell them apart); False gives the weights' identity alone.
        """
        arch = copy.deepcopy(self.config)
        arch.pop("name", None)
        arch.pop("packed", None)
        for part in (arch.get("backbone", {}), arch.get("backbone", {}).get("stem") or {}):
            part.pop("weights", None)
        arch.pop("provenance", None)
        h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
        for k, v in sorted(self.state_for_identity().items()):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        for tag in sorted({t for m in self.modules() if (t := getattr(m, "fingerprint_tag", None))}):
            h.update(f"|{tag}".encode())  # a module whose output layout changed since older releases
        if runtime and any(type(m).__name__ == "Int8TernaryLinear" for m in self.modules()):
            h.update(b"runtime=int8")
        return h.hexdigest()[:16]


def build_model(config: dict[str, Any]) -> VPRModel:
    return VPRModel(config)


def save_model(model: VPRModel, path: str | os.PathLike, packed: bool = False) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` atomically (weights first).

    packed: store every ternary layer's weight as 2-bit codes (``<layer>.weight_q2``, uint8) and its scale
    (``<layer>.weight_delta``) instead of the fp32 latent weight: an inference file that reloads to exactly
    the same computed weights (the latent weights needed to train further are not kept).
    """
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cfg = copy.deepcopy(model.config)
    from .ternary import Int8TernaryLinear, TernaryLinear, pack

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (TernaryLinear, Int8TernaryLinear))}
    if not packed and any(isinstance(m, Int8TernaryLinear) for m in layers.values()):
        raise ValueError(f"model {model.name} runs int8 ternary layers (no fp32 latent weights): save it packed")
    if packed:
        if not layers:
            raise ValueError(f"model {model.name} has no ternary layers to pack")
        for n, m in layers.items():
            q, delta = m.quantized()
            for key in ("weight", "q", "delta"):
                sd.pop(f"{n}.{key}", None)
            sd[f"{n}.weight_q2"] = pack(q.cpu())
            sd[f"{n}.weight_delta"] = delta.detach().cpu().reshape(1)
        cfg["packed"] = True
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(sd, tmp, metadata={"format": "edgevpr"}))
    cfg["format_version"] = FORMAT_VERSION
    cfg["fingerprint"] = model.fingerprint(runtime=False)  # what load_model rebuilds
    write_json(path / CONFIG_FILE, cfg)
    return path


def _load_packed(model: VPRModel, sd: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Set the ternary layers of ``model`` from 2-bit codes in ``sd``; returns the remaining tensors."""
    from .ternary import TernaryLinear, unpack

    sd = dict(sd)
    for n, m in model.named_modules():
        if isinstance(m, TernaryLinear):
            if f"{n}.weight_q2" not in sd:
                raise ValueError(f"{source}: packed model lacks {n}.weight_q2")
            q = unpack(sd.pop(f"{n}.weight_q2"), tuple(m.weight.shape))
            m.set_fixed(q, sd.pop(f"{n}.weight_delta"))
            sd[f"{n}.weight"] = m.weight.detach().clone()
    return sd


def preset_config(name: str) -> dict[str, Any]:
    return _preset_config(name, CONFIG_FILE)


def load_model(spec: str | os.PathLike | dict, device: str | torch.device = "cpu") -> VPRModel:
    """A model from a named preset, a config file (.yaml/.json), a saved folder, or a config dict."""
    threads.apply_torch()  # the process's thread policy, when one was configured (``edgevpr.threads``)
    from safetensors.torch import load_file

    if isinstance(spec, dict):
        return build_model(spec).to(device).eval()
    p = Path(spec)
    if p.is_dir():
        cfg_file, weights = p / CONFIG_FILE, p / WEIGHTS_FILE
        if not cfg_file.exists() or not weights.exists():
            raise FileNotFoundError(f"{p}: a saved model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_file}: a model config must be a JSON object")
        expected = cfg.pop("fingerprint", None)
        cfg.pop("format_version", None)
        packed = cfg.pop("packed", False)
        cfg["backbone"] = {**cfg["backbone"], "weights": None}
        if cfg["backbone"].get("stem"):  # a hybrid ViT's CNN stem: its weights are in the file too
            cfg["backbone"]["stem"] = {**cfg["backbone"]["stem"], "weights": None}
        model = build_model(cfg)
        try:
            sd = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for a damaged header or truncated data
            raise ValueError(f"{weights}: damaged safetensors file ({str(e).splitlines()[0]})") from None
        if packed:
            sd = _load_packed(model, sd, weights)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: does not match {cfg_file} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if expected and model.fingerprint() != expected:
            raise ValueError(f"{p}: weights fingerprint {model.fingerprint()} differs from the recorded {expected}")
        model.source = str(p)
        return model.to(device).eval()
    if p.suffix in (".yaml", ".yml", ".json") and p.is_file():
        from ..utils import read_yaml

        cfg = read_yaml(p)
        if not isinstance(cfg, dict):
            raise ValueError(f"{p}: a model config must be a YAML mapping")
        cfg.setdefault("name", p.stem)
        return build_model(cfg).to(device).eval()
    from ..published.releases import RELEASES, load_release

    if str(spec) in RELEASES:  # a published model: fetched and imported on first use, then reused
        return load_model(load_release(str(spec)), device)
    return build_model(preset_config(str(spec))).to(device).eval()


#: Heads whose only parameters need no training (GeM's p starts at 3, CLS has none).
def untrained_head(model) -> bool:
    """True for a model built from a config (not a saved folder) whose head has parameters to train."""
    return head_untrained(model.config, saved=getattr(model, "source", None) is not None)
