"""Which variables train, at which learning rate: freezing through optax, stages from the graph.

Every variable leaf gets a *stage*: the first tapped feature (``stem``, ``stage1``, ...,
in network order) whose value depends on it, found by a dependency pass over the model's
jaxpr (exact, no per-family tables). Leaves that feed only the logits (or the auxiliary
regression output ``features[AUX_KEY]``, :mod:`featsim.train.heads`) are the head.
Strategies then label leaves ``"head"``, ``"body"`` or ``"frozen"`` and
:func:`featsim.train.optim.make_optimizer` gives each label its own optax transform, with
``optax.set_to_zero()`` for ``"frozen"`` (so frozen parameters stay bit-identical).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "AUX_KEY",
    "HEAD",
    "leaf_stages",
    "meanvar_init",
    "strategy_labels",
    "tap_order",
]

HEAD = "logits"  # leaves that feed only the logits: the classifier head
# The auxiliary regression head's output (featsim.train.heads), returned in the features dict:
# a head output, not a tap, so leaves that feed only it are head too.
AUX_KEY = "aux_pred"


def tap_order(names) -> list[str]:
    """Tapped features in network order: stem, stage1..N (numeric), others, pre_logits."""

    def key(name):
        if name == "stem":
            return (0, 0, name)
        match = re.fullmatch(r"stage(\d+)", name)
        if match:
            return (1, int(match.group(1)), name)
        return (3, 0, name) if name == "pre_logits" else (2, 0, name)

    return sorted(names, key=key)


def _dependencies(jaxpr, n_inputs: int) -> list[set[int]]:
    """For each output of ``jaxpr``, the indices of the first ``n_inputs`` inputs it reads."""
    deps: dict = {}
    for i, var in enumerate(jaxpr.invars[:n_inputs]):
        deps[var] = {i}
    for eqn in jaxpr.eqns:
        reads: set[int] = set()
        for var in eqn.invars:
            if type(var).__name__ != "Literal":
                reads |= deps.get(var, set())
        for var in eqn.outvars:
            deps[var] = reads
    return [set() if type(v).__name__ == "Literal" else deps.get(v, set())
            for v in jaxpr.outvars]


def leaf_stages(module, variables, input_shape) -> dict[tuple[str, ...], str]:
    """Flattened variable path -> the first tap that depends on it (or :data:`HEAD`).

    Args:
        module: a backbone module returning ``(logits, features)``.
        variables: its variables (arrays or ``ShapeDtypeStruct``; only shapes are used).
        input_shape: an NHWC input shape to trace with (a small one is enough).
    """
    flat = traverse_util.flatten_dict(variables)
    paths = list(flat)

    def outputs(leaves, x):
        logits, feats = module.apply(traverse_util.unflatten_dict(dict(zip(paths, leaves,
                                                                           strict=True))),
                                     x, train=False)
        return {k: v for k, v in feats.items() if k != AUX_KEY}, logits

    shapes = [jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for v in flat.values()]
    closed, out_shape = jax.make_jaxpr(outputs, return_shape=True)(
        shapes, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    feats_shape = out_shape[0]
    tap_names = sorted(feats_shape)  # jax flattens dicts in sorted key order
    n_tap_leaves = [len(jax.tree.leaves(feats_shape[k])) for k in tap_names]
    deps = _dependencies(closed.jaxpr, len(paths))
    per_tap, start = {}, 0
    for name, count in zip(tap_names, n_tap_leaves, strict=True):
        per_tap[name] = set().union(*deps[start:start + count])
        start += count
    stages = {}
    for name in tap_order(tap_names):
        for i in per_tap[name]:
            stages.setdefault(paths[i], name)
    for path in paths:
        stages.setdefault(path, HEAD)
    return stages


def strategy_labels(stages: dict, strategy: str, *, partial_stages: int = 1) -> dict:
    """Flattened path -> ``"head"``, ``"body"`` or ``"frozen"`` for a strategy.

    ``linear`` freezes every non-head leaf; ``partial`` keeps the last ``partial_stages``
    stages (in network order, ``pre_logits`` excluded: pooling has no variables) trainable;
    ``finetune`` trains the body at its own rate; ``scratch`` and ``meanvar`` train
    everything at the head's rate.
    """
    ordered = [s for s in tap_order(set(stages.values()) - {HEAD}) if s != "pre_logits"]
    if strategy == "partial" and not 1 <= partial_stages <= len(ordered):
        raise ValueError(f"partial_stages must be in [1, {len(ordered)}] (stages: {ordered}), "
                         f"got {partial_stages}")
    trainable = {
        "linear": set(),
        "partial": set(ordered[-partial_stages:]),
        "finetune": set(ordered),
    }
    if strategy not in (*trainable, "scratch", "meanvar"):
        raise ValueError(f"unknown strategy {strategy!r}")
    labels = {}
    for path, stage in stages.items():
        if stage == "pre_logits":  # e.g. DenseNet's final norm: part of the last stage
            stage = ordered[-1] if ordered else stage
        if stage == HEAD or strategy in ("scratch", "meanvar"):
            labels[path] = "head"
        else:
            labels[path] = "body" if stage in trainable[strategy] else "frozen"
    return labels


def meanvar_init(pretrained_params, rng: jax.Array):
    """Raghu et al. 2019 ('Transfusion') Mean Var init: every kernel (ndim >= 2) drawn
    i.i.d. from N(mean, var) of its own pretrained values; 1-D parameters (biases,
    BatchNorm scale and shift) keep their pretrained values."""
    flat = traverse_util.flatten_dict(pretrained_params)
    keys = jax.random.split(rng, len(flat))
    out = {}
    for key, (path, value) in zip(keys, sorted(flat.items()), strict=True):
        value = np.asarray(value)
        if value.ndim >= 2:
            draw = jax.random.normal(key, value.shape, jnp.float32)
            out[path] = np.asarray(value.mean() + value.std() * draw, value.dtype)
        else:
            out[path] = value
    return traverse_util.unflatten_dict(out)
