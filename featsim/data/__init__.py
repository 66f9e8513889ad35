"""Data sources (folders, .npz, tfds, wheel samples), image decoding and preprocessing."""

from featsim import _guard  # noqa: F401  (first: names a namespace-package import)
from featsim.data.decode import MODE_RULE, MODE_RULES, ImageDecodeError, load_rgb, to_rgb
from featsim.data.embedded import EMBEDDED_SOURCES, embedded_source
from featsim.data.items import Item, Source
from featsim.data.sources import IMAGE_EXTENSIONS, open_source
from featsim.data.transforms import NORMALIZATIONS, Transform

__all__ = [
    "EMBEDDED_SOURCES",
    "IMAGE_EXTENSIONS",
    "MODE_RULE",
    "MODE_RULES",
    "NORMALIZATIONS",
    "ImageDecodeError",
    "Item",
    "Source",
    "Transform",
    "embedded_source",
    "load_rgb",
    "open_source",
    "to_rgb",
]
