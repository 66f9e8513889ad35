"""The train state and the pure step functions (Flax ImageNet example style).

``make_train_step(...)`` and ``make_eval_step(...)`` close over what is static for a run
(the module, which leaves are frozen, the loss, augmentation, pixel scaling) and return
pure functions ``train_step(state, batch, key) -> (state, metrics)`` and
``eval_step(state, batch) -> metrics``. With ``axis_name`` set they run under ``jax.pmap``
(:func:`featsim.parallel.pmap`): the loss is normalised by the *global* number of real
examples and gradients are summed with ``lax.psum``, BatchNorm statistics are synchronised
by the modules' ``bn_axis_name``, so a step over 2 devices equals one step over 1 device on
the same global batch. Padded examples (``mask`` 0) contribute nothing.

With an auxiliary regression head (``StepConfig.aux_targets > 0``, :mod:`featsim.train.heads`)
the per-example loss is :func:`~featsim.train.losses.multitask_example_losses` (class-weighted
cross-entropy + ``aux_weight`` x squared error), under the same global normaliser, and
``batch["targets"]`` ``[b, T]`` is required.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct, traverse_util
from flax.training import train_state
from jax import lax

from featsim.train.augment import AugmentConfig, apply_params, sample_params
from featsim.train.losses import multitask_example_losses
from featsim.train.losses import weighted_example_losses as example_losses
from featsim.train.strategies import AUX_KEY

__all__ = ["TrainState", "make_eval_step", "make_train_step", "normalize_images",
           "probabilities"]


class TrainState(train_state.TrainState):
    """``params``, ``opt_state``, ``step`` plus the BatchNorm statistics."""

    batch_stats: Any = None


def probabilities(logits):
    """P(class 1) ``[n]`` for a sigmoid head, softmax ``[n, C]`` otherwise."""
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits[:, 0])
    return jax.nn.softmax(logits, axis=-1)


def _global_sum(x, axis_name):
    return lax.psum(x, axis_name) if axis_name else x


def _select(tree, flags, new, old):
    """Leaves of ``new`` where ``flags`` (flattened path -> bool) is True, else ``old``."""
    if not flags:
        return new
    flat_new, flat_old = traverse_util.flatten_dict(new), traverse_util.flatten_dict(old)
    return traverse_util.unflatten_dict(
        {k: (flat_new[k] if flags.get(k, True) else flat_old[k]) for k in flat_new})


class StepConfig(struct.PyTreeNode):
    """Static ingredients of the steps (hashable, not traced)."""

    module: Any = struct.field(pytree_node=False)
    frozen_params: frozenset = struct.field(pytree_node=False, default=frozenset())
    frozen_stats: frozenset = struct.field(pytree_node=False, default=frozenset())
    body_train_mode: bool = struct.field(pytree_node=False, default=True)
    augment: AugmentConfig = struct.field(pytree_node=False, default=None)
    scale: tuple = struct.field(pytree_node=False, default=(1.0, 1.0, 1.0))
    offset: tuple = struct.field(pytree_node=False, default=(0.0, 0.0, 0.0))
    axis_name: str | None = struct.field(pytree_node=False, default=None)
    aux_targets: int = struct.field(pytree_node=False, default=0)
    aux_weight: float = struct.field(pytree_node=False, default=0.0)
    compute_dtype: str = struct.field(pytree_node=False, default="float32")


def _apply(cfg: StepConfig, apply_fn, variables, x, **kwargs):
    """``apply_fn`` with its floating outputs in float32 (with ``compute_dtype`` bfloat16
    the module computes in bfloat16, :func:`featsim.train.loop.create_train_state`; the loss
    and the metrics are float32 either way)."""
    out = apply_fn(variables, x, **kwargs)
    if cfg.compute_dtype == "float32":
        return out
    return jax.tree.map(lambda v: v.astype(jnp.float32)
                        if jnp.issubdtype(v.dtype, jnp.floating) else v, out)


def _example_losses(cfg: StepConfig, logits, features, batch, class_weights):
    """Per-example total loss ``[b]`` and, with an auxiliary head, the extra sums to report:
    ``ce_sum`` (class-weighted cross-entropy) and ``aux_err_sum`` (mean squared error over
    the T targets), both masked and local."""
    if not cfg.aux_targets:
        return example_losses(logits, batch["labels"], class_weights), {}
    total, ce, err = multitask_example_losses(logits, batch["labels"], features[AUX_KEY],
                                              batch["targets"], class_weights,
                                              cfg.aux_weight)
    mask = batch["mask"]
    return total, {"ce_sum": jnp.sum(ce * mask), "aux_err_sum": jnp.sum(err * mask)}


def normalize_images(images, cfg: StepConfig):
    """Raw pixels ``[b, S, S, 3]`` on [0, 255] -> the network's input (``x * scale +
    offset``, float32): what the eval step feeds the model, and the train step after
    augmentation."""
    x = images.astype(jnp.float32)
    return x * jnp.asarray(cfg.scale, jnp.float32) + jnp.asarray(cfg.offset, jnp.float32)


def _augment(key, images, cfg: StepConfig):
    """Per-example augmentation keyed by the example's *global* row in the batch, so the
    result does not depend on how many devices share the batch."""
    first = lax.axis_index(cfg.axis_name) * images.shape[0] if cfg.axis_name else 0
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(images.shape[0]))

    def one(k, image):
        params = sample_params(k, cfg.augment, image_size=image.shape[:2])
        return apply_params(image, params, cfg.augment, output_size=image.shape[0])

    return jax.vmap(one)(keys, images)


def make_train_step(cfg: StepConfig, class_weights):
    """``train_step(state, batch, key) -> (state, metrics)``.

    ``batch``: ``images [b, S, S, 3]`` on [0, 255], ``labels [b]`` int, ``mask [b]``
    (and ``targets [b, T]`` float with an auxiliary head).
    ``metrics``: ``loss_sum``, ``count`` (global) and per-example ``probs`` (local rows);
    with an auxiliary head also ``ce_sum`` and ``aux_err_sum`` (global).
    """
    class_weights = jnp.asarray(class_weights, jnp.float32)

    def stop_frozen(params):
        if not cfg.frozen_params:
            return params
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {k: lax.stop_gradient(v) if k in cfg.frozen_params else v for k, v in flat.items()})

    def train_step(state: TrainState, batch, key):
        aug_key, dropout_key = jax.random.split(key)
        if cfg.axis_name:
            dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(cfg.axis_name))
        images = batch["images"].astype(jnp.float32)
        if cfg.augment is not None and cfg.augment.enabled:
            images = _augment(aug_key, images, cfg)
        x = normalize_images(images, cfg)
        mask = batch["mask"]
        count = _global_sum(mask.sum(), cfg.axis_name)

        def loss_fn(params):
            variables = {"params": stop_frozen(params)}
            if state.batch_stats is not None:
                variables["batch_stats"] = state.batch_stats
            if cfg.body_train_mode:
                (logits, feats), updates = _apply(
                    cfg, state.apply_fn, variables, x, train=True, mutable=["batch_stats"],
                    rngs={"dropout": dropout_key})
                stats = updates.get("batch_stats", state.batch_stats)
            else:
                logits, feats = _apply(cfg, state.apply_fn, variables, x, train=False)
                stats = state.batch_stats
            losses, extra = _example_losses(cfg, logits, feats, batch, class_weights)
            return jnp.sum(losses * mask) / jnp.maximum(count, 1.0), (logits, stats, extra)

        (loss, (logits, stats, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        grads = _global_sum(grads, cfg.axis_name)
        loss = _global_sum(loss, cfg.axis_name)
        if stats is not None and cfg.frozen_stats:
            stats = _select(stats, {k: k not in cfg.frozen_stats
                                    for k in traverse_util.flatten_dict(stats)},
                            stats, state.batch_stats)
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        extra = {k: _global_sum(v, cfg.axis_name) for k, v in extra.items()}
        return state, {"loss_sum": loss * count, "count": count, "probs": probabilities(logits),
                       **extra}

    return train_step


def make_eval_step(cfg: StepConfig, class_weights):
    """``eval_step(state, batch) -> metrics`` in inference mode (running BatchNorm stats)."""
    class_weights = jnp.asarray(class_weights, jnp.float32)

    def eval_step(state: TrainState, batch):
        variables = {"params": state.params}
        if state.batch_stats is not None:
            variables["batch_stats"] = state.batch_stats
        logits, feats = _apply(cfg, state.apply_fn, variables,
                               normalize_images(batch["images"], cfg), train=False)
        losses, extra = _example_losses(cfg, logits, feats, batch, class_weights)
        losses = losses * batch["mask"]
        return {"loss_sum": _global_sum(losses.sum(), cfg.axis_name),
                "count": _global_sum(batch["mask"].sum(), cfg.axis_name),
                "probs": probabilities(logits),
                **{k: _global_sum(v, cfg.axis_name) for k, v in extra.items()}}

    return eval_step
