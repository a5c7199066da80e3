"""edgevpr: visual place recognition for robots, drones and phones."""

from .models import VPRModel, build_model, load_model, save_model
from .tokens import Tokens

__version__ = "0.1.0"
__all__ = ["Tokens", "VPRModel", "build_model", "load_model", "save_model", "__version__"]
