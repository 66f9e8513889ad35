"""Reading feature matrices saved by featsim or by other tools (``.npy`` / ``.npz``)."""

from __future__ import annotations

import json
import zipfile
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
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a feature file: give a .npy or .npz file "
                         "(`featsim extract` writes one from images)")
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _read(path, lambda: np.load(path, allow_pickle=False))
    elif suffix == ".npz":
        with _read(path, lambda: np.load(path, allow_pickle=False)) as archive:
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
                        f"{path} holds several arrays {names}; say which one holds the "
                        "features with --key NAME (library: key=NAME)")
            if key not in names:
                raise ValueError(f"{path} has no array {key!r}; it holds {names} "
                                 "(choose one with --key NAME)")
            array = _read(path, lambda: archive[key])
    else:
        raise ValueError(f"{path}: expected a .npy or .npz feature file, got {suffix!r}")
    if array.ndim != 2:
        raise ValueError(f"{path}: features must have shape [n, d], got shape {array.shape}")
    return array


_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK\x03\x04"}


def _read(path: Path, load):
    """Runs ``load`` after checking the file's magic bytes; every error names the file."""
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(_MAGIC[suffix]):
        what = ("pickled Python data (featsim does not unpickle files)"
                if head.startswith(b"\x80") else
                "empty" if not head else "text" if _is_text(head) else "another format")
        raise ValueError(f"{path} is not a {suffix} array file: its content is {what}. "
                         f"Save features with np.save / np.savez (float arrays [n, d]) or "
                         "`featsim extract`")
    try:
        return load()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable {suffix} array file ({err})") from None


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _featsim_layers(archive) -> list[str]:
    """The layer names recorded in a ``featsim extract`` file's manifest."""
    try:
        return list(json.loads(str(archive["manifest"]))["layers"])
    except (ValueError, KeyError, TypeError):
        return []
