"""TensorFlow.js graph models -> Flax variables, with numpy only (no TensorFlow).

A TF.js graph model is a ``model.json`` (``modelTopology``: the GraphDef as JSON;
``weightsManifest``: groups of weight entries ``{name, shape, dtype[, quantization]}`` and the
binary shard files that hold them, in order, little-endian) plus the shards.
:func:`load_tfjs_weights` reads every weight of the manifest into numpy;
:func:`mobilenet_v1_from_tfjs` maps the weights of TF-Hub's ImageNet MobileNetV1 graphs onto
:class:`~featsim.backbones.mobilenet.MobileNetV1` with ``folded_bn=True``, and
:func:`load_tfjs_mobilenet_v1` does both and returns a ready
:class:`~featsim.backbones.registry.Backbone`.

Graph weight names of the TF-Hub MobileNetV1 graphs and their Flax leaves (``M`` is
``module/MobilenetV1``, ``A`` is ``module_apply_default/MobilenetV1/MobilenetV1``, ``L`` is
``Conv2d_0``, ``Conv2d_i_depthwise`` or ``Conv2d_i_pointwise``):

=============================================  ========================  ======================
graph weight                                   Flax leaf                 layout
=============================================  ========================  ======================
``M/L/weights``, ``M/L/depthwise_weights``     ``L/conv/kernel``         HWIO; depthwise
                                                                         ``[3, 3, C, 1]`` ->
                                                                         ``[3, 3, 1, C]``
``A/L/Conv2D_bn_offset``,                      ``L/conv/bias``           as is
``A/L/depthwise_bn_offset``
``M/Logits/Conv2d_1c_1x1/weights``             ``Logits/kernel``         ``[1, 1, C, K]`` ->
                                                                         ``[C, K]``
``M/Logits/Conv2d_1c_1x1/biases``              ``Logits/bias``           as is
=============================================  ========================  ======================

The ``*_bn_offset`` tensors are the BatchNorm the converter folded into each conv (the conv
weights are already scaled). Three graph constants are checked, not loaded:
``module_apply_default/hub_input/Mul/y`` and ``.../Sub/y`` must be 2 and 1 (TF-Hub's
``[0, 1] -> [-1, 1]`` input op, which featsim applies as the ``"[-1,1]"`` preprocessing), and
``.../Logits/global_pool/reduction_indices`` must be ``[1, 2]`` (a spatial mean).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import traverse_util

# Registers the MobileNet family, which load_tfjs_mobilenet_v1 builds.
from featsim.backbones import mobilenet as _mobilenet  # noqa: F401
from featsim.backbones.registry import Backbone, get_backbone

__all__ = [
    "load_tfjs_mobilenet_v1",
    "load_tfjs_weights",
    "mobilenet_v1_from_tfjs",
    "tfjs_model_json",
]

_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_QUANTIZED = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}

_APPLY = "module_apply_default/MobilenetV1/MobilenetV1"
_RULES = (
    (re.compile(r"module/MobilenetV1/(Conv2d_\d+)/weights"), "kernel"),
    (re.compile(r"module/MobilenetV1/(Conv2d_\d+_depthwise)/depthwise_weights"), "dw_kernel"),
    (re.compile(r"module/MobilenetV1/(Conv2d_\d+_pointwise)/weights"), "kernel"),
    (re.compile(rf"{_APPLY}/(Conv2d_\d+(?:_pointwise)?)/Conv2D_bn_offset"), "bias"),
    (re.compile(rf"{_APPLY}/(Conv2d_\d+_depthwise)/depthwise_bn_offset"), "bias"),
    (re.compile(r"module/MobilenetV1/Logits/Conv2d_1c_1x1/weights"), "head_kernel"),
    (re.compile(r"module/MobilenetV1/Logits/Conv2d_1c_1x1/biases"), "head_bias"),
)
# Graph constants that are checked, not loaded: name -> expected value.
_CHECKED = {
    "module_apply_default/hub_input/Mul/y": 2.0,
    "module_apply_default/hub_input/Sub/y": 1.0,
    "module_apply_default/MobilenetV1/Logits/global_pool/reduction_indices": (1, 2),
}


def tfjs_model_json(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/model.json``.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    model_json = path / "model.json" if path.is_dir() else path
    if not model_json.is_file():
        raise FileNotFoundError(f"no TF.js model.json at {model_json}")
    return model_json


def _decode(entry: Mapping, buffer: memoryview, offset: int, source: str):
    name, shape = entry["name"], tuple(int(d) for d in entry.get("shape", ()))
    count = int(np.prod(shape, dtype=np.int64))
    quantization = entry.get("quantization")
    dtype = entry.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ValueError(
            f"{source}: weight {name!r} has dtype {dtype!r}; supported: {sorted(_DTYPES)}"
        )
    stored = _DTYPES[dtype]
    if quantization is not None:
        qdtype = quantization.get("dtype")
        if qdtype not in _QUANTIZED:
            raise ValueError(
                f"{source}: weight {name!r} is quantized as {qdtype!r}; supported: "
                f"{sorted(_QUANTIZED)}"
            )
        stored = _QUANTIZED[qdtype]
    size = count * np.dtype(stored).itemsize
    if offset + size > len(buffer):
        raise ValueError(
            f"{source}: weight {name!r} {shape} needs bytes {offset}..{offset + size} but the "
            f"shards hold {len(buffer)}"
        )
    values = np.frombuffer(buffer, np.dtype(stored).newbyteorder("<"), count, offset)
    if quantization is not None and quantization["dtype"] != "float16":
        # Affine quantization: value = q * scale + min.
        values = values.astype(np.float64) * quantization["scale"] + quantization["min"]
        if dtype == "int32":
            values = np.round(values)
    return name, np.array(values, dtype=_DTYPES[dtype]).reshape(shape), offset + size


def load_tfjs_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every weight of a TF.js model (graph or layers format) into numpy arrays.

    Each manifest group's shards are concatenated in the listed order and its entries read
    back to back. Dtypes: float32, int32, bool; quantized entries (uint8/uint16 affine with
    ``scale`` and ``min``, or float16) are dequantized to their declared dtype.

    Args:
        path: the ``model.json`` file or the folder holding it; shard paths are relative to it.

    Returns:
        ``graph weight name -> array`` in manifest order.

    Raises:
        FileNotFoundError: ``model.json`` or a shard is missing (names the file).
        ValueError: not a TF.js model (no ``weightsManifest``), an unsupported dtype, duplicate
            names, or shards whose size does not match the manifest.

    Example:
        >>> weights = load_tfjs_weights("mobilenet_v1_025_224_tfjs_graph")  # doctest: +SKIP
        >>> weights["module/MobilenetV1/Conv2d_0/weights"].shape
        (3, 3, 3, 8)
    """
    model_json = tfjs_model_json(path)
    try:
        model = json.loads(model_json.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{model_json} is not valid JSON: {err}") from None
    manifest = model.get("weightsManifest") if isinstance(model, dict) else None
    if not isinstance(manifest, list):
        raise ValueError(f"{model_json} has no weightsManifest list; is it a TF.js model?")
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        shards = [model_json.parent / p for p in group.get("paths", ())]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{model_json}: weight shards not found: {', '.join(missing)}")
        buffer = memoryview(b"".join(p.read_bytes() for p in shards))
        source = f"{model_json} (shards {', '.join(p.name for p in shards)})"
        offset = 0
        for entry in group.get("weights", ()):
            name, value, offset = _decode(entry, buffer, offset, source)
            if name in weights:
                raise ValueError(f"{source}: weight {name!r} appears twice in the manifest")
            weights[name] = value
        if offset != len(buffer):
            raise ValueError(
                f"{source}: the manifest describes {offset} bytes but the shards hold {len(buffer)}"
            )
    return weights


def _target(name: str) -> tuple[tuple[str, ...], str] | None:
    for pattern, kind in _RULES:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        if kind.startswith("head"):
            return ("params", "Logits", "kernel" if kind == "head_kernel" else "bias"), kind
        leaf = "bias" if kind == "bias" else "kernel"
        return ("params", match.group(1), "conv", leaf), kind
    return None


def _list(items, limit: int = 12, sep: str = ", ") -> str:
    items = list(items)
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... ({len(items) - limit} more)" if len(items) > limit else "")


def _layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "dw_kernel" and value.ndim == 4:
        # TF depthwise [kh, kw, C, multiplier] -> Flax grouped conv [kh, kw, 1, C * multiplier].
        kh, kw, c, m = value.shape
        return value.reshape(kh, kw, 1, c * m)
    if kind == "head_kernel" and value.ndim == 4 and value.shape[:2] == (1, 1):
        return value[0, 0]  # the 1x1 conv on the pooled vector is a Dense layer
    return value


def mobilenet_v1_from_tfjs(weights: Mapping[str, np.ndarray], template) -> dict:
    """Maps TF-Hub MobileNetV1 graph weights onto Flax variables shaped like ``template``.

    Args:
        weights: from :func:`load_tfjs_weights`.
        template: variables (or ``jax.ShapeDtypeStruct`` tree) of a
            :class:`~featsim.backbones.mobilenet.MobileNetV1` with ``folded_bn=True``, e.g.
            ``get_backbone("mobilenet_v1_025", num_classes=1001,
            folded_bn=True).abstract_variables()``. With no head (``num_classes=None``) the
            graph's classifier is left out.

    Returns:
        ``{"params": ...}`` as nested dicts of numpy arrays in the template's dtypes.

    Raises:
        ValueError: the template has BatchNorm statistics (not ``folded_bn``); a graph constant
            differs from what featsim assumes (input scaling, pooling axes); or, listed
            together, graph weights with no Flax leaf, Flax leaves left unfilled and shape
            mismatches (a wrong ``width_multiplier`` or head size shows up here).
    """
    expected = traverse_util.flatten_dict(dict(template))
    if any(k[0] == "batch_stats" for k in expected):
        raise ValueError(
            "TF.js graphs hold BatchNorm folded into the convs; build the module with "
            "folded_bn=True (its template has batch_stats)"
        )
    has_head = ("params", "Logits", "kernel") in expected
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unmatched, mismatched, constants = [], {}, []
    for name, value in weights.items():
        if name in _CHECKED:
            want = np.asarray(_CHECKED[name])
            if value.shape != want.shape or not np.array_equal(value, want):
                constants.append(f"{name} = {value.tolist()} (featsim assumes {want.tolist()})")
            continue
        found = _target(name)
        if found is None:
            unmatched.append(name)
            continue
        key, kind = found
        if kind.startswith("head") and not has_head:
            continue  # headless module: the classifier is deliberately not loaded
        array = _layout(np.asarray(value), kind)
        if key not in expected:
            unmatched.append(f"{name} -> {'/'.join(key)}")
            continue
        want_shape = tuple(expected[key].shape)
        if array.shape != want_shape:
            mismatched[key] = (
                f"{name} {tuple(value.shape)} -> {'/'.join(key)}: Flax layout {array.shape} but "
                f"the model has {want_shape}"
            )
            continue
        filled[key] = array.astype(expected[key].dtype)

    missing = ["/".join(k) for k in expected if k not in filled and k not in mismatched]
    problems = []
    if constants:
        problems.append("graph constants differ: " + "; ".join(constants))
    if unmatched:
        problems.append("graph weights with no Flax leaf: " + _list(unmatched))
    if missing:
        problems.append("Flax leaves the graph does not fill: " + _list(missing))
    if mismatched:
        problems.append(
            "shape mismatches (wrong width_multiplier or num_classes?): "
            + _list(mismatched.values(), sep="; ")
        )
    if problems:
        raise ValueError(
            "TF.js weights do not match the MobileNetV1 module:\n- " + "\n- ".join(problems)
        )
    return traverse_util.unflatten_dict(filled)


def load_tfjs_mobilenet_v1(
    path: str | os.PathLike,
    *,
    name: str = "mobilenet_v1_025",
    num_classes: int | None = 1001,
    **kwargs,
) -> Backbone:
    """A registered MobileNetV1 with the weights of a TF-Hub TF.js graph model.

    The module is built with ``folded_bn=True`` and TF ``SAME`` padding; its input is the
    registry's preprocessing (``[-1, 1]`` pixels, 224x224 centre crop of the 256 resize).

    Args:
        path: the TF.js ``model.json`` or its folder.
        name: registry name whose width matches the graph (``"mobilenet_v1_025"`` for
            TF-Hub's ``mobilenet_v1_025_224``).
        num_classes: 1001 (the graph's head; logit 0 is "background", ImageNet class ``c`` is
            logit ``c + 1``) or ``None`` for features only.
        **kwargs: further module fields (``dtype``, ``precision``, ...).

    Returns:
        A :class:`~featsim.backbones.registry.Backbone` whose ``variables`` are filled.

    Raises:
        FileNotFoundError: see :func:`load_tfjs_weights`.
        ValueError: see :func:`mobilenet_v1_from_tfjs`.

    Example:
        >>> bb = load_tfjs_mobilenet_v1(
        ...     "/work/shared/data/models/mobilenet_v1_025_224_tfjs_graph"
        ... )  # doctest: +SKIP
        >>> logits, feats = bb.module.apply(bb.variables, bb.preprocessing.normalize(pixels))
    """
    backbone = get_backbone(name, num_classes=num_classes, folded_bn=True, **kwargs)
    weights = load_tfjs_weights(path)
    try:
        variables = mobilenet_v1_from_tfjs(weights, backbone.abstract_variables())
    except ValueError as err:
        raise ValueError(f"{tfjs_model_json(path)} as {name!r}: {err}") from None
    return dataclasses.replace(backbone, variables=variables)
