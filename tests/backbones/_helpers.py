"""Test helpers that need no torch: error measure and fake PyTorch-key state dicts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from flax import traverse_util

# The shared real-data folder sits beside the checkout (../shared/data); override with
# $FEATSIM_SHARED_DATA. Tests that need it skip with a reason when it is absent.
SHARED_DATA = Path(
    os.environ.get("FEATSIM_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data"
)

_FLAX_TO_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_INVERSE_TRANSPOSE = {2: (1, 0), 4: (3, 2, 0, 1)}  # HWIO -> OIHW, [in, out] -> [out, in]


def rel_err(got, want) -> float:
    """max |got - want| / max |want|.

    Elementwise relative error is meaningless where ReLU outputs are (near) zero, so the
    error is normalised by the tensor's largest magnitude instead.
    """
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def torch_key(flax_key: tuple[str, ...]) -> str:
    """("params", "layer1_0", "downsample_0", "kernel") -> "layer1.0.downsample.0.weight"."""
    collection, *modules, leaf = flax_key
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*parts, _FLAX_TO_TORCH_LEAF[(collection, leaf)]])


def fake_torch_state_dict(template, seed: int = 0) -> tuple[dict, dict]:
    """A random PyTorch-layout state dict for ``template`` and the Flax variables it encodes.

    Built by inverting the documented rules, independently of ``featsim.backbones.convert``.
    """
    rng = np.random.default_rng(seed)
    state_dict, expected = {}, {}
    for key, leaf in traverse_util.flatten_dict(dict(template)).items():
        value = rng.normal(size=leaf.shape).astype(np.float32)
        expected[key] = value
        torch_value = value
        if key[-1] == "kernel":
            torch_value = np.ascontiguousarray(value.transpose(_INVERSE_TRANSPOSE[value.ndim]))
        state_dict[torch_key(key)] = torch_value
        if key[-1] == "var":
            prefix = torch_key(key).rsplit(".", 1)[0]
            state_dict[f"{prefix}.num_batches_tracked"] = np.array(7, np.int64)
    return state_dict, traverse_util.unflatten_dict(expected)
