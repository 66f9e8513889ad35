"""The epoch driver shared by every training path: one compiled program per epoch, on the device.

Supervised training (:mod:`featsim.train.loop`), autoencoder pretraining
(:mod:`featsim.train.pretraining`) and the cached-feature linear probe
(:mod:`featsim.train.linear_probe`) all run their epochs here. A path supplies a pure
``step(state, batch, key) -> (state, outputs)`` (``eval_step(state, batch) -> outputs`` for
evaluation); the driver

- holds the data on the devices once (:class:`DeviceData`: decoded uint8 images, labels,
  targets or cached features, copied to every device when the run starts);
- builds each epoch's batches on the device (the permutation of ``jax.random.permutation``
  for the epoch's key, each device taking its rows of the global batch,
  :func:`featsim.parallel.local_rows`) and runs all of the epoch's steps in one ``lax.scan``
  under :func:`featsim.parallel.pmap`, so the host dispatches one program per epoch;
- accumulates the scalar outputs on the device in a mergeable :class:`Sums` (CLU style) and
  collects the per-example ones (``probs``) with the rows they belong to, fetched once at the
  end of the epoch (:meth:`EpochOutputs.fetch`).

Batches are those of :func:`featsim.train.datasets.batches`: every example once per epoch,
full batches of the global size, and a last batch of the remaining examples padded to a
multiple of the device count with repeats of its own rows (mask 0), which runs as its own
step after the scan (BatchNorm sees the same rows as before). Step ``i`` of an epoch gets the
key ``fold_in(step_key, i)``; evaluation pads its last batch to the full size (masked: in
inference mode padding changes nothing) so that one step body serves every batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from featsim import parallel

__all__ = ["COLLECTED", "DeviceData", "EpochOutputs", "Sums", "evaluate_data", "run_epoch"]

# Step outputs with one value per example (collected); every other output is a scalar sum.
COLLECTED = ("probs",)


@struct.dataclass
class Sums:
    """Scalar sums over the steps of an epoch (``loss_sum``, ``count``, ...): mergeable.

    ``Sums.from_outputs(out).merge(...)`` adds key by key, as CLU's ``Average`` and
    ``Collection`` merge, so the same accumulator serves every step function.
    """

    values: dict

    @classmethod
    def from_outputs(cls, outputs: Mapping) -> Sums:
        return cls({k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()
                    if k not in COLLECTED})

    @classmethod
    def zeros_like(cls, outputs: Mapping) -> Sums:
        return cls({k: jnp.zeros((), jnp.float32) for k in outputs if k not in COLLECTED})

    def merge(self, other: Sums) -> Sums:
        if set(self.values) != set(other.values):
            raise ValueError(f"cannot merge sums of {sorted(self.values)} and "
                             f"{sorted(other.values)}")
        return Sums({k: self.values[k] + other.values[k] for k in self.values})

    def mean(self, key: str, *, count: str = "count") -> float:
        """``values[key] / values[count]`` on the host."""
        return float(self.values[key]) / float(self.values[count])


@dataclasses.dataclass(frozen=True)
class DeviceData:
    """Arrays with one row per example, on every device once (``[devices, n, ...]``).

    Args (of :meth:`put`): ``arrays`` such as ``{"images": uint8 [n, S, S, 3], "labels":
    int32 [n]}``; every array has the same number of rows. Batches of a step are
    ``{name: array[rows]}`` plus ``mask``.
    """

    arrays: dict
    n: int
    host: dict = dataclasses.field(repr=False)

    @classmethod
    def put(cls, arrays: Mapping[str, np.ndarray]) -> DeviceData:
        arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays of different lengths: {sizes}")
        return cls(arrays=parallel.replicate(arrays), n=next(iter(sizes.values())),
                   host=arrays)

    def first_copy(self, name: str):
        """The array ``name`` on the first device (for work outside the pmap programs)."""
        return self.arrays[name][0]


@dataclasses.dataclass(frozen=True)
class EpochOutputs:
    """An epoch's outputs, still on the devices: :meth:`fetch` brings them in one transfer."""

    sums: Sums
    collected: dict  # name -> (full steps [dev, F, per, ...], last step [dev, per_last, ...])
    rows: tuple  # (full [dev, F, per], last [dev, per_last])
    masks: tuple  # (full [dev, F, per], last [dev, per_last])

    def fetch(self) -> tuple[dict, dict, np.ndarray]:
        """``(sums, collected, rows)`` on the host: the sums as floats, and for every
        collected output its values of the real (unmasked) examples this process computed,
        in the order of ``rows`` (indices into the epoch's data)."""
        sums, collected, rows, masks = parallel.fetch(
            (self.sums.values, self.collected, self.rows, self.masks))
        sums = {k: float(v[0]) for k, v in sums.items()}
        keep = _in_batch_order(masks) > 0
        return (sums, {k: _in_batch_order(v)[keep] for k, v in collected.items()},
                _in_batch_order(rows)[keep])


def _in_batch_order(parts) -> np.ndarray:
    """``(full [dev, F, per, ...], last [dev, per_last, ...])`` -> rows in the order of the
    global batches (step by step, device by device), as :func:`featsim.parallel.unshard`."""
    full, last = parts
    out = []
    if full is not None:
        full = np.asarray(full)
        full = np.swapaxes(full, 0, 1)  # [F, dev, per, ...]
        out.append(full.reshape(-1, *full.shape[3:]))
    if last is not None:
        last = np.asarray(last)
        out.append(last.reshape(-1, *last.shape[2:]))
    return np.concatenate(out)


def _plan(n: int, batch_size: int, ndev: int, *, pad_last_to_full: bool):
    """``(full_steps, last_size)``: ``last_size`` rows (real + padding) of the last step, 0
    when ``n`` divides into full batches."""
    full, rest = divmod(n, batch_size)
    if not rest:
        return full, 0
    return full, (batch_size if pad_last_to_full else rest + (-rest % ndev))


@functools.lru_cache(maxsize=16)  # a few runs' programs; steps are made per run
def _program(step: Callable, n: int, batch_size: int, ndev: int, shuffle: bool,
             pad_last_to_full: bool):
    """The pmapped epoch program: ``(state, arrays, order_key, step_key) -> (state,
    EpochOutputs fields)``. Cached per (step function, sizes), so a run compiles it once."""
    full_steps, last_size = _plan(n, batch_size, ndev, pad_last_to_full=pad_last_to_full)
    real_last = n - full_steps * batch_size

    def one(state, arrays, index, mask, key):
        batch = {k: v[index] for k, v in arrays.items()}
        batch["mask"] = mask
        return step(state, batch, key)

    def program(state, arrays, order_key, step_key):
        order = jax.random.permutation(order_key, n) if shuffle else jnp.arange(n)
        template = jax.eval_shape(
            one, state, arrays, jnp.zeros((batch_size // ndev,), jnp.int32),
            jnp.ones((batch_size // ndev,), jnp.float32), step_key)[1]
        sums = Sums.zeros_like(template)
        collected, rows, masks = {k: [None, None] for k in template if k in COLLECTED}, [
            None, None], [None, None]
        if full_steps:
            index = parallel.local_rows(
                order[:full_steps * batch_size].reshape(full_steps, batch_size), axis=1)
            ones = jnp.ones(index.shape[1:], jnp.float32)

            def body(carry, xs):
                state, sums = carry
                rows_i, i = xs
                state, out = one(state, arrays, rows_i, ones, jax.random.fold_in(step_key, i))
                return (state, sums.merge(Sums.from_outputs(out))), {
                    k: out[k] for k in collected}

            (state, sums), stacked = lax.scan(body, (state, sums),
                                              (index, jnp.arange(full_steps)))
            for k in collected:
                collected[k][0] = stacked[k]
            rows[0], masks[0] = index, jnp.broadcast_to(ones, index.shape)
        if last_size:
            tail = order[full_steps * batch_size:]
            tail = jnp.concatenate([tail, tail[jnp.arange(last_size - real_last) % real_last]])
            mask = (jnp.arange(last_size) < real_last).astype(jnp.float32)
            index, mask = parallel.local_rows(tail), parallel.local_rows(mask)
            state, out = one(state, arrays, index, mask,
                             jax.random.fold_in(step_key, full_steps))
            sums = sums.merge(Sums.from_outputs(out))
            for k in collected:
                collected[k][1] = out[k]
            rows[1], masks[1] = index, mask
        return state, sums, {k: tuple(v) for k, v in collected.items()}, tuple(rows), tuple(
            masks)

    return parallel.pmap(program, in_axes=(0, 0, None, None))


def run_epoch(step: Callable, state, data: DeviceData, batch_size: int, *, order_key=None,
              step_key=None) -> tuple:
    """One training epoch on the devices: ``(state, EpochOutputs)``, nothing fetched.

    Args:
        step: ``step(state, batch, key) -> (state, outputs)``, a pmap step (collectives
            over :data:`featsim.parallel.DATA_AXIS`); the same function object each epoch
            (the compiled program is cached on it).
        state: replicated (:func:`featsim.parallel.replicate`).
        data: the training data.
        batch_size: the global batch (a multiple of the device count).
        order_key: the epoch's shuffling key; None keeps the data order.
        step_key: the epoch's step key (step ``i`` gets ``fold_in(step_key, i)``).
    """
    ndev = jax.device_count()
    if batch_size % ndev:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {ndev} devices")
    program = _program(step, data.n, batch_size, ndev, order_key is not None, False)
    dummy = jax.random.key(0)
    state, sums, collected, rows, masks = program(
        state, data.arrays, dummy if order_key is None else order_key,
        dummy if step_key is None else step_key)
    return state, EpochOutputs(sums, collected, rows, masks)


@functools.lru_cache(maxsize=16)
def _as_train_step(eval_step: Callable) -> Callable:
    def step(state, batch, key):
        del key
        return state, eval_step(state, batch)

    return step


def evaluate_data(eval_step: Callable, state, data: DeviceData, batch_size: int) -> EpochOutputs:
    """``eval_step(state, batch) -> outputs`` over every example once, in order (the last
    batch padded to the full size with masked rows); nothing fetched."""
    ndev = jax.device_count()
    batch_size = -(-batch_size // ndev) * ndev
    program = _program(_as_train_step(eval_step), data.n, batch_size, ndev, False, True)
    dummy = jax.random.key(0)
    _, sums, collected, rows, masks = program(state, data.arrays, dummy, dummy)
    return EpochOutputs(sums, collected, rows, masks)
