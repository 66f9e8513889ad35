"""Reading feature matrices saved by featsim or by other tools (``.npy`` / ``.npz``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["load_features"]


def load_features(path, *, key: str | None = None) -> np.ndarray:
    """Loads a feature matrix ``[n, d]`` from a ``.npy`` or ``.npz`` file.

    Args:
      path: file path. ``.npy`` holds one array; ``.npz`` holds named arrays.
      key: array name inside an ``.npz``. Default: the layer of a one-layer file written by
        ``featsim extract``, else ``"features"`` if present, else the only array in the file.

    Returns:
      The array, unchanged (no dtype conversion). Conv maps ``[n, h, w, c]`` are not
      flattened here; metrics expect ``[n, d]``.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: unknown suffix, no/ambiguous array in an ``.npz`` (lists the names),
        a missing ``key``, object arrays, or an array that is not 2-D (names the shape).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            layers = _featsim_layers(archive) if "manifest" in names else []
            if key is None:
                if len(layers) == 1:  # written by `featsim extract` / Features.save
                    key = layers[0]
                elif "features" in names:
                    key = "features"
                elif len(names) == 1:
                    key = names[0]
                else:
                    raise ValueError(
                        f"{path} holds several arrays {names}; say which one holds the features"
                    )
            if key not in names:
                raise ValueError(f"{path} has no array {key!r}; it holds {names}")
            array = archive[key]
    else:
        raise ValueError(f"{path}: expected a .npy or .npz feature file, got {suffix!r}")
    if array.ndim != 2:
        raise ValueError(f"{path}: features must have shape [n, d], got shape {array.shape}")
    return array


def _featsim_layers(archive) -> list[str]:
    """The layer names recorded in a ``featsim extract`` file's manifest."""
    try:
        return list(json.loads(str(archive["manifest"]))["layers"])
    except (ValueError, KeyError, TypeError):
        return []
