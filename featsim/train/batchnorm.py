"""``recompute_batch_stats``: BatchNorm running statistics recomputed over a data set.

A BatchNorm's running mean/variance is an exponential moving average with weight
``momentum`` on the old value (Flax convention; 0.99 for EfficientNet, 0.9 for torchvision
ports). After few training steps from a random init the average still sits near its
initial value (mean 0, variance 1): ``0.99 ** 32 = 0.72`` of it after 32 steps. In training
mode each batch is normalised by its own statistics, so the training loss looks fine, but
in inference mode every layer is normalised by the wrong statistics and the features can
saturate (e.g. constant across images).

:func:`recompute_batch_stats` replaces every running statistic by its population value over
the given batches, as ``torch.optim.swa_utils.update_bn`` (``momentum=None``) does:

* each batch runs through the network in *training* mode, so every BatchNorm sees the
  outputs of the layers before it normalised by the *batch's* statistics (not by the new
  running ones);
* the recomputed statistic of a layer is the average over batches, weighted by each batch's
  number of rows, of the per-batch statistic that the layer itself blends into its running
  average: the batch mean, and the batch variance with the layer's own convention (biased
  for ``flax.linen.BatchNorm``; unbiased for :class:`featsim.backbones.layers.BatchNorm`,
  as PyTorch). This is the average of within-batch variances, not the pooled variance of all
  rows (which would add the spread of the batch means), i.e. what training-mode
  normalisation saw.

How: every module with a ``momentum`` attribute that owns ``batch_stats`` variables (both
BatchNorm classes above) has its momentum ``m`` read from the module while tracing
(:func:`flax.linen.intercept_methods`). Each batch runs with all running statistics set to
0, so the updated value is ``(1 - m) * batch_stat``; dividing by ``1 - m`` (in float64)
recovers the batch statistic exactly as the layer computed it, whatever its formula.
``params`` and every other collection are returned unchanged. (A BatchNorm module applied
more than once per forward pass, weights shared, blends twice and is not supported.)

Only real rows must be passed: there is no mask, so a padded row would enter the statistics
(pass exact-size batches; a final short batch counts with its own, smaller, weight).
:func:`even_batches` cuts ``n`` rows into batches that cover every row once, none padded,
with sizes that differ by at most one (so no final batch of one or two rows, whose
statistics would be far off or, with an unbiased variance, undefined).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

__all__ = [
    "batchnorm_momenta",
    "bn_description",
    "bn_stats_mode",
    "bn_subset",
    "even_batches",
    "recompute_batch_stats",
]

COLLECTION = "batch_stats"


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, tuple | list) else (batch,)


def even_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """``ceil(n / batch_size)`` consecutive int index arrays covering ``range(n)`` once, sizes
    differing by at most one (``np.array_split``): no padded row, no batch above
    ``batch_size``, and none below ``floor(n / ceil(n / batch_size))``, e.g. 9 rows in
    batches of at most 8 -> 5 + 4, not 8 + 1.

    Raises:
        ValueError: ``n < 1`` or ``batch_size < 1``.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"even_batches needs n >= 1 and batch_size >= 1, got n={n}, "
                         f"batch_size={batch_size}")
    return np.array_split(np.arange(n), -(-n // batch_size))


def batchnorm_momenta(apply_fn: Callable, variables: Mapping, *args,
                      apply_kwargs: Mapping | None = None, rngs=None) -> dict[tuple, float]:
    """``{module path: momentum}`` of every module that owns ``batch_stats`` and has a
    ``momentum`` attribute, found by tracing ``apply_fn`` (no compute) on ``args``."""
    found: dict[tuple, float] = {}

    def interceptor(next_fun, fn_args, fn_kwargs, context):
        module = context.module
        momentum = getattr(module, "momentum", None)
        if (context.method_name == "__call__" and isinstance(momentum, int | float)
                and module.scope is not None):
            found[tuple(module.scope.path)] = float(momentum)
        return next_fun(*fn_args, **fn_kwargs)

    def run(v, *a):
        return apply_fn(v, *a, mutable=[COLLECTION], rngs=rngs,
                        **dict(apply_kwargs if apply_kwargs is not None else {"train": True}))

    with nn.intercept_methods(interceptor):
        jax.eval_shape(run, variables, *args)
    return found


def _batch_update_impl(static, v, key, *args):
    apply_fn, apply_kwargs = static
    _, updates = apply_fn(v, *args, mutable=[COLLECTION], rngs={"dropout": key},
                          **dict(apply_kwargs))
    return updates[COLLECTION]


_batch_update = jax.jit(_batch_update_impl, static_argnums=0)


def recompute_batch_stats(
    apply_fn: Callable,
    variables: Mapping,
    batches: Iterable,
    *,
    apply_kwargs: Mapping | None = None,
    rng: jax.Array | None = None,
) -> dict:
    """``variables`` with every BatchNorm running statistic replaced by its population value
    over ``batches`` (see the module docstring for the definition).

    Args:
        apply_fn: ``module.apply``; called as ``apply_fn(variables, *batch,
            mutable=["batch_stats"], rngs=..., **apply_kwargs)``. A module built with a
            ``pmap`` BatchNorm ``axis_name`` cannot run here: pass one built without it.
        variables: ``{"params": ..., "batch_stats": ..., ...}``; not modified.
        batches: iterable of model inputs (an array, or a tuple of positional arguments),
            already preprocessed as at inference, real rows only; each batch is weighted by
            its leading size. Batches of one shape compile once.
        apply_kwargs: keyword arguments for training mode; default ``{"train": True}``.
        rng: key for stochastic layers in training mode (dropout, stochastic depth), passed
            as ``rngs={"dropout": fold_in(rng, batch index)}``; default ``key(0)``.

    Returns:
        A new variables dict (``batch_stats`` leaves float32, other collections the same
        objects).

    Raises:
        ValueError: no batches, no ``batch_stats``, a ``batch_stats`` leaf whose module has no
            readable ``momentum``, or a momentum of 1 (the running average never moves).
    """
    variables = dict(variables)
    if COLLECTION not in variables:
        raise ValueError("variables hold no batch_stats collection")
    apply_kwargs = dict(apply_kwargs) if apply_kwargs is not None else {"train": True}
    rng = jax.random.key(0) if rng is None else rng
    flat_stats = traverse_util.flatten_dict(variables[COLLECTION])
    zeros = traverse_util.unflatten_dict(
        {k: np.zeros(np.shape(v), np.float32) for k, v in flat_stats.items()})
    start = dict(variables, **{COLLECTION: zeros})

    try:  # one compilation per (apply_fn, kwargs, shapes), reused by later calls
        static = (apply_fn, tuple(sorted(apply_kwargs.items())))
        hash(static)

        def batch_update(v, key, *args):
            return _batch_update(static, v, key, *args)
    except TypeError:  # an unhashable apply_fn or keyword value: compile for this call
        batch_update = jax.jit(functools.partial(_batch_update_impl, (apply_fn, tuple(
            apply_kwargs.items()))))

    sums: dict[tuple, np.ndarray] | None = None
    scale: dict[tuple, float] = {}
    rows = 0
    for i, batch in enumerate(batches):
        args = _as_args(batch)
        key = jax.random.fold_in(rng, i)
        if sums is None:
            momenta = batchnorm_momenta(apply_fn, start, *args, apply_kwargs=apply_kwargs,
                                        rngs={"dropout": key})
            scale = {}
            for k in flat_stats:
                m = momenta.get(k[:-1])
                if m is None:
                    raise ValueError(f"batch_stats leaf {'/'.join(k)} belongs to no module "
                                     "with a momentum attribute")
                if m >= 1.0:
                    raise ValueError(f"{'/'.join(k[:-1])} has momentum {m}: its running "
                                     "statistics never move")
                scale[k] = 1.0 - m
            sums = {k: np.zeros(np.shape(v), np.float64) for k, v in flat_stats.items()}
        n = int(np.shape(args[0])[0])
        new = traverse_util.flatten_dict(jax.device_get(batch_update(start, key, *args)))
        for k in sums:
            sums[k] += n * (np.asarray(new[k], np.float64) / scale[k])
        rows += n
    if sums is None or rows == 0:
        raise ValueError("recompute_batch_stats needs at least one non-empty batch")
    stats = traverse_util.unflatten_dict(
        {k: (v / rows).astype(np.float32) for k, v in sums.items()})
    return dict(variables, **{COLLECTION: stats})


def bn_stats_mode(config, batch_stats, frozen_stats=frozenset()) -> str:
    """How a run's evaluated and saved model gets its BatchNorm statistics:

    * ``"recomputed"``: population statistics over the training images
      (:func:`featsim.train.loop.population_batch_stats`);
    * ``"running"``: the training running averages (``recompute_bn_stats=False``);
    * ``"frozen"``: never trained (``linear``, or every BatchNorm in a frozen stage), so the
      body's own statistics (pretrained, or initial for ``init="random"``) stay;
    * ``"none"``: the model has no BatchNorm.
    """
    flat = traverse_util.flatten_dict(batch_stats) if batch_stats else {}
    if not flat:
        return "none"
    if config.strategy == "linear" or all(k in frozen_stats for k in flat):
        return "frozen"
    return "recomputed" if config.recompute_bn_stats else "running"


def bn_description(mode: str, n_images: int, n_train: int | None = None) -> str:
    """The words ``metrics.json`` and the model's metadata record for :func:`bn_stats_mode`."""
    subset = f" of {n_train}" if n_train is not None and n_train != n_images else ""
    return {
        "recomputed": f"recomputed on {n_images}{subset} training images (un-augmented)",
        "running": "running averages of training (recompute_bn_stats=False)",
        "frozen": "not applicable: BatchNorm statistics frozen (never trained)",
        "none": "not applicable: no BatchNorm",
    }[mode]


def bn_subset(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted rows of a fixed (seeded) subset of ``min(limit, n)`` of ``n`` training rows:
    the same every epoch and after a resume."""
    if limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
