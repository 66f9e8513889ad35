"""PyTorch state dicts -> Flax variables: the generic part every family shares.

A state dict is a mapping ``"layer1.0.conv1.weight" -> array``. Each family module gives a
:class:`KeyMapping` (which Flax module a PyTorch module prefix becomes, which prefixes form
the classifier head); this module does the rest: leaf names, layouts, dtypes and the
bookkeeping that guarantees every checkpoint key is consumed and every Flax leaf is filled.

Leaf rules (the Flax module's own variables decide which applies):

=====================  ===========================  ======================================
PyTorch leaf           Flax leaf                    layout
=====================  ===========================  ======================================
conv ``weight``        ``params/kernel`` (4-D)      OIHW -> HWIO (``transpose(2, 3, 1, 0)``)
linear ``weight``      ``params/kernel`` (2-D)      ``[out, in]`` -> ``[in, out]``
``bias``               ``params/bias``              as is
BN ``weight``          ``params/scale``             as is
BN ``running_mean``    ``batch_stats/mean``         as is
BN ``running_var``     ``batch_stats/var``          as is
``num_batches_tracked``  (ignored)
=====================  ===========================  ======================================

No torch import is needed: values only need ``numpy.asarray``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "IGNORED_LEAVES",
    "KeyMapping",
    "abstract_variables",
    "check_variables",
    "convert_state_dict",
    "torch_module_path",
]

IGNORED_LEAVES = frozenset({"num_batches_tracked"})
_BN_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_PARAM_LEAVES = {"weight": ("params", "kernel"), "bias": ("params", "bias")}
# PyTorch weight layout -> Flax kernel layout, by rank.
_TRANSPOSES = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0)}
_INDEX = re.compile(r"\d+")


def torch_module_path(prefix: str) -> tuple[str, ...]:
    """Default rule: ``"layer1.0.downsample.0"`` -> ``("layer1_0", "downsample_0")``.

    Dotted names become nested Flax modules; a ``Sequential``/``ModuleList`` index is joined
    to the name before it, so Flax modules get names like ``layer1_0``.
    """
    path: list[str] = []
    for part in prefix.split(".") if prefix else ():
        if _INDEX.fullmatch(part) and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """How one family's PyTorch module names map onto its Flax module paths.

    Attributes:
        module_path: PyTorch module prefix (``"layer1.0.conv1"``) -> Flax module path
            (``("layer1_0", "conv1")``).
        head: PyTorch module prefixes that form the classifier (``("fc",)`` for ResNet);
            ``skip_head=True`` leaves them out of the conversion.
    """

    module_path: Callable[[str], tuple[str, ...]] = torch_module_path
    head: tuple[str, ...] = ()

    def is_head(self, torch_prefix: str) -> bool:
        return any(torch_prefix == h or torch_prefix.startswith(h + ".") for h in self.head)

    def head_paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple(self.module_path(h) for h in self.head)


def abstract_variables(module, input_shape: tuple[int, ...], *, dtype=jnp.float32):
    """Shapes and dtypes of ``module.init`` (a ``jax.ShapeDtypeStruct`` tree), without compute.

    Args:
        module: a Flax module whose ``__call__(x, *, train=False)`` takes one input.
        input_shape: e.g. ``(1, 224, 224, 3)``.
    """
    x = jax.ShapeDtypeStruct(input_shape, dtype)
    return jax.eval_shape(lambda rng, x: module.init(rng, x, train=False), jax.random.key(0), x)


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(_to_dict(tree))


def _to_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _fmt(key: tuple[str, ...]) -> str:
    return "/".join(key)


def _list(items, limit: int = 20, sep: str = ", ") -> str:
    items = list(items)
    shown = sep.join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _is_concrete(leaf) -> bool:
    return not isinstance(leaf, jax.ShapeDtypeStruct)


def convert_state_dict(
    state_dict: Mapping[str, Any],
    template,
    *,
    mapping: KeyMapping = KeyMapping(),
    skip_head: bool = False,
) -> dict:
    """Converts a PyTorch-key state dict into Flax variables shaped like ``template``.

    Args:
        state_dict: ``name -> array`` (numpy arrays, or anything ``numpy.asarray`` takes,
            e.g. CPU torch tensors), PyTorch NCHW/OIHW layouts.
        template: the Flax variables to fill: ``{"params": ..., "batch_stats": ...}`` of
            arrays (``module.init``) or of ``jax.ShapeDtypeStruct`` (:func:`abstract_variables`).
            Converted values take the template's dtypes.
        mapping: the family's :class:`KeyMapping`.
        skip_head: load everything except the classifier: checkpoint keys under
            ``mapping.head`` are not used, and the model's head leaves are copied from
            ``template``, which must then hold initialised arrays (from ``module.init``) —
            unless the model has no head (``num_classes=None``).

    Returns:
        A nested dict of numpy arrays with exactly the template's leaves.

    Raises:
        ValueError: listing every checkpoint key that matched no Flax leaf, every Flax leaf
            left unfilled, and every shape mismatch (key, checkpoint shape, model shape);
            also when ``skip_head`` needs initial head values that ``template`` lacks.

    Example:
        >>> template = abstract_variables(model, (1, 224, 224, 3))  # doctest: +SKIP
        >>> variables = convert_state_dict(sd, template, mapping=resnet.TORCHVISION_KEYS)
    """
    expected = _flat(template)
    head_paths = mapping.head_paths() if skip_head else ()
    filled: dict[tuple[str, ...], np.ndarray] = {}
    sources: dict[tuple[str, ...], str] = {}
    unmatched, mismatched, duplicated = [], [], []

    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in IGNORED_LEAVES:
            continue
        if skip_head and mapping.is_head(prefix):
            continue
        module = mapping.module_path(prefix)
        is_bn = ("params", *module, "scale") in expected
        target_leaf = (_BN_LEAVES if is_bn else _PARAM_LEAVES).get(leaf)
        target = None if target_leaf is None else (target_leaf[0], *module, target_leaf[1])
        if target not in expected:
            unmatched.append(key)
            continue
        if target in filled:
            duplicated.append(f"{key} and {sources[target]} -> {_fmt(target)}")
            continue
        array = np.asarray(value)
        if target[-1] == "kernel" and array.ndim in _TRANSPOSES:
            array = array.transpose(_TRANSPOSES[array.ndim])
        want = expected[target]
        if array.shape != tuple(want.shape):
            mismatched.append(
                f"{key} -> {_fmt(target)}: checkpoint {tuple(np.shape(value))} "
                f"(Flax layout {array.shape}) but the model has {tuple(want.shape)}"
            )
            continue
        filled[target] = array.astype(want.dtype)
        sources[target] = key

    def in_head(path: tuple[str, ...]) -> bool:
        return any(path[1 : 1 + len(h)] == h for h in head_paths)

    kept_head = {k: v for k, v in expected.items() if in_head(k) and k not in filled}
    abstract_head = [_fmt(k) for k, v in kept_head.items() if not _is_concrete(v)]
    for k, v in kept_head.items():
        if _is_concrete(v):
            filled[k] = np.asarray(v)
    missing = [_fmt(k) for k in expected if k not in filled and k not in kept_head]

    problems = []
    if unmatched:
        problems.append(f"checkpoint keys with no Flax leaf: {_list(unmatched)}")
    if missing:
        problems.append(f"Flax leaves the checkpoint does not fill: {_list(missing)}")
    if mismatched:
        problems.append("shape mismatches: " + _list(mismatched, sep="; "))
    if duplicated:
        problems.append("keys mapping to the same Flax leaf: " + "; ".join(duplicated))
    if abstract_head:
        problems.append(
            "skip_head=True copies the new head from `template`, which must hold initialised "
            f"arrays (module.init), but these are abstract: {_list(abstract_head)}"
        )
    if problems:
        head_keys = [k for k in (*unmatched, *mismatched) if mapping.is_head(k.split(" ")[0])]
        hint = ""
        if head_keys and not skip_head:
            hint = (
                f"\nThe classifier head ({', '.join(mapping.head)}) differs from the "
                "checkpoint's; pass skip_head=True with initialised variables to load "
                "everything except the head (fine-tuning with a new head)."
            )
        raise ValueError("state dict does not match the model:\n- " + "\n- ".join(problems) + hint)
    return traverse_util.unflatten_dict(filled)


def check_variables(variables, template) -> None:
    """Checks that ``variables`` has exactly ``template``'s leaves, shapes and dtypes.

    Raises:
        ValueError: listing missing and unexpected leaves and shape/dtype mismatches.
    """
    got, want = _flat(variables), _flat(template)
    problems = []
    missing = [_fmt(k) for k in want if k not in got]
    unexpected = [_fmt(k) for k in got if k not in want]
    if missing:
        problems.append(f"missing leaves: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected leaves: {_list(unexpected)}")
    bad = []
    for k in want:
        if k not in got:
            continue
        leaf = got[k] if hasattr(got[k], "dtype") else np.asarray(got[k])
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        want_shape, want_dtype = tuple(want[k].shape), np.dtype(want[k].dtype)
        if (shape, dtype) != (want_shape, want_dtype):
            bad.append(f"{_fmt(k)}: {shape} {dtype} but the model has {want_shape} {want_dtype}")
    if bad:
        problems.append("shape/dtype mismatches: " + _list(bad, sep="; "))
    if problems:
        raise ValueError("variables do not match the model:\n- " + "\n- ".join(problems))
