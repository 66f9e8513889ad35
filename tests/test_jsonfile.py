"""featsim.jsonfile: strict JSON results written atomically."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from featsim.jsonfile import to_jsonable, write_json


@dataclasses.dataclass
class _Row:
    path: Path
    value: float


def test_write_json_is_strict_and_atomic(tmp_path):
    value = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "arr": np.arange(2),
             "f32": np.float32(0.5), "row": _Row(Path("a/b"), math.nan), 3: (1, 2)}
    path = write_json(tmp_path / "deep" / "j.json", value)
    assert json.loads(path.read_text()) == {
        "nan": None, "inf": "inf", "ninf": "-inf", "arr": [0, 1], "f32": 0.5,
        "row": {"path": "a/b", "value": None}, "3": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["j.json"]  # no temporary left
    assert to_jsonable(np.float64(math.nan)) is None
