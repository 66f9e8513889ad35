"""JSON results files: strict JSON (no NaN tokens) written atomically."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["to_jsonable", "write_json"]


def to_jsonable(value):
    """Dataclasses, mappings, sequences, paths and numpy values as plain JSON values; NaN
    becomes None and +-inf the strings ``"inf"``/``"-inf"`` (strict JSON has neither)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return to_jsonable(value.tolist())
    return value


def write_json(path: str | os.PathLike, value) -> Path:
    """Writes ``to_jsonable(value)`` as indented JSON via a temporary file and
    ``os.replace`` (a reader never sees half a file); folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path
