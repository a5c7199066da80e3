from . import pixels, tetra_vit  # noqa: F401  (register the pixels, flatten and tetra_vit parts)
from .aggregators import AGGREGATORS
from .backbones import BACKBONES
from .model import VPRModel, build_model, load_model, preset_config, preset_names, save_model

__all__ = ["AGGREGATORS", "BACKBONES", "VPRModel", "build_model", "load_model", "preset_config",
           "preset_names", "save_model"]
