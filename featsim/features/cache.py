"""On-disk feature cache keyed by content, written in atomic chunks so killed runs resume.

Layout: ``<root>/<run key>/<chunk key>.npz`` where

* the *run key* hashes everything that changes the numbers except the images: backbone,
  weights (SHA-256 of the loaded variables), layers, pooling, the preprocessing policy
  (:meth:`featsim.data.transforms.Transform.to_dict`), batch size, the device set and the
  cache format;
* the *chunk key* hashes the SHA-256 of each image's bytes in the chunk (names do not enter
  it: renamed or moved files still hit, an edited file misses).

A chunk is a fixed run of ``chunk_size`` consecutive items, always computed in the same
batches, so a resumed run recomputes exactly the chunks that are missing and its result is
bit-identical to an uninterrupted run. Each chunk is written to a temporary file in the same
folder and moved into place with ``os.replace``: a reader never sees half a chunk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["CACHE_FORMAT", "Chunk", "FeatureCache", "default_cache_dir"]

CACHE_FORMAT = 2  # 2: chunks keep each image's original size


def default_cache_dir() -> Path:
    """``$FEATSIM_CACHE_DIR``, default ``~/.cache/featsim/features``."""
    env = os.environ.get("FEATSIM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "featsim" / "features"


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class Chunk:
    """Features of one chunk of items.

    Attributes:
        hashes: content SHA-256 of each item in the chunk, in order.
        ok: bool ``[k]``: the item was decoded (False: skipped, see ``errors``).
        errors: one message per item, empty where ``ok``.
        layers: layer name -> float32 ``[ok.sum(), d]``.
        sizes: int ``[k, 2]``: each image's (height, width) before resizing; 0 where not
            ``ok`` (reported when far below the backbone's input size).
    """

    hashes: tuple[str, ...]
    ok: np.ndarray
    errors: tuple[str, ...]
    layers: Mapping[str, np.ndarray]
    sizes: np.ndarray


class FeatureCache:
    """Chunks of features for one run key under ``root``.

    Args:
        root: cache folder (created on first write).
        key_fields: JSON-able description of everything but the images (see module doc).
    """

    def __init__(self, root: str | os.PathLike, key_fields: Mapping):
        self.key_fields = dict(key_fields, cache_format=CACHE_FORMAT)
        self.key = _sha256_json(self.key_fields)
        self.dir = Path(root) / self.key[:24]

    @staticmethod
    def chunk_key(hashes: Sequence[str]) -> str:
        return hashlib.sha256("\n".join(hashes).encode()).hexdigest()

    def path(self, hashes: Sequence[str]) -> Path:
        return self.dir / f"{self.chunk_key(hashes)[:32]}.npz"

    def load(self, hashes: Sequence[str], layers: Sequence[str]) -> Chunk | None:
        """The cached chunk for these item hashes, or None (missing or unreadable)."""
        path = self.path(hashes)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = tuple(str(h) for h in z["hashes"])
                if stored != tuple(hashes):
                    raise ValueError("item hashes differ from the chunk key's")
                chunk = Chunk(
                    hashes=stored,
                    ok=z["ok"].astype(bool),
                    errors=tuple(str(e) for e in z["errors"]),
                    layers={name: z[f"layer/{name}"] for name in layers},
                    sizes=z["sizes"],
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            warnings.warn(f"ignoring unreadable feature cache chunk {path}: {err}", stacklevel=2)
            return None
        return chunk

    def save(self, chunk: Chunk) -> Path:
        """Writes ``chunk`` atomically; returns its path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "key.json"
        if not manifest.exists():
            _atomic_write(manifest, lambda f: f.write(
                json.dumps(self.key_fields, indent=2, sort_keys=True).encode()))
        arrays = {
            "hashes": np.array(chunk.hashes, dtype=np.str_),
            "ok": np.asarray(chunk.ok, bool),
            "errors": np.array(chunk.errors, dtype=np.str_),
            "sizes": np.asarray(chunk.sizes, np.int64).reshape(-1, 2),
        }
        arrays.update({f"layer/{k}": np.asarray(v) for k, v in chunk.layers.items()})
        path = self.path(chunk.hashes)
        _atomic_write(path, lambda f: np.savez(f, **arrays))
        return path


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
