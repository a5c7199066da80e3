"""The two backbone layouts the published VPR checkpoints share: Meta's DINOv2 ViT and torchvision's ResNet.

Both are read from the tensor shapes (width, depth, heads = width / 64, MLP width, patch size, the grid of the
stored position embedding; ResNet block type and blocks per stage) and mapped onto edgevpr's timm-based
backbones, whose parameter names are the same as Meta's and torchvision's for these layouts.
"""

from __future__ import annotations

import math

import torch

from .base import CheckpointError, Ledger

#: Every published ViT uses 64-wide attention heads.
HEAD_DIM = 64


def dinov2(led: Ledger, prefix: str, final_norm: bool, out: dict[str, torch.Tensor],
           norm_reason: str = "") -> dict:
    """Meta DINOv2 keys under ``prefix`` -> edgevpr ``backbone.vit.*`` in ``out``; returns the backbone config.

    final_norm: whether the family applies DINOv2's final LayerNorm; when it does not, the norm's weights are
    still loaded (the module exists) and listed as unused at inference with ``norm_reason``.
    """
    pos = led.shape(prefix + "pos_embed")
    dim, n = pos[-1], pos[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{led.where}: {prefix}pos_embed holds {n} patch positions, not a square grid")
    patch = led.shape(prefix + "patch_embed.proj.weight")[-1]
    depth = led.count(prefix + "blocks.")
    hidden = led.shape(prefix + "blocks.0.mlp.fc1.weight")[0]
    if depth == 0 or dim % HEAD_DIM:
        raise CheckpointError(f"{led.where}: {prefix}: {depth} blocks of width {dim}: not a published DINOv2 ViT")
    led.skip(prefix + "mask_token", "DINOv2's mask token is used only by its masked-image pretraining")
    if not final_norm:
        for k in ("norm.weight", "norm.bias"):
            led.skip(prefix + k, norm_reason)
            out["backbone.vit." + k] = led.sd[prefix + k].float()  # loaded into the (unapplied) module
    led.move(prefix, "backbone.vit.", out)
    return {"name": "vit", "timm_name": "vit_base_patch14_dinov2", "weights": None, "embed_dim": dim,
            "depth": depth, "num_heads": dim // HEAD_DIM, "mlp_ratio": hidden / dim, "patch_size": patch,
            "img_size": side * patch, "init_values": 1e-5, "final_norm": final_norm, "pos_interp": "dinov2"}


#: (block type, blocks per stage) -> timm ResNet; a cropped ResNet is matched on the stages it keeps.
RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
           ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
           ("bottleneck", (3, 8, 36, 3)): "resnet152"}
#: torchvision ResNet children when the model is an nn.Sequential of them (BoQ's ``net``, CosPlace's backbone)
_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def resnet(led: Ledger, prefix: str, out: dict[str, torch.Tensor], sequential: bool) -> dict:
    """torchvision ResNet keys under ``prefix`` -> edgevpr ``backbone.net.*``; returns the backbone config.

    sequential: the keys are numbered children (``0.weight``, ``4.0.conv1.weight``) instead of named ones.
    Stages missing from the file are cropped (ResNet after layer3 for BoQ and MixVPR).
    """
    def named(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{_CHILDREN[head]}.{tail}" if sequential else rest

    if sequential:
        bad = [k for k in led.keys(prefix) if k[len(prefix):].split(".", 1)[0] not in _CHILDREN]
        if bad:
            raise CheckpointError(f"{led.where}: not a {led.family} checkpoint: {bad[0]} is not part of a torchvision "
                                  "ResNet")
    stage = {named(k[len(prefix):]).split(".", 1)[0] for k in led.keys(prefix)}
    kept = [s for s in ("layer1", "layer2", "layer3", "layer4") if s in stage]
    if "conv1" not in stage or not kept or kept != ["layer1", "layer2", "layer3", "layer4"][: len(kept)]:
        raise CheckpointError(f"{led.where}: not a {led.family} checkpoint: {prefix}* is not a torchvision ResNet "
                              f"(found {', '.join(sorted(stage)[:6])})")
    l1 = "4" if sequential else "layer1"
    kind = "bottleneck" if led.has(f"{prefix}{l1}.0.conv3.weight") else "basic"
    counts = tuple(led.count(f"{prefix}{i if sequential else s}.") for i, s in
                   zip(("4", "5", "6", "7"), kept, strict=False))
    names = [n for (k, c), n in RESNETS.items() if k == kind and c[: len(counts)] == counts]
    if not names:
        raise CheckpointError(f"{led.where}: a {kind} ResNet with {counts} blocks per stage is not a known ResNet")
    led.move(prefix, "backbone.net.", out, named)
    crop = [s for s in ("layer1", "layer2", "layer3", "layer4") if s not in kept]
    return {"name": "cnn", "timm_name": names[0], "weights": None, "crop": crop}
