"""The training loop: P x K place batches -> model -> Multi-Similarity (+ extra terms) -> optimizer.

``train(conf, out_dir)`` runs a config (see ``DEFAULTS``); ``resume=True`` continues from the newest
checkpoint bit-exactly: batches are a function of (seed, step), and a checkpoint holds the weights,
the optimizer and scheduler states and the RNG state. Checkpoints are folders written file by file
atomically, then published by atomically rewriting ``checkpoints/latest.json``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..api import EvalConf, evaluate_dataset
from ..data.datasets import open_dataset
from ..models.model import VPRModel, load_model, save_model
from ..utils import atomic_write, seed_everything, write_json
from .losses import MultiSimilarity
from .places import PlaceBatches, PlaceSet, aligned_places, gsv_cities, manifest_places

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": "effnet-lite0-gem",
    "data": {"places": [], "places_per_batch": 16, "images_per_place": 2, "min_images": 2,
             "image_size": None, "augment": None, "workers": 0, "cache_frozen": True},
    "trainable": {"mode": "tail", "stages": 2},
    "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "lr_mult": {}},
    "schedule": {"name": "constant", "warmup_steps": 0},
    "loss": {"ms": {"alpha": 1.0, "beta": 50.0, "base": 0.0, "epsilon": 0.1}},
    "steps": 100,
    "checkpoint_every": 50,
    "keep_checkpoints": 2,
    "val": None,
}


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge (``over`` wins)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _path(p: str) -> str:
    return os.path.expandvars(os.path.expanduser(str(p)))


def build_places(specs: list[dict]) -> PlaceSet:
    """Union of place sources: {aligned: [folders], start, stop, drop_dark} | {gsv_cities: root, cities}
    | {manifest: csv, radius}."""
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
        total = ps if total is None else total + ps
    if total is None:
        raise ValueError("data.places is empty: nothing to train on")
    return total


def set_trainable(model: VPRModel, mode: str, stages: int = 2) -> int:
    """all | tail (last ``stages`` backbone stages + head) | head. Frozen BatchNorm stays in eval mode.

    Returns k, the number of leading backbone stages frozen with the stem (their outputs can be cached).
    """
    for p in model.parameters():
        p.requires_grad_(True)
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
    raise ValueError(f"trainable.mode '{mode}' is not one of all, tail, head")


class PrefixCache:
    """Outputs of the frozen stem + first k stages, computed once per training image (no augmentation).

    Assumes the frozen prefix is deterministic (no dropout or drop-path in it), which holds for the
    registered backbones at their defaults; the cache lives in memory.
    """

    def __init__(self, model: VPRModel, k: int, image_size: tuple[int, int]) -> None:
        self.model, self.k, self.size = model, k, image_size
        self.store: dict[int, torch.Tensor] = {}

    def descriptors(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images (only the uncached ones are used) -> [B, D], training only the suffix."""
        keys = ids.tolist()
        todo = [j for j, key in enumerate(keys) if key not in self.store]
        if todo:
            with torch.no_grad():
                h = self.model.backbone.forward_prefix(x[todo], self.k)
            self.store.update({keys[j]: h[i] for i, j in enumerate(todo)})
        h = torch.stack([self.store[key] for key in keys])
        return self.model.aggregator(self.model.backbone.forward_suffix(h, self.k, self.size))


def build_optimizer(model: VPRModel, conf: dict) -> torch.optim.Optimizer:
    """Parameter groups by top-level module ('backbone', 'aggregator', ...) with lr multipliers."""
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.split(".")[0], []).append(p)
    mult = conf.get("lr_mult", {})
    unknown = set(mult) - set(groups)
    if unknown:
        raise ValueError(f"optimizer.lr_mult names {sorted(unknown)}; trainable groups are {sorted(groups)}")
    params = [{"params": ps, "lr": conf["lr"] * mult.get(g, 1.0), "name": g} for g, ps in groups.items()]
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[conf["name"]]
    kw = {"weight_decay": conf.get("weight_decay", 0.0)}
    if conf["name"] == "sgd":
        kw["momentum"] = conf.get("momentum", 0.9)
    return cls(params, lr=conf["lr"], **kw)


def lr_factor(conf: dict, total_steps: int):
    """step -> lr multiplier: constant | cosine (linear warm-up, cosine to 0) | step (gamma every N) | linear."""
    name, warm = conf["name"], conf.get("warmup_steps", 0)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if name == "constant":
            return 1.0
        if name == "cosine":
            t = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if name == "step":
            return conf.get("gamma", 0.8) ** ((step - warm) // conf["every"])
        if name == "linear":
            t = min(1.0, (step - warm) / max(1, total_steps - warm))
            return 1.0 + t * (conf.get("end_factor", 0.2) - 1.0)
        raise ValueError(f"schedule '{name}' is not one of constant, cosine, step, linear")

    return f


def _save_checkpoint(out: Path, step: int, model, opt, sched, conf: dict, best: float) -> Path:
    ck = out / "checkpoints" / f"step_{step:07d}"
    save_model(model, ck)
    osd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.contiguous() for i, st in osd["state"].items() for k, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write(ck / "train_state.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json(ck / "train_state.json", {"step": step, "scheduler": sched.state_dict(), "best_val": best,
                                         "param_groups": osd["param_groups"], "conf": conf})
    write_json(out / "checkpoints" / "latest.json", {"step": step, "path": ck.name})
    kept = sorted((out / "checkpoints").glob("step_*"))
    for old in kept[: -conf["keep_checkpoints"]]:
        shutil.rmtree(old, ignore_errors=True)
    return ck


def _load_checkpoint(out: Path, model, opt, sched) -> tuple[int, float]:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    ck = out / "checkpoints" / latest["path"]
    model.load_state_dict(load_file(str(ck / "model.safetensors")))
    state = json.loads((ck / "train_state.json").read_text())
    tensors = load_file(str(ck / "train_state.safetensors"))
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return state["step"], state["best_val"]


def train(conf: dict, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Train per ``conf`` (merged over DEFAULTS) into ``out_dir``; returns the final metrics.

    stop_after: end the run after that many steps of *this* invocation without finishing (used to
    test resumption; a real kill behaves the same as far as the checkpoints are concerned).
    """
    conf = merge(DEFAULTS, conf)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(conf["seed"])
    model = load_model(conf["model"])
    frozen = set_trainable(model, conf["trainable"]["mode"], conf["trainable"].get("stages", 2))
    d = conf["data"]
    places = build_places(d["places"]).filter(d["min_images"])
    size = tuple(d["image_size"]) if d["image_size"] else model.image_size
    augment = None
    if d["augment"]:
        from timm.data.auto_augment import rand_augment_transform

        augment = rand_augment_transform(d["augment"], {})
    batches = PlaceBatches(places, d["places_per_batch"], d["images_per_place"], model.transform(size),
                           conf["seed"], augment=augment, num_steps=conf["steps"])
    opt = build_optimizer(model, conf["optimizer"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(conf["schedule"], conf["steps"]))
    ms = MultiSimilarity(**conf["loss"]["ms"])
    val = None
    if conf["val"]:
        v = conf["val"]
        val = open_dataset(_path(v["db"]), _path(v["queries"]), aligned_tolerance=v.get("aligned"),
                           radius=v.get("radius", 25.0), drop_dark=v.get("drop_dark"))
    cache = PrefixCache(model, frozen, size) if d["cache_frozen"] and augment is None and frozen > 0 else None
    start, best = 0, -1.0
    if resume and (out / "checkpoints" / "latest.json").exists():
        start, best = _load_checkpoint(out, model, opt, sched)
    elif not resume and (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    write_json(out / "config.json", conf)
    log_path = out / "metrics.csv"
    _truncate_csv(log_path, start)  # rows logged after the checkpoint we resume from are replayed
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(batches, range(start, conf["steps"])),
                                         batch_size=None, num_workers=d["workers"])
    tb = _tensorboard(out / "tensorboard")
    bar = tqdm(total=conf["steps"], initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    metrics: dict[str, float] = {}
    step = start
    for x, y, ids in loader:
        model.train()
        loss, bacc = ms(model(x) if cache is None else cache.descriptors(x, ids), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        metrics = {"step": step, "loss": float(loss.detach()), "batch_acc": bacc, "lr": opt.param_groups[0]["lr"]}
        val_every = conf["val"].get("every", conf["checkpoint_every"]) if val is not None else 0
        if val is not None and (step % val_every == 0 or step == conf["steps"]):
            vconf = EvalConf(cache_dir=None, efficiency=False, progress=False, image_size=size)
            r = evaluate_dataset(model.eval(), val, vconf)[0]
            metrics["val_R@1"] = r["recall"]["R@1"]
            if metrics["val_R@1"] > best:
                best = metrics["val_R@1"]
                save_model(model, out / "best")
        _append_csv(log_path, metrics)
        if tb is not None:
            for k, v in metrics.items():
                if k != "step":
                    tb.add_scalar(k, v, step)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", bacc=f"{bacc:.2f}",
                        **({"val": f"{metrics['val_R@1']:.3f}"} if "val_R@1" in metrics else {}))
        bar.update(1)
        if step % conf["checkpoint_every"] == 0 or step == conf["steps"]:
            _save_checkpoint(out, step, model, opt, sched, conf, best)
        if stop_after is not None and step - start >= stop_after:
            bar.close()
            if tb is not None:
                tb.close()
            return {**metrics, "stopped": True}
    bar.close()
    if tb is not None:
        tb.close()
    save_model(model, out / "final")
    return {**metrics, "best_val_R@1": best if best >= 0 else None}


def _tensorboard(path: Path):
    """A SummaryWriter when the ``tensorboard`` package is installed, else None (metrics.csv has it all)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


CSV_FIELDS = ["step", "loss", "batch_acc", "lr", "val_R@1"]


def _truncate_csv(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    path.unlink()
    for r in rows:
        _append_csv(path, r)


def _append_csv(path: Path, row: dict) -> None:
    fields = CSV_FIELDS
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in fields})
