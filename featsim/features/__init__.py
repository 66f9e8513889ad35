"""Feature sets: loading saved feature arrays (extraction from images comes with the pipeline)."""

from featsim.features.io import load_features as load_features

__all__ = ["load_features"]
