"""Backbones behind a registry. Every backbone returns ``Tokens`` (see edgevpr.tokens).

ViTs (DINOv2 S/B/L with or without registers, any timm ViT) expose their stages
(``embed`` -> ``run_blocks`` -> ``finish``) so that prompts, token pruning and cached frozen prefixes
plug in between blocks. CNNs (ResNet50 cropped at layer3, EfficientNet-lite, MobileNetV2, Tiny-ViT)
return their last feature map as a token grid without a CLS token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import timm
import torch
from timm.layers import HybridEmbed
from torch import nn

from ..registry import Registry
from ..tokens import Tokens
from .prompts import Prompts
from .pruning import TokenPruner
from .weights import WeightsError, load_into, offline_file, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a backbone."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"


class Backbone(nn.Module):
    """Base: images [B, 3, H, W] -> Tokens. Subclasses set out_dim, stride, has_cls, preprocess."""

    out_dim: int
    stride: int
    has_cls: bool
    preprocess: Preprocess
    #: False when the first stages cannot run apart from the rest (prompted ViTs), so nothing is cached
    cacheable_prefix: bool = True

    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (H, W) for an input of image_size (H, W)."""
        return (-(-image_size[0] // self.stride), -(-image_size[1] // self.stride))

    def stages(self) -> list[nn.Module]:
        """Ordered trainable stages; ``freeze(n)`` freezes the stem and the first n of them."""
        raise NotImplementedError

    def stem(self) -> list[nn.Module | nn.Parameter]:
        raise NotImplementedError

    def forward_prefix(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Stem and the first ``k`` stages: images [B, 3, H, W] -> intermediate state (cacheable when frozen)."""
        raise NotImplementedError

    def forward_suffix(self, h: torch.Tensor, k: int, image_size: tuple[int, int]) -> Tokens:
        """The stages after the first ``k`` on a ``forward_prefix`` state; prefix + suffix == forward."""
        raise NotImplementedError

    def freeze(self, n_stages: int) -> None:
        """Freeze the stem and the first ``n_stages`` stages (-1: everything)."""
        stages = self.stages()
        n = len(stages) if n_stages < 0 else n_stages
        for part in [*self.stem(), *stages[:n]]:
            params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            for p in params:
                p.requires_grad_(False)


def _load_weights(model: nn.Module, weights: str | None, hub_url: str | None, offline_key: str | None,
                  filter_fn=None) -> None:
    """Apply a weights spec other than 'timm' (which timm.create_model handles)."""
    if weights in (None, "random", "timm"):
        return
    if weights == "offline":
        if offline_key is None:
            raise WeightsError("no offline weights exist for this backbone; use 'timm', 'hub' or a file path")
        path = offline_file(offline_key)
        load_into(model, read_state_dict(path), str(path), filter_fn)
    elif weights == "hub":
        if hub_url is None:
            raise WeightsError("no hub URL is known for this backbone; use 'timm' or a file path")
        try:
            sd = torch.hub.load_state_dict_from_url(hub_url, map_location="cpu", weights_only=True, progress=False)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise WeightsError(f"cannot fetch {hub_url} (offline? put the file in torch.hub's cache "
                               f"or pass its path): {type(e).__name__}") from None
        load_into(model, sd, hub_url, filter_fn)
    else:
        from ..published.releases import RELEASES, load_release

        if str(weights) in RELEASES:  # a published model's backbone (fetched and imported on first use)
            weights = load_release(str(weights))
        load_into(model, read_state_dict(weights), str(weights), filter_fn)


class ViTBackbone(Backbone):
    """A timm VisionTransformer as stages: tokens [B, 1+R+N, C] flow through ``blocks``.

    final_norm: apply the final LayerNorm (SALAD does, BoQ's DINOv2 does not).
    prompts: {mode: scene | deep | adapter, num: 32} adds visual prompt tuning (see models/prompts.py);
    prompted ViTs run all blocks together, so they offer no cacheable frozen prefix.
    pruning: {block: 3, method: weitop | random | evit | tome} drops patch tokens after that block at the
    runtime knob ``keep_ratio`` (see models/pruning.py); Tokens.index then says which grid positions remain.
    stem: a registered CNN backbone spec ({name, weights, crop}) replaces the patch embedding by its
    feature map and a 1x1 projection (timm's ``HybridEmbed``, as in ViT-Hybrid): a hybrid ViT whose
    transformer blocks are unchanged. The stride becomes the CNN's, the preprocessing the CNN's.
    The timm model keeps its native position-embedding grid (518 px for DINOv2; 224 px for a hybrid) and
    interpolates it for any input whose sides are multiples of the patch size (``dynamic_img_size``).
    pos_interp: ``timm`` (timm's resampling: bicubic, antialiased, to the exact grid) or ``dinov2`` (Meta's
    DINOv2 code, which the published DINOv2 VPR models ran with: bicubic without antialiasing at scale factor
    (grid + 0.1) / M, and the stored embedding unchanged when the grid equals it), so that imported models
    reproduce their upstream descriptors.
    """

    has_cls = True

    def __init__(self, timm_name: str, weights: str | None = None, final_norm: bool = True,
                 frozen_blocks: int = 0, hub_url: str | None = None,
                 preprocess: Preprocess = Preprocess(), prompts: dict | None = None, pruning: dict | None = None,
                 stem: dict | None = None, pos_interp: str = "timm", **timm_kwargs) -> None:
        super().__init__()
        if pos_interp not in ("timm", "dinov2"):
            raise ValueError(f"backbone.pos_interp {pos_interp!r} is not 'timm' or 'dinov2'")
        self.pos_interp = pos_interp
        if stem:
            if weights in ("timm", "hub"):
                raise WeightsError(f"a hybrid ViT (backbone.stem) has no {weights} weights: give a saved edgevpr "
                                   "model (or a file) as backbone.weights")
            scfg = dict(stem)
            cnn = BACKBONES.get(scfg.pop("name"))(**scfg)
            if not isinstance(cnn, CNNBackbone):
                raise ValueError(f"backbone.stem: {stem.get('name')!r} is not a CNN backbone")
            timm_kwargs.update(embed_layer=partial(HybridEmbed, backbone=_FeatureMap(cnn.net)), patch_size=1,
                               img_size=224)
            preprocess = cnn.preprocess
        self.vit = timm.create_model(timm_name, pretrained=weights == "timm", num_classes=0,
                                     dynamic_img_size=True, **timm_kwargs)
        from timm.models.vision_transformer import checkpoint_filter_fn

        _load_weights(self.vit, weights, hub_url, None, checkpoint_filter_fn)
        self.final_norm = final_norm
        self.out_dim = self.vit.embed_dim
        pe = self.vit.patch_embed
        self.stride = pe.feat_ratio() if isinstance(pe, HybridEmbed) else pe.patch_size[0]
        self.num_prefix = self.vit.num_prefix_tokens
        self.preprocess = preprocess
        self.prompts: Prompts | None = None
        if prompts:
            self.prompts = Prompts(depth=len(self.vit.blocks), dim=self.out_dim, **prompts)
            self.prompts.attach(self.vit.blocks)
        self.pruner: TokenPruner | None = None
        if pruning:
            if prompts:
                raise ValueError("a ViT takes prompts or token pruning, not both")
            self.pruner = TokenPruner(self.out_dim, **pruning)
            if not 1 <= self.pruner.block < len(self.vit.blocks):
                raise ValueError(f"pruning.block {self.pruner.block} is not between 1 and {len(self.vit.blocks) - 1}")
        self.freeze(frozen_blocks)

    @property
    def cacheable_prefix(self) -> bool:
        return self.prompts is None

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    def stages(self) -> list[nn.Module]:
        return list(self.vit.blocks)

    def stem(self) -> list[nn.Module | nn.Parameter]:
        v = self.vit
        return [v.patch_embed, *(p for p in (v.cls_token, v.reg_token, v.pos_embed) if p is not None)]

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, H, W] -> (tokens [B, 1+R+N, C] with position embeddings, grid (H/p, W/p))."""
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"ViT input {h}x{w} is not a multiple of the patch size {self.stride}")
        v = self.vit
        t = self._dinov2_pos_embed(v.patch_embed(x)) if self.pos_interp == "dinov2" else v._pos_embed(v.patch_embed(x))
        return v.norm_pre(v.patch_drop(t)), (h // self.stride, w // self.stride)

    def _dinov2_pos_embed(self, t: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, H, W, C] -> [B, 1 + HW, C] with CLS and position embeddings as Meta's DINOv2 adds them."""
        v = self.vit
        if v.reg_token is not None or v.no_embed_class or v.pos_embed is None:
            raise ValueError("pos_interp 'dinov2' applies to a DINOv2 layout (CLS + patches, no registers)")
        b, gh, gw, c = t.shape
        pos = v.pos_embed.float()
        m = int(round((pos.shape[1] - 1) ** 0.5))
        patch_pos = pos[:, 1:]
        if (gh, gw) != (m, m):
            grid = patch_pos.reshape(1, m, m, c).permute(0, 3, 1, 2)
            grid = nn.functional.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic",
                                             antialias=False)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, c)
        tokens = torch.cat([v.cls_token.expand(b, -1, -1), t.reshape(b, gh * gw, c)], dim=1)
        return tokens + torch.cat([pos[:, :1], patch_pos], dim=1).to(t.dtype)

    def run_blocks(self, t: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tokens through blocks start..end-1 (pruned after the pruner's block when it is active)."""
        return self._run(t, start, end)[0]

    def finish(self, t: torch.Tensor, grid: tuple[int, int], index: torch.Tensor | None = None) -> Tokens:
        """Final norm (optional) and split into CLS, prompt and patch tokens (registers dropped)."""
        if self.final_norm:
            t = self.vit.norm(t)
        n_p = 0 if self.prompts is None else self.prompts.num
        prompts = t[:, self.num_prefix: self.num_prefix + n_p] if n_p else None
        return Tokens(patches=t[:, self.num_prefix + n_p:], cls=t[:, 0], grid=grid, index=index, prompts=prompts)

    def _run(self, t: torch.Tensor, start: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blocks start..end-1, pruning after the pruner's block when it is crossed -> (tokens, kept index)."""
        index = None
        stop = len(self.vit.blocks) if end is None else end
        for i in range(start, stop):
            blk = self.vit.blocks[i]
            x_in = t
            t = blk(t)
            if self.pruner is not None and i == self.pruner.block - 1:
                t, index = self.pruner(t, self.num_prefix, blk, x_in)
        return t, index

    def forward(self, x: torch.Tensor) -> Tokens:
        t, grid = self.embed(x)
        if self.prompts is not None:
            return self.finish(self.prompts.run(self.vit.blocks, t, self.num_prefix)[0], grid)
        return self._finish_run(t, 0, grid)

    def _finish_run(self, t: torch.Tensor, start: int, grid: tuple[int, int]) -> Tokens:
        t, index = self._run(t, start)
        return self.finish(t, grid, index)

    def forward_prefix(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """-> tokens [B, 1+R+N, C] after block k-1."""
        if self.prompts is not None and k:
            raise ValueError("a prompted ViT runs all blocks together: no frozen prefix to split off")
        if self.pruner is not None and k >= self.pruner.block:
            raise ValueError(f"the frozen prefix must end before the pruning block ({self.pruner.block})")
        return self._run(self.embed(x)[0], 0, k)[0]

    def forward_suffix(self, h: torch.Tensor, k: int, image_size: tuple[int, int]) -> Tokens:
        if self.prompts is not None:
            if k:
                raise ValueError("a prompted ViT runs all blocks together: no frozen prefix to split off")
            return self.finish(self.prompts.run(self.vit.blocks, h, self.num_prefix)[0], self.grid_for(image_size))
        return self._finish_run(h, k, self.grid_for(image_size))


class _FeatureMap(nn.Module):
    """A timm CNN as a hybrid ViT's stem: images [B, 3, H, W] -> its last feature map [B, C, H/s, W/s]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


#: The stride of a CNN's local features for verification (``CNNBackbone.local_map``).
LOCAL_STRIDE = 16


class CNNBackbone(Backbone):
    """A timm CNN's last feature map as tokens.

    crop: modules replaced by the identity, by attribute path: ``layer4`` (ResNet50 after layer3) or
    ``blocks.5`` (a MobileNet/EfficientNet cut after its 5th block: a pretrained small student).
    """

    has_cls = False

    def __init__(self, timm_name: str, weights: str | None = None, frozen_stages: int = 0,
                 crop: tuple[str, ...] = (), offline_key: str | None = None, hub_url: str | None = None,
                 preprocess: Preprocess = Preprocess(), **timm_kwargs) -> None:
        super().__init__()
        self.net = timm.create_model(timm_name, pretrained=weights == "timm", **timm_kwargs)
        _load_weights(self.net, weights, hub_url, offline_key)  # full model incl. classifier: keys match
        for name in crop:
            parent, _, leaf = name.rpartition(".")
            try:
                owner = self.net.get_submodule(parent)
                getattr(owner, leaf)
            except AttributeError as e:
                raise ValueError(f"backbone.crop: {timm_name} has no module {name!r}") from e
            setattr(owner, leaf, nn.Identity())
        self.net.reset_classifier(0)
        self.preprocess = preprocess
        with torch.no_grad():
            was_training = self.net.training
            fmap = self.net.eval().forward_features(torch.zeros(1, 3, 64, 64))
            self.net.train(was_training)
        self.out_dim = fmap.shape[1]
        self.stride = 64 // fmap.shape[-1]
        self.freeze(frozen_stages)

    def stages(self) -> list[nn.Module]:
        n = self.net
        if hasattr(n, "layer1"):  # ResNet
            return [m for m in (n.layer1, n.layer2, n.layer3, n.layer4) if not isinstance(m, nn.Identity)]
        if hasattr(n, "stages"):  # Tiny-ViT
            return list(n.stages)
        # EfficientNet / MobileNetV2 end their feature map with a 1x1 head conv (+ BN); MobileNetV3 applies its
        # conv_head after global pooling (not part of the map), recognisable by its width != num_features.
        conv = getattr(n, "conv_head", None)
        if not isinstance(conv, nn.Conv2d) or conv.out_channels != n.num_features:
            return list(n.blocks)
        head = (getattr(n, a, None) for a in ("conv_head", "bn2"))
        return [*n.blocks, *(m for m in head if isinstance(m, nn.Module) and not isinstance(m, nn.Identity))]

    def stem(self) -> list[nn.Module]:
        n = self.net
        if hasattr(n, "layer1"):
            return [n.conv1, n.bn1]
        if hasattr(n, "patch_embed"):
            return [n.patch_embed]
        return [n.conv_stem, n.bn1]

    def forward(self, x: torch.Tensor) -> Tokens:
        return Tokens.from_map(self.net.forward_features(x))

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        if hasattr(n, "layer1"):
            return n.maxpool(n.act1(n.bn1(n.conv1(x))))
        if hasattr(n, "patch_embed"):
            return n.patch_embed(x)
        return n.bn1(n.conv_stem(x))  # timm's bn1 is BatchNormAct2d: norm + activation

    def local_map(self, x: torch.Tensor) -> Tokens:
        """images [B, 3, H, W] -> the deepest feature map at stride <= ``LOCAL_STRIDE`` as tokens [B, H'*W', C']
        (grid (H', W')): the CNN's own local features for geometric verification. The final map (stride 32, 7x7 at
        224 px) is too coarse for a fundamental matrix; stride 16 keeps a 14x14 grid with the deepest features
        that still have it (EfficientNet-lite0: after block 4, 112-D; ResNet50 cropped after layer3: its final
        map). Runs the stages up to it only."""
        return self.forward_with_local(x, final=False)[1]

    def forward_with_local(self, x: torch.Tensor, final: bool = True) -> tuple[Tokens | None, Tokens]:
        """images [B, 3, H, W] -> (the final map's tokens, as ``forward``; ``local_map``'s) in one pass (an ONNX
        export's two outputs); ``final`` False: stop after the local map (None for the first)."""
        h = local = self._stem_forward(x)
        for stage in self.stages():
            h = stage(h)
            if x.shape[-1] > LOCAL_STRIDE * h.shape[-1]:
                if not final:
                    break
            else:
                local = h
        return (Tokens.from_map(h) if final else None), Tokens.from_map(local)

    def forward_prefix(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """-> feature map [B, C', H', W'] after stage k-1."""
        h = self._stem_forward(x)
        for stage in self.stages()[:k]:
            h = stage(h)
        return h

    def forward_suffix(self, h: torch.Tensor, k: int, image_size: tuple[int, int]) -> Tokens:
        for stage in self.stages()[k:]:
            h = stage(h)
        return Tokens.from_map(h)


BACKBONES: Registry[Backbone] = Registry("backbone")

_DINO_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{0}{1}_pretrain.pth"
_DINO = {"s": "small", "b": "base", "l": "large"}

for _size, _word in _DINO.items():
    for _reg in (False, True):
        _name = f"dinov2_vit{_size}14" + ("_reg" if _reg else "")
        _timm = f"vit_{_word}_patch14_{'reg4_' if _reg else ''}dinov2.lvd142m"
        _url = _DINO_URL.format(f"dinov2_vit{_size}14", "_reg4" if _reg else "")

        def _make(timm_name=_timm, url=_url, **cfg) -> Backbone:
            return ViTBackbone(timm_name, hub_url=url, **cfg)

        BACKBONES.register(_name)(_make)


@BACKBONES.register("vit")
def _vit(timm_name: str = "vit_small_patch16_224", **cfg) -> Backbone:
    """Any timm ViT by name (e.g. a randomly initialised student)."""
    return ViTBackbone(timm_name, **cfg)


for _name in ("5m", "11m", "21m"):

    def _tiny(timm_name=f"tiny_vit_{_name}_224.dist_in22k_ft_in1k", **cfg) -> Backbone:
        return CNNBackbone(timm_name, **cfg)

    BACKBONES.register(f"tinyvit_{_name}")(_tiny)


@BACKBONES.register("resnet50")
def _resnet50(**cfg) -> Backbone:
    """ResNet50 cropped after layer3 (1024 channels, stride 16) as in MixVPR / BoQ; torchvision V1 weights."""
    return CNNBackbone("resnet50.tv_in1k", crop=("layer4",), preprocess=Preprocess(interpolation="bilinear"),
                       hub_url="https://download.pytorch.org/models/resnet50-0676ba61.pth", **cfg)


for _i in range(3):

    def _lite(timm_name=f"tf_efficientnet_lite{_i}.in1k", key=f"efficientnet_lite{_i}", **cfg) -> Backbone:
        return CNNBackbone(timm_name, offline_key=key, preprocess=Preprocess((0.5,) * 3, (0.5,) * 3, "bicubic"), **cfg)

    BACKBONES.register(f"efficientnet_lite{_i}")(_lite)


@BACKBONES.register("mobilenetv2")
def _mobilenetv2(**cfg) -> Backbone:
    """timm mobilenetv2_100 holding torchvision's ImageNet checkpoint (offline package)."""
    return CNNBackbone("mobilenetv2_100", offline_key="mobilenetv2",
                       hub_url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
                       preprocess=Preprocess(interpolation="bilinear"), **cfg)


@BACKBONES.register("cnn")
def _cnn(timm_name: str = "mobilenetv3_small_100", **cfg) -> Backbone:
    """Any timm CNN by name."""
    return CNNBackbone(timm_name, **cfg)
