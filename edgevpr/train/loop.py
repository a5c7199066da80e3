"""The training loop: P x K place batches -> model -> Multi-Similarity + extra terms -> optimizer.

``train(conf, out_dir)`` runs a config (see ``DEFAULTS``); ``resume=True`` continues from the newest
checkpoint bit-exactly: batches are a function of (seed, step), and a checkpoint holds the weights,
the loss terms' weights, the optimizer and scheduler states and the RNG state. Checkpoints are folders
written file by file atomically, then published by atomically rewriting ``checkpoints/latest.json``.

The same function runs under ``torchrun`` (one process per rank): DistributedDataParallel with gloo on
CPU or nccl on GPU, each rank drawing its share of every step's places. Descriptors and labels are
gathered across ranks before the Multi-Similarity loss (differentiably), so the loss and the gradients
equal those of one process on the whole batch; rank 0 validates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..api import EvalConf, evaluate_dataset
from ..data.datasets import open_dataset
from ..integrity import sha256_file, unknown_field, warn
from ..models.model import VPRModel, check_image_size, load_model, save_model
from ..tokens import Tokens
from ..utils import atomic_write, module_device, pick_device, seed_everything, write_json
from .cache import FeatureCache
from .losses import MultiSimilarity, StepContext, TermContext, build_terms
from .places import SAMPLERS, PlaceBatches, PlaceSet, aligned_places, gsv_cities, manifest_places
from .places import steps_per_epoch as epoch_steps

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": "effnet-lite0-gem",
    "device": "auto",
    "precision": "fp32",
    "data": {"places": [], "places_per_batch": 16, "images_per_place": 2, "min_images": 2,
             "image_size": None, "augment": None, "workers": 0, "cache_frozen": True, "cache_host_gb": 8.0,
             "cache_disk_gb": 0.0, "sampler": "auto"},
    "trainable": {"mode": "tail", "stages": 2, "norm_stats": "train", "patterns": None},
    "teacher": None,
    "knobs": {},
    "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "lr_mult": {}},
    "schedule": {"name": "constant", "warmup_steps": 0},
    "loss": {"ms": {"weight": 1.0, "alpha": 1.0, "beta": 50.0, "base": 0.0, "epsilon": 0.1}, "terms": []},
    "steps": 100,
    "epochs": None,
    "checkpoint_every": 50,
    "keep_checkpoints": 2,
    "val": None,
}


CHECKSUMS = "checksums.json"
CHECKPOINT_FILES = ("model.safetensors", "config.json", "train_state.safetensors", "train_state.json")


#: The fields a training config may hold, at every nesting level: a dict names the known keys (each mapped to
#: the schema of its value), ``ANY`` leaves a value free (model configs, knob names, lr_mult groups, loss-term
#: options: each checked where it is used), and a one-item list is a list of that schema.
ANY = None
SCHEMA: dict = {
    **{k: ANY for k in DEFAULTS},
    "data": {**{k: ANY for k in DEFAULTS["data"]},
             "places": [{k: ANY for k in ("aligned", "start", "stop", "drop_dark", "gsv_cities", "cities", "manifest",
                                          "radius", "weight")}]},
    "trainable": {k: ANY for k in DEFAULTS["trainable"]},
    "teacher": {k: ANY for k in ("model", "image_size", "cache")},
    "optimizer": {k: ANY for k in ("name", "lr", "weight_decay", "lr_mult", "momentum")},
    "schedule": {k: ANY for k in ("name", "warmup_steps", "warmup", "unit", "gamma", "every", "milestones", "total",
                                  "end_factor")},
    "loss": {"ms": {k: ANY for k in DEFAULTS["loss"]["ms"]}, "terms": ANY},
    "val": {"sets": [{k: ANY for k in ("db", "queries", "aligned", "frames", "radius", "drop_dark")}],
            "every": ANY, "knobs": ANY},
}
#: Numeric fields with bounds: (path, low, high). Sizes beyond these are mistakes, not experiments.
BOUNDS = (("data.places_per_batch", 1, 65536), ("data.images_per_place", 1, 1024), ("data.min_images", 1, 1024),
          ("data.workers", 0, 256), ("steps", 1, 10**9), ("epochs", 1e-6, 10**6), ("checkpoint_every", 1, 10**9),
          ("keep_checkpoints", 1, 1000), ("optimizer.lr", 0, 10), ("data.cache_host_gb", 0, 4096),
          ("data.cache_disk_gb", 0, 10**6))

#: Fields with a fixed set of values, refused by name at parse time (a typo must not run something else).
ENUMS = (("precision", ("fp32", "bf16")), ("trainable.mode", ("all", "tail", "head", "match")),
         ("trainable.norm_stats", ("train", "frozen")), ("data.sampler", SAMPLERS),
         ("optimizer.name", ("adamw", "adam", "sgd")),
         ("schedule.name", ("constant", "cosine", "step", "multistep", "linear")))


def _field(conf: dict, path: str):
    node = conf
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_fields(node, schema, where: str, path: str = "") -> None:
    """Refuse a misspelt key at any nesting level (one line naming it and the closest known key)."""
    if schema is ANY or node is None:
        return
    if isinstance(schema, list):
        if not isinstance(node, list):
            raise ValueError(f"{where}: field '{path}' must be a list")
        for i, item in enumerate(node):
            check_fields(item, schema[0], where, f"{path}[{i}]")
        return
    if not isinstance(node, dict):
        raise ValueError(f"{where}: field '{path}' must be a mapping, got {type(node).__name__}")
    for key, value in node.items():
        if key not in schema:
            raise unknown_field(where, f"{path}.{key}" if path else str(key),
                                [f"{path}.{k}" if path else k for k in schema])
        check_fields(value, schema[key], where, f"{path}.{key}" if path else str(key))


def check_keys(conf: dict, where: str = "config") -> None:
    """Known fields at every level (``SCHEMA``) and numeric fields within ``BOUNDS``; one-line errors."""
    check_fields(conf, SCHEMA, where)
    for path, low, high in BOUNDS:
        node = _field(conf, path)
        if node is None:
            continue
        if isinstance(node, bool) or not isinstance(node, (int, float)) or not low <= node <= high:
            raise ValueError(f"{where}: field '{path}' = {node!r} must be a number in [{low}, {high}]")
    for path, values in ENUMS:
        node = _field(conf, path)
        if node is not None and node not in values:
            raise ValueError(f"{where}: field '{path}' = {node!r} is not one of {', '.join(values)}")
    size = (conf.get("data") or {}).get("image_size")
    if size is not None:
        check_image_size(size, f"{where}: field 'data.image_size'")


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge (``over`` wins); a dict holding ``_replace_: true`` replaces instead of merging."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and v.get("_replace_"):
            out[k] = {kk: copy.deepcopy(vv) for kk, vv in v.items() if kk != "_replace_"}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """A YAML training config; ``base: other.yaml`` (relative to the file) is loaded first and overridden,
    then ``KEY.SUB=VALUE`` overrides (values parsed as YAML) are applied."""
    from ..utils import read_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    conf = read_yaml(path) or {}
    if not isinstance(conf, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    if "base" in conf:
        conf = merge(load_config(path.parent / conf.pop("base")), conf)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item}: expected KEY=VALUE, e.g. optimizer.lr=1e-4")
        key, value = item.split("=", 1)
        keys: list = [int(k) if k.isdigit() else k for k in key.split(".")]
        node = conf
        try:
            for k in keys[:-1]:
                node = node[k] if isinstance(node, list) else node.setdefault(k, {})
            node[keys[-1]] = read_yaml(f"--set {item}", value)
        except (IndexError, TypeError, AttributeError):
            raise ValueError(f"--set {item}: '{key}' does not name a field of {path}") from None
    check_keys(conf, str(path))
    return conf


def _path(p: str) -> str:
    return os.path.expandvars(os.path.expanduser(str(p)))


def build_places(specs: list[dict]) -> PlaceSet:
    """Union of place sources: {aligned: [folders], start, stop, drop_dark} | {gsv_cities: root, cities}
    | {manifest: csv, radius}; each may carry ``weight`` (sampling weight of its places, default 1)."""
    total: PlaceSet | None = None
    for s in specs:
        if "aligned" in s:
            ps = aligned_places([_path(f) for f in s["aligned"]], s.get("start", 0), s.get("stop"), s.get("drop_dark"))
        elif "gsv_cities" in s:
            ps = gsv_cities(_path(s["gsv_cities"]), s.get("cities"))
        elif "manifest" in s:
            ps = manifest_places(_path(s["manifest"]), s.get("radius"))
        else:
            raise ValueError(f"data.places entry {s}: needs one of 'aligned', 'gsv_cities', 'manifest'")
        if "weight" in s:
            ps = ps.weighted(float(s["weight"]))
        total = ps if total is None else total + ps
    if total is None:
        raise ValueError("data.places is empty: nothing to train on")
    return total


def set_trainable(model: VPRModel, mode: str, stages: int = 2, patterns: list[str] | None = None) -> int:
    """all | tail (last ``stages`` backbone stages + head) | head | match (only parameters whose name matches
    one of the regular expressions ``patterns``, e.g. prompts only). Frozen BatchNorm stays in eval mode.

    Returns k, the number of leading backbone stages frozen with the stem (their outputs can be cached).
    """
    for p in model.parameters():
        p.requires_grad_(True)
    if mode == "match":
        if not patterns:
            raise ValueError("trainable.mode 'match' needs trainable.patterns (regular expressions)")
        regs = [re.compile(r) for r in patterns]
        for name, p in model.named_parameters():
            p.requires_grad_(any(r.search(name) for r in regs))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"trainable.patterns {patterns} match no parameter of the model")
        return 0
    n = len(model.backbone.stages())
    if mode == "all":
        return 0
    if mode == "tail":
        model.backbone.freeze(max(0, n - stages))
        return max(0, n - stages)
    if mode == "head":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        return n
    raise ValueError(f"trainable.mode '{mode}' is not one of all, tail, head, match")


class PrefixCache:
    """Outputs of the frozen stem + first k stages, computed once per training image (no augmentation).

    Assumes the frozen prefix is deterministic (no dropout or drop-path in it), which holds for the
    registered backbones at their defaults; the values live in a ``FeatureCache`` (host memory or disk, within
    budgets, else recomputed), never on the accelerator.
    """

    def __init__(self, model: VPRModel, k: int, image_size: tuple[int, int], cache: FeatureCache) -> None:
        self.model, self.k, self.size, self.cache = model, k, image_size, cache

    def tokens(self, x: torch.Tensor, ids: torch.Tensor) -> Tokens:
        """[B, 3, H, W] images (only the uncached ones are used) -> student tokens, training only the suffix."""

        @torch.no_grad()
        def compute(rows: list[int]) -> dict[str, torch.Tensor]:
            return {"h": self.model.backbone.forward_prefix(x[rows], self.k)}

        h = self.cache.fetch(ids.tolist(), x.device, compute)["h"]
        return self.model.backbone.forward_suffix(h, self.k, self.size)


class Teacher:
    """A frozen model beside the student, fed its own un-augmented view of the same images (its own input
    size). Its outputs are then a function of the image alone, so they are computed once per training
    image and kept in a ``FeatureCache`` (host memory or disk within budgets; ``cache: false``: never).
    """

    def __init__(self, model: VPRModel, cache: FeatureCache | None) -> None:
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.cache = cache
        self.grid: tuple[int, int] | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, Tokens]:
        """[B, 3, H', W'] -> (descriptors [B, Dt], tokens [B, Nt, Ct])."""

        def compute(rows: list[int]) -> dict[str, torch.Tensor]:
            tok = self.model.forward_tokens(x[rows])
            self.grid = tok.grid
            out = {"desc": self.model.aggregator(tok), "patches": tok.patches}
            return out if tok.cls is None else {**out, "cls": tok.cls}

        ids_list = ids.tolist()
        got = compute(list(range(len(ids_list)))) if self.cache is None else \
            self.cache.fetch(ids_list, x.device, compute)
        assert self.grid is not None
        return got["desc"], Tokens(got["patches"], got.get("cls"), self.grid)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over DDP ranks (rank order), keeping gradients to this rank's part."""
    if not _distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()))


class TrainStep(nn.Module):
    """The student and the loss terms as one module (what DDP wraps): one batch -> (loss, logged values).

    The frozen prefix cache and the teacher stay outside the module: they hold no trainable weights.
    """

    def __init__(self, model: VPRModel, terms: nn.ModuleDict, weights: dict[str, float], ms_conf: dict,
                 total_steps: int, cache: PrefixCache | None, freeze_norm_stats: bool) -> None:
        super().__init__()
        ms_conf = dict(ms_conf)
        self.ms_weight = float(ms_conf.pop("weight", 1.0))
        self.model, self.terms, self.weights = model, terms, weights
        self.ms = MultiSimilarity(**ms_conf)
        self.total_steps, self.freeze_norm_stats = total_steps, freeze_norm_stats
        self.cache = cache

    def train(self, mode: bool = True) -> TrainStep:
        super().train(mode)
        self.model.train(mode)
        if mode and self.freeze_norm_stats:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, step: int,
                teacher: tuple[torch.Tensor, Tokens] | None = None,
                knobs: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # the loss terms run inside the knob context too: a term's own forward (WeiToP's unpruned target) sees
        # this step's sparsity
        with self.model.using(**(knobs or {})):
            tokens = self.model.forward_tokens(x) if self.cache is None else self.cache.tokens(x, ids)
            desc = self.model.aggregator(tokens)
            desc, labels = gather(desc), gather(labels)
            ctx = StepContext(step, self.total_steps, labels, desc, tokens, None if teacher is None else
                              gather(teacher[0]), None if teacher is None else teacher[1], x)
            return self.losses(ctx)

    def losses(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every loss term of one step, in float32 even under mixed precision (autocast is switched off here:
        Multi-Similarity's exponentials of cosines near 1 lose ~13% of their gradient in bf16)."""
        with torch.autocast(ctx.desc.device.type, enabled=False):
            return self._losses(ctx.float())

    def _losses(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        desc, labels = ctx.desc, ctx.labels
        loss = desc.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        if self.ms_weight:
            ms, bacc = self.ms(desc, labels)
            loss = loss + self.ms_weight * ms
            logs["loss/ms"], logs["batch_acc"] = ms.detach(), torch.tensor(bacc)
        for name, term in self.terms.items():
            value = term(ctx)
            loss = loss + self.weights[name] * value
            logs[f"loss/{name}"] = value.detach()
        logs["loss"] = loss.detach()
        return loss, logs


def sample_knobs(spec: dict, seed: int, step: int, total_steps: int, steps_per_epoch: int) -> dict[str, float]:
    """This step's runtime knobs: {name: value | {uniform: [low, high]} | {uniform: [low, [high_0, high_1]]}}.

    A [high_0, high_1] upper bound ramps with the epoch: high = high_0 + (high_1 - high_0) * epoch / epochs
    (TAT-VPR's stage-1 sparsity curriculum, s ~ U(0.1, 0.1 + 0.5 * epoch / E)). Draws are a function of
    (seed, step), so a resumed run samples the same values.
    """
    rng = np.random.default_rng([seed, step, 17])
    out = {}
    for name, s in spec.items():
        if isinstance(s, (int, float)):
            out[name] = float(s)
            continue
        if not isinstance(s, dict) or "uniform" not in s:
            raise ValueError(f"knobs.{name}: expected a number or {{uniform: [low, high]}}, got {s}")
        low, high = s["uniform"]
        if isinstance(high, list):
            epochs = max(1, math.ceil(total_steps / steps_per_epoch))
            high = high[0] + (high[1] - high[0]) * (step // steps_per_epoch) / epochs
        out[name] = float(rng.uniform(low, high))
    return out


def build_optimizer(model: VPRModel, conf: dict, terms: nn.Module | None = None) -> torch.optim.Optimizer:
    """Parameter groups by the model's top-level modules ('backbone', 'aggregator', ...) plus 'terms' (the
    loss terms' own weights), each at lr * ``lr_mult[group]``. A key ``re:PATTERN`` forms its own group of
    the parameters whose qualified names match (e.g. ``re:prompt: 100`` for EfficientVPR's 100x prompt lr).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if terms is not None:
        named += [(f"terms.{n}", p) for n, p in terms.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: every parameter is frozen (see 'trainable')")
    mult = conf.get("lr_mult") or {}
    patterns = {k: re.compile(k[3:]) for k in mult if k.startswith("re:")}
    groups: dict[str, list] = {}
    for n, p in named:
        g = next((k for k, r in patterns.items() if r.search(n)), n.split(".")[0])
        groups.setdefault(g, []).append(p)
    unknown = set(mult) - set(groups)
    if unknown:
        raise ValueError(f"optimizer.lr_mult names {sorted(unknown)}; trainable groups are {sorted(groups)}")
    params = [{"params": ps, "lr": conf["lr"] * mult.get(g, 1.0), "name": g} for g, ps in groups.items()]
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[conf["name"]]
    kw = {"weight_decay": conf.get("weight_decay", 0.0)}
    if conf["name"] == "sgd":
        kw["momentum"] = conf.get("momentum", 0.9)
    return cls(params, lr=conf["lr"], **kw)


def lr_factor(conf: dict, total_steps: int, steps_per_epoch: int = 1):
    """step -> lr multiplier: constant | cosine (linear warm-up, cosine to 0) | step (gamma every N) |
    multistep (gamma at each milestone) | linear (1 -> end_factor), after ``warmup_steps`` + ``warmup``.

    ``unit: epoch`` counts warmup, every, milestones and total in epochs of ``steps_per_epoch`` steps (as the
    published recipes do); the schedule still advances every optimizer step.
    """
    name = conf["name"]
    scale = steps_per_epoch if conf.get("unit", "step") == "epoch" else 1
    warm = int(conf.get("warmup", 0) * scale) + int(conf.get("warmup_steps", 0))
    if name not in ("constant", "cosine", "step", "multistep", "linear"):
        raise ValueError(f"schedule '{name}' is not one of constant, cosine, step, multistep, linear")

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if name == "cosine":
            t = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if name == "step":
            return conf.get("gamma", 0.8) ** ((step - warm) // int(conf["every"] * scale))
        if name == "multistep":
            return conf.get("gamma", 0.1) ** sum(step >= int(m * scale) for m in conf["milestones"])
        if name == "linear":
            end = int(conf["total"] * scale) if "total" in conf else total_steps
            t = min(1.0, (step - warm) / max(1, end - warm))
            return 1.0 + t * (conf.get("end_factor", 0.2) - 1.0)
        return 1.0

    return f


def _save_checkpoint(out: Path, step: int, model, terms, opt, sched, conf: dict, best: float) -> Path:
    ck = out / "checkpoints" / f"step_{step:07d}"
    save_model(model, ck)
    osd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.contiguous() for i, st in osd["state"].items() for k, v in st.items()}
    tensors.update({f"terms.{k}": v.detach().contiguous() for k, v in terms.state_dict().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write(ck / "train_state.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json(ck / "train_state.json", {"step": step, "scheduler": sched.state_dict(), "best_val": best,
                                         "param_groups": osd["param_groups"], "conf": conf})
    write_json(ck / CHECKSUMS, {name: sha256_file(ck / name) for name in CHECKPOINT_FILES})
    write_json(out / "checkpoints" / "latest.json", {"step": step, "path": ck.name})
    kept = sorted((out / "checkpoints").glob("step_*"))
    for old in kept[: -conf["keep_checkpoints"]]:
        shutil.rmtree(old, ignore_errors=True)
    return ck


def _verify_checkpoint(ck: Path) -> None:
    """Raise ValueError naming the first file of checkpoint folder ``ck`` that is missing or damaged."""
    try:
        sums = json.loads((ck / CHECKSUMS).read_text())
    except (OSError, ValueError):
        raise ValueError(f"{ck / CHECKSUMS}: missing or damaged (an unfinished checkpoint)") from None
    for name in CHECKPOINT_FILES:
        if not (ck / name).is_file():
            raise ValueError(f"{ck / name}: missing")
        if sha256_file(ck / name) != sums.get(name):
            raise ValueError(f"{ck / name}: checksum differs (damaged or truncated)")


def _load_checkpoint(out: Path, model, terms, opt, sched) -> tuple[int, float]:
    """Restore the newest checkpoint that verifies; a damaged newer one is skipped with a one-line warning."""
    folders = sorted((out / "checkpoints").glob("step_*"), reverse=True)
    errors = []
    for ck in folders:
        try:
            _verify_checkpoint(ck)
            step, best = _restore(ck, model, terms, opt, sched)
        except ValueError as e:
            errors.append(str(e).splitlines()[0])
            continue
        for err in errors:
            warn(f"skipping a damaged checkpoint: {err}")
        if errors:
            warn(f"resuming from {ck.name} instead")
        return step, best
    raise ValueError(f"{out / 'checkpoints'}: no checkpoint verifies ({'; '.join(errors) or 'none found'}); "
                     "start again without --resume in a new --out")


def _restore(ck: Path, model, terms, opt, sched) -> tuple[int, float]:
    device = module_device(model)
    model.load_state_dict(load_file(str(ck / "model.safetensors"), device=str(device)))
    state = json.loads((ck / "train_state.json").read_text())
    tensors = load_file(str(ck / "train_state.safetensors"), device=str(device))
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    terms.load_state_dict({k[len("terms."):]: v for k, v in tensors.items() if k.startswith("terms.")})
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"].cpu())
    return state["step"], state["best_val"]


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl with one
    GPU per local rank, else gloo on CPU."""
    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


def _average(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Logged values averaged over ranks (batch-level ones are already equal on every rank)."""
    keys = sorted(logs)
    v = torch.stack([logs[k].float().cpu() for k in keys])
    if _distributed():
        dist.all_reduce(v)
        v /= dist.get_world_size()
    return dict(zip(keys, v.tolist(), strict=True))


def _barrier() -> None:
    if _distributed():
        dist.barrier()


BF16_EMULATED = ("precision bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX) is emulated by PyTorch, "
                 "about 12x slower than fp32 (measured on the SALAD recipe); set precision: fp32 to train on this CPU")


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (oneDNN's own check; False if PyTorch lacks it)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def train(conf: dict, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, on_step: Callable[[int, dict], None] | None = None,
          allow_change: tuple[str, ...] = ()) -> dict:
    """Train per ``conf`` (merged over DEFAULTS) into ``out_dir``; returns the final metrics.

    ``resume`` refuses a config that differs from the run's own unless every changed field is under a prefix in
    ``allow_change`` (e.g. ``("optimizer.lr",)``; the new learning rates then apply from the resumed step).
    Writes ``final/`` (the last weights), ``best/`` (the best validation R@1, step 0 included, so it is the
    starting model when training never beat it), ``metrics.csv``, ``config.json``, ``checkpoints/`` and
    TensorBoard logs. stop_after: end after that many steps of *this* invocation without finishing (used
    to test resumption; a real kill behaves the same as far as the checkpoints are concerned). on_step(step,
    metrics): called after every optimizer step (progress and memory probes).
    """
    check_keys(conf)
    conf = merge(DEFAULTS, conf)
    conf["knobs"] = conf["knobs"] or {}  # "knobs: null" in a config clears a base config's knobs
    rank, world, device = _init_distributed(conf["device"])
    try:
        return _train(conf, Path(out_dir), resume, progress and rank == 0, stop_after, rank, world, device, on_step,
                      tuple(allow_change))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def config_changes(old, new, path: str = "") -> list[str]:
    """Dotted paths of the fields whose values differ between two configs (nested dicts compared field by field)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new), key=str)
                for c in config_changes(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    return [] if old == new else [path]


def check_resume(out: Path, conf: dict, allow: tuple[str, ...] = ()) -> list[str]:
    """Refuse to resume the run in ``out`` with a config that differs from the one it started with, unless every
    changed field is under a prefix in ``allow`` (``--allow-change optimizer.lr``) -> the allowed changes."""
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{out / 'config.json'}: the run's config cannot be read ({e}); cannot check that the "
                         "resumed run is the same") from None
    changed = config_changes(old, json.loads(json.dumps(conf)))
    refused = [c for c in changed if not any(c == a or c.startswith(a + ".") for a in allow)]
    if refused:
        raise ValueError(f"{out}: --resume with a changed config ({', '.join(refused)}); resume with the run's own "
                         f"config, or say what may change: --allow-change {' --allow-change '.join(refused)}")
    return changed


def data_fingerprint(places) -> dict:
    """What a run trains on: {"images", "places", "sha256"} over every place's image paths with their sizes and
    modification times (changed, added or removed images all change it; the pixels are not read)."""
    h, n = hashlib.sha256(), 0
    for i, place in enumerate(places.places):
        for p in place:
            try:
                st = os.stat(p)
                sig = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                sig = "missing"
            h.update(f"{i}\0{p}\0{sig}\n".encode())
            n += 1
    return {"images": n, "places": len(places.places), "sha256": h.hexdigest()}


def check_resume_data(out: Path, data: dict, allow: tuple[str, ...] = ()) -> None:
    """Refuse to resume the run in ``out`` when its training data changed since it started (``data.json``), unless
    ``--allow-change data``; a run made before the fingerprint was recorded gets it now."""
    f = out / "data.json"
    try:
        old = json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError, RecursionError):
        old = {}
    if old is not None and old != data and "data" not in allow:
        was = f"{old.get('images')} images of {old.get('places')} places" if isinstance(old, dict) else "unreadable"
        raise ValueError(f"{out}: --resume with changed training data ({was} when it started, {data['images']} "
                         f"images of {data['places']} places now, or changed files); resume with the same data, "
                         "or --allow-change data")


def _train(conf: dict, out: Path, resume: bool, progress: bool, stop_after: int | None, rank: int, world: int,
           device: torch.device, on_step: Callable[[int, dict], None] | None = None,
           allow_change: tuple[str, ...] = ()) -> dict:
    main = rank == 0
    if not resume and (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    seed_everything(conf["seed"])
    model = load_model(conf["model"]).to(device)
    tr = conf["trainable"]
    frozen = set_trainable(model, tr["mode"], tr.get("stages", 2), tr.get("patterns"))
    if tr.get("norm_stats", "train") not in ("train", "frozen"):
        raise ValueError(f"trainable.norm_stats '{tr['norm_stats']}' is not 'train' or 'frozen'")
    if world > 1 and device.type == "cuda" and tr.get("norm_stats") == "train":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    d = conf["data"]
    if d["places_per_batch"] % world:
        raise ValueError(f"data.places_per_batch={d['places_per_batch']} does not split over {world} ranks")
    places = build_places(d["places"]).filter(d["min_images"])
    n_images = sum(len(p) for p in places.places)
    sampler = d["sampler"]
    if sampler == "auto":
        sampler = "in-city" if all("gsv_cities" in s for s in d["places"]) else "uniform"
    steps_per_epoch = epoch_steps(len(places), d["places_per_batch"], sampler, world, n_images)
    if conf.get("epochs"):
        conf["steps"] = int(conf["epochs"] * steps_per_epoch)
    size = tuple(d["image_size"]) if d["image_size"] else model.image_size
    augment = None
    if d["augment"]:
        from timm.data.auto_augment import rand_augment_transform

        augment = rand_augment_transform(d["augment"], {})
    teacher, views = None, {}
    if conf["teacher"]:
        tconf = conf["teacher"]
        tmodel = load_model(tconf["model"]).to(device)
        teacher = Teacher(tmodel, FeatureCache("teacher outputs", n_images, d["cache_host_gb"], d["cache_disk_gb"],
                                               out / "cache") if tconf.get("cache", True) else None)
        views["teacher"] = tmodel.transform(tuple(tconf["image_size"]) if tconf.get("image_size") else None)
    terms, weights = build_terms(conf["loss"]["terms"], TermContext(
        model.backbone.out_dim, model.out_dim, None if teacher is None else teacher.model.backbone.out_dim,
        None if teacher is None else teacher.model.out_dim, model))
    terms.to(device)
    batches = PlaceBatches(places, d["places_per_batch"], d["images_per_place"], model.transform(size),
                           conf["seed"], rank, world, augment=augment, num_steps=conf["steps"], views=views,
                           sampler=sampler)
    # Knobs (e.g. sparsity) may act inside the frozen prefix, so a sampled knob turns the prefix cache off.
    use_cache = (d["cache_frozen"] and augment is None and frozen > 0 and not conf["knobs"]
                 and model.backbone.cacheable_prefix)
    cache = PrefixCache(model, frozen, size, FeatureCache(f"frozen-prefix outputs ({frozen} stages)", n_images,
                                                          d["cache_host_gb"], d["cache_disk_gb"], out / "cache")) \
        if use_cache else None
    step_module = TrainStep(model, terms, weights, conf["loss"]["ms"], conf["steps"], cache,
                            tr.get("norm_stats") == "frozen")
    runner: nn.Module = step_module
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    opt = build_optimizer(model, conf["optimizer"], terms)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(conf["schedule"], conf["steps"], steps_per_epoch))
    val = open_val_sets(conf["val"]["sets"]) if conf["val"] and main else None
    start, best = 0, -1.0
    data = data_fingerprint(places)
    if resume and (out / "checkpoints" / "latest.json").exists():
        changed = check_resume(out, conf, allow_change)
        check_resume_data(out, data, allow_change)
        configured = [g["lr"] for g in opt.param_groups]  # this config's base learning rates
        start, best = _load_checkpoint(out, model, terms, opt, sched)
        if any(c.startswith(("optimizer", "schedule")) for c in changed):  # allowed: the new rates apply from here
            sched.base_lrs = configured
            for g, lr, f in zip(opt.param_groups, configured, [fn(start) for fn in sched.lr_lambdas], strict=True):
                g["initial_lr"], g["lr"] = lr, lr * f
        if changed and main:
            warn(f"{out}: resumed with changed {', '.join(changed)} (allowed by --allow-change)")
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.csv", ["step", "loss", "lr", "batch_acc", "loss/ms",
                                           *(f"loss/{k}" for k in terms), *(f"knob/{k}" for k in conf["knobs"]),
                                           *(["val_R@1", *(f"val_R@1/{ds.name}" for ds in val)] if val else [])])
    tb = _tensorboard(out / "tensorboard") if main else None
    if main:
        write_json(out / "config.json", conf)
        write_json(out / "data.json", data)
        log.truncate(start)  # rows logged after the checkpoint we resume from are replayed
    if val is not None and start == 0:
        best = _validate_and_keep(model, val, size, 0, -1.0, out, log, tb, conf["val"].get("knobs"))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(batches, range(start, conf["steps"])),
                                         batch_size=None, num_workers=d["workers"])
    val_every = conf["val"].get("every", conf["checkpoint_every"]) if conf["val"] else 0
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if conf["precision"] == "bf16"
                else contextlib.nullcontext())
    if conf["precision"] == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn(BF16_EMULATED, stacklevel=2)
    bar = tqdm(total=conf["steps"], initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    metrics: dict[str, float] = {}
    step = start
    for x, y, ids, v in loader:
        runner.train()
        t_out = None if teacher is None else teacher(v["teacher"].to(device), ids)
        knobs = sample_knobs(conf["knobs"], conf["seed"], step, conf["steps"], steps_per_epoch)
        with autocast:
            loss, logs = runner(x.to(device), y.to(device), ids, step, t_out, knobs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        metrics = {"step": step, **_average(logs), "lr": opt.param_groups[0]["lr"],
                   **{f"knob/{k}": v for k, v in knobs.items()}}
        if main:
            log.append(metrics)
            if tb is not None:
                for k, val_ in metrics.items():
                    if k != "step":
                        tb.add_scalar(k, val_, step)
        if val is not None and (step % val_every == 0 or step == conf["steps"]):
            best = _validate_and_keep(model, val, size, step, best, out, log, tb, conf["val"].get("knobs"))
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", **({"best_val": f"{best:.3f}"} if val is not None else {}))
        bar.update(1)
        if main and (step % conf["checkpoint_every"] == 0 or step == conf["steps"]):
            _save_checkpoint(out, step, model, terms, opt, sched, conf, best)
        _barrier()
        if on_step is not None:
            on_step(step, metrics)
        if stop_after is not None and step - start >= stop_after:
            break
    bar.close()
    if tb is not None:
        tb.close()
    if stop_after is not None and step < conf["steps"]:
        return {**metrics, "stopped": True}
    if main:
        save_model(model, out / "final")
        if world > 1:
            write_json(out / "ddp.json", {"world_size": world, "rank_fingerprints": _rank_fingerprints(model)})
    elif world > 1:
        _rank_fingerprints(model)
    return {**metrics, "best_val_R@1": best if best >= 0 else None}


def _rank_fingerprints(model: VPRModel) -> list[str]:
    """Every rank's weight fingerprint (collective: all ranks must call it); identical under correct DDP."""
    fp = model.fingerprint()
    got: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(got, fp)
    return [str(g) for g in got]


def _validate_and_keep(model: VPRModel, val: list, size: tuple[int, int], step: int, best: float, out: Path,
                       log: MetricsLog, tb, knobs: dict | None) -> float:
    """Validate (rank 0), log, and save ``best/`` when the mean R@1 beats ``best``; returns the new best."""
    r = validate(model, val, size, knobs)
    log.append({"step": step, **r}, merge_last=step > 0)
    if tb is not None:
        for k, v in r.items():
            tb.add_scalar(k, v, step)
    if r["val_R@1"] > best:
        save_model(model, out / "best")
        write_json(out / "best" / "step.json", {"step": step, **r})
        return r["val_R@1"]
    return best


def open_val_sets(specs: list[dict]) -> list:
    """Validation datasets: [{db, queries, aligned, frames: [start, stop], radius, drop_dark}, ...]; the val
    block may also set ``every`` (steps) and ``knobs`` (e.g. {sparsity: 0.4}, TAT-VPR's validation setting)."""
    return [open_dataset(_path(v["db"]), _path(v["queries"]), aligned_tolerance=v.get("aligned"),
                         radius=v.get("radius", 25.0), drop_dark=v.get("drop_dark"),
                         frames=tuple(v["frames"]) if v.get("frames") else None) for v in specs]


def validate(model: VPRModel, sets: list, size: tuple[int, int], knobs: dict | None = None) -> dict[str, float]:
    """R@1 on each validation set at the training image size, and their mean as ``val_R@1``."""
    vconf = EvalConf(cache_dir=None, efficiency=False, progress=False, image_size=size, knobs=knobs)
    was_training = model.training
    device = module_device(model)
    r1 = {f"val_R@1/{ds.name}": evaluate_dataset(model.eval(), ds, vconf, device=device)[0]["recall"]["R@1"]
          for ds in sets}
    model.train(was_training)
    return {"val_R@1": sum(r1.values()) / len(r1), **r1}


def _tensorboard(path: Path):
    """A SummaryWriter when the ``tensorboard`` package is installed, else None (metrics.csv has it all)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class MetricsLog:
    """metrics.csv with a fixed header; rows appended as steps finish, truncated on resume."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path, self.fields = path, fields

    def _rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _write(self, rows: list[dict]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)

        atomic_write(self.path, write)

    def truncate(self, last_step: int) -> None:
        if self.path.exists():
            self._write([r for r in self._rows() if int(r["step"]) <= last_step])

    def append(self, row: dict, merge_last: bool = False) -> None:
        """Add a row; ``merge_last`` fills the last row's empty fields instead (validation of that step)."""
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        if merge_last:
            rows = self._rows()
            if rows and rows[-1]["step"] == str(row["step"]):
                rows[-1].update({k: v for k, v in row.items() if k in self.fields})
                self._write(rows)
                return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def read(self) -> list[dict]:
        return self._rows()
