"""Feature sets: extraction from images (cached, resumable) and loading saved arrays."""

from featsim import _guard  # noqa: F401  (first: names a namespace-package import)
from featsim.features.cache import FeatureCache, default_cache_dir
from featsim.features.extract import (
    POOLING,
    Features,
    SkippedItem,
    extract_features,
    feature_layers,
)
from featsim.features.io import load_features

__all__ = [
    "POOLING",
    "FeatureCache",
    "Features",
    "SkippedItem",
    "default_cache_dir",
    "extract_features",
    "feature_layers",
    "load_features",
]
