from .datasets import VPRDataset, open_dataset
from .images import ImageLoadError, list_images, load_image

__all__ = ["ImageLoadError", "VPRDataset", "list_images", "load_image", "open_dataset"]
