"""What edgevpr offers, known without torch: the named model configs, what their weights are, and the names of the
backbones, aggregators and import formats (``edgevpr models`` runs on this in the runtime install, in well under a
second). The name lists are checked against the registries of the torch side by a test."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

PRESET_DIR = "configs/models"
BACKBONE_NAMES = ("cnn", "dinov2_vitb14", "dinov2_vitb14_reg", "dinov2_vitl14", "dinov2_vitl14_reg", "dinov2_vits14",
                  "dinov2_vits14_reg", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                  "mobilenetv2", "pixels", "resnet50", "tetra_vit", "tinyvit_11m", "tinyvit_21m", "tinyvit_5m", "vit")
AGGREGATOR_NAMES = ("boq", "cls", "efficientvpr", "flatten", "gem", "megaloc", "mixvpr", "netvlad", "salad",
                    "weiad")
IMPORT_FORMATS = ("boq", "cosplace", "eigenplaces", "megaloc", "mixvpr", "salad", "tetra")
#: heads without parameters: a model with one of them and pretrained backbone weights is complete
PARAMETER_FREE_HEADS = ("gem", "cls", "flatten")


def preset_names() -> list[str]:
    files = resources.files("edgevpr").joinpath(PRESET_DIR).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def preset_config(name: str, config_file: str = "config.json") -> dict[str, Any]:
    f = resources.files("edgevpr").joinpath(f"{PRESET_DIR}/{name}.yaml")
    if not f.is_file():
        raise KeyError(f"unknown model '{name}': not a folder with {config_file}, not a config file, "
                       f"and not a named model ({', '.join(preset_names())}, or a published one: `edgevpr models`)")
    cfg = yaml.safe_load(f.read_text())
    cfg.setdefault("name", name)
    return cfg


def head_untrained(config: dict, saved: bool) -> bool:
    """A model built from a config (no published or saved weights) whose head has parameters to train."""
    return not saved and not (config.get("provenance") or {}).get("weights") and \
        config["backbone"]["name"] != "pixels" and config["aggregator"]["name"] not in PARAMETER_FREE_HEADS


def weights_status(config: dict, saved: bool = False) -> str:
    """What a model's weights are: published VPR weights, a saved edgevpr model, or a backbone with an untrained
    head (one line, for `edgevpr models` and the untrained-head warning). saved: loaded from a model folder."""
    prov = config.get("provenance") or {}
    if prov.get("weights"):
        return f"{prov['weights']} ({prov.get('upstream', '?')})"
    if saved:
        return "saved edgevpr model (trained or built by edgevpr)"
    if config["backbone"]["name"] == "pixels":
        return "no weights (patch-normalised pixels)"
    w = config["backbone"].get("weights")
    backbone = {"offline": "offline ImageNet backbone", "hub": "pretrained backbone (downloaded)",
                "timm": "pretrained backbone (timm, downloaded)", None: "random backbone",
                "random": "random backbone"}.get(w, f"backbone from {w}")
    head = config["aggregator"]["name"]
    if not head_untrained(config, saved):
        return f"{backbone} + {head} (no head to train)"
    return f"{backbone} + UNTRAINED {head} head: a starting point for training, not for evaluation"
