from .loop import DEFAULTS, train
from .losses import MultiSimilarity
from .places import PlaceSet, aligned_places, gsv_cities, manifest_places

__all__ = ["DEFAULTS", "MultiSimilarity", "PlaceSet", "aligned_places", "gsv_cities",
           "manifest_places", "train"]
