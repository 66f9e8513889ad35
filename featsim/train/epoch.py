"""The epoch driver shared by every training path: the epoch on the device, fetched once.

Supervised training (:mod:`featsim.train.loop`), autoencoder pretraining
(:mod:`featsim.train.pretraining`) and the cached-feature linear probe
(:mod:`featsim.train.linear_probe`) all run their epochs here. A path supplies a pure
``step(state, batch, key) -> (state, outputs)`` (``eval_step(state, batch) -> outputs`` for
evaluation); the driver

- holds the data on the devices once (:class:`DeviceData`: decoded uint8 images, labels,
  targets or cached features, copied to every device when the run starts);
- computes each epoch's order on the device (``jax.random.permutation`` of the epoch's key)
  and runs every step as one :func:`featsim.parallel.pmap` program that gathers its batch
  from the device copy (each device taking its rows of the global batch,
  :func:`featsim.parallel.local_rows`); the host only queues the steps (two scalars each)
  and never waits for one;
- keeps every step's outputs on the device, the scalar sums (``loss_sum``, ``count``, ...)
  and the per-example ones (``probs``) with the rows they belong to, and brings them to the
  host in one transfer at the end of the epoch (:meth:`EpochOutputs.fetch`), where the
  sums merge in float64 (:class:`Sums`, CLU style).

Batches are those of :func:`featsim.train.datasets.batches`: every example once per epoch,
full batches of the global size, and a last batch of the remaining examples padded to a
multiple of the device count with repeats of its own rows (mask 0), so BatchNorm sees the
rows it saw before. Step ``i`` of an epoch gets the key ``fold_in(step_key, i)``; evaluation
pads its last batch to the full size (masked: in inference mode padding changes nothing) so
that one program serves every batch. Each (step function, batch shape) compiles once.

(An epoch as one ``lax.scan`` program was tried and dropped: XLA:CPU ran EfficientNet-Lite0's
training step 3.6x slower inside the loop: 1.3 vs 4.6 images/s at batch 16, 224 px.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from featsim import parallel

__all__ = ["COLLECTED", "DeviceData", "EpochOutputs", "Sums", "evaluate_data", "run_epoch",
           "seed_state", "stack_states"]

# Step outputs with one value per example (collected); every other output is a scalar sum.
COLLECTED = ("probs",)


@struct.dataclass
class Sums:
    """Scalar sums over the steps of an epoch (``loss_sum``, ``count``, ...): mergeable.

    ``Sums.from_outputs(out).merge(...)`` adds key by key (float64 on the host), as CLU's
    ``Average`` and ``Collection`` merge, so the same accumulator serves every step function.
    """

    values: dict

    @classmethod
    def from_outputs(cls, outputs: Mapping) -> Sums:
        """The scalar outputs of a step (host values), the collected ones left out."""
        return cls({k: np.float64(np.asarray(v).reshape(-1)[0]) for k, v in outputs.items()
                    if k not in COLLECTED})

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


@struct.dataclass
class EpochOutputs:
    """An epoch's outputs, still on the devices: :meth:`fetch` brings them in one transfer.

    ``steps`` holds, per step, the step's outputs (``[devices, ...]``; the scalar sums
    replicated, the collected ones one value per example on each device), the rows of the
    data each device computed and their mask (0: padding).
    """

    steps: list

    def seed(self, index: int) -> EpochOutputs:
        """The outputs of one seed of a stacked epoch (:func:`run_epoch` ``stacked=True``)."""
        return jax.tree.map(lambda x: x[:, index], self)

    def fetch(self) -> tuple[dict, dict, np.ndarray]:
        """``(sums, collected, rows)`` on the host: the scalar outputs summed over the steps
        (float64, :class:`Sums`), and for every collected output its values of the real
        (unmasked) examples, in the order of ``rows`` (indices into the epoch's data: step by
        step, device by device, as the global batches). In a multi-process run every process
        gets every process's values (one exchange per epoch), as one process with all the
        devices would."""
        steps = jax.device_get(self.steps)
        sums = None
        local = []  # per step: ({collected name: values}, rows) of this process's devices
        for out in steps:
            keep = np.asarray(out["mask"]).reshape(-1) > 0
            step_sums = Sums.from_outputs(out["outputs"])  # psum'd: device 0's value
            sums = step_sums if sums is None else sums.merge(step_sums)
            values = {}
            for k in COLLECTED:
                if k in out["outputs"]:
                    v = np.asarray(out["outputs"][k])
                    values[k] = v.reshape(-1, *v.shape[2:])[keep]
            local.append((values, np.asarray(out["rows"]).reshape(-1)[keep]))
        share = parallel.process_share()
        every = share.exchange(local) if share.count > 1 else [local]
        # Step by step, process by process: the global device order within each batch.
        ordered = [part[step] for step in range(len(local)) for part in every]
        collected = {k: np.concatenate([values[k] for values, _ in ordered])
                     for k in (ordered[0][0] if ordered else {})}
        rows = np.concatenate([r for _, r in ordered]) if ordered else np.zeros(0, np.int64)
        return {k: float(v) for k, v in sums.values.items()}, collected, rows


def _plan(n: int, batch_size: int, ndev: int, *, pad_last_to_full: bool) -> list:
    """``[(start, size, real), ...]`` per step: the step's first position in the epoch's
    order, its rows (real + padding) and its real rows. The last step of a training epoch
    has its remaining rows padded to a multiple of ``ndev``; evaluation pads it to the full
    size (in inference mode padding changes nothing, and one program serves every step)."""
    full, rest = divmod(n, batch_size)
    plan = [(i * batch_size, batch_size, batch_size) for i in range(full)]
    if rest:
        size = batch_size if pad_last_to_full else rest + (-rest % ndev)
        plan.append((full * batch_size, size, rest))
    return plan


@functools.cache
def _dummy_key():
    """``jax.random.key(0)``, made once per process: the key of unshuffled epochs and of
    steps that take none."""
    return jax.random.key(0)


@functools.lru_cache(maxsize=16)  # a few runs' programs; steps are made per run
def _order_program(n: int, shuffle: bool, stacked: bool):
    """``(order_key) -> order [devices, (seeds,) n]``: the epoch's permutation on every
    device."""
    def order(key):
        return jax.random.permutation(key, n) if shuffle else jnp.arange(n)

    if stacked:
        order = jax.vmap(order)
    ndev = jax.local_device_count()
    return parallel.pmap(lambda key, _: order(key), in_axes=(None, 0)), ndev


@functools.lru_cache(maxsize=32)  # a few runs' programs; steps are made per run
def _step_program(step: Callable, size: int, real: int, stacked: bool):
    """The pmapped program of one step of ``size`` global rows, ``real`` of them real:
    ``(state, arrays, order, start, step_key, i) -> (state, {outputs, rows, mask})``. The
    batch is rows ``order[start + (j mod real)]``, ``j < size``, each device taking its
    share (:func:`featsim.parallel.local_rows`); step ``i`` gets ``fold_in(step_key, i)``.
    One compilation per (step function, size, real); ``stacked``: ``jax.vmap`` over a seed
    axis of the state, the order and the key (the data are shared)."""

    def program(state, arrays, order, start, step_key, i):
        position = start + jnp.arange(size) % real
        index = parallel.local_rows(jnp.take(order, position))
        mask = parallel.local_rows((jnp.arange(size) < real).astype(jnp.float32))
        batch = {k: v[index] for k, v in arrays.items()}
        batch["mask"] = mask
        state, out = step(state, batch, jax.random.fold_in(step_key, i))
        return state, {"outputs": out, "rows": index, "mask": mask}

    if stacked:
        program = jax.vmap(program, in_axes=(0, None, 0, None, 0, None))
    return parallel.pmap(program, in_axes=(0, 0, 0, None, None, None))


def _epoch(step: Callable, state, data: DeviceData, batch_size: int, order_key, step_key, *,
           pad_last_to_full: bool, stacked: bool):
    ndev = jax.device_count()
    if batch_size % ndev:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {ndev} devices")
    shuffle = order_key is not None
    if stacked and not shuffle:
        raise ValueError("stacked runs need one order_key per seed")
    order_program, local = _order_program(data.n, shuffle, stacked)
    # Explicit transfers, once per epoch: the steps then move nothing between host and
    # device (the loop runs under jax.transfer_guard("disallow"); tests/train/test_epoch.py).
    dummy = _dummy_key()
    order = order_program(order_key if shuffle else dummy,
                          jax.device_put(np.zeros(local, np.int32)))
    step_key = dummy if step_key is None else step_key
    plan = _plan(data.n, batch_size, ndev, pad_last_to_full=pad_last_to_full)
    scalars = jax.device_put([(np.int32(start), np.int32(i))
                              for i, (start, _, _) in enumerate(plan)])
    outputs = []
    for (_, size, real), (start, i) in zip(plan, scalars, strict=True):
        # Dispatched asynchronously: the host queues the steps and fetches nothing.
        state, out = _step_program(step, size, real, stacked)(
            state, data.arrays, order, start, step_key, i)
        outputs.append(out)
    return state, EpochOutputs(outputs)


def run_epoch(step: Callable, state, data: DeviceData, batch_size: int, *, order_key=None,
              step_key=None, stacked: bool = False) -> tuple:
    """One training epoch on the devices: ``(state, EpochOutputs)``, nothing fetched.

    Args:
        step: ``step(state, batch, key) -> (state, outputs)``, a pmap step (collectives
            over :data:`featsim.parallel.DATA_AXIS`); the same function object each epoch
            (the compiled programs are cached on it).
        state: replicated (:func:`featsim.parallel.replicate`).
        data: the training data.
        batch_size: the global batch (a multiple of the device count).
        order_key: the epoch's shuffling key; None keeps the data order.
        step_key: the epoch's step key (step ``i`` gets ``fold_in(step_key, i)``).
        stacked: several runs of one configuration in one program: ``state`` has a seed
            axis after the device axis (:func:`stack_states`), ``order_key`` and
            ``step_key`` one key per seed; the outputs have the seed axis too
            (:meth:`EpochOutputs.seed`).
    """
    return _epoch(step, state, data, batch_size, order_key, step_key, pad_last_to_full=False,
                  stacked=stacked)


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
    return _epoch(_as_train_step(eval_step), state, data, batch_size, None, None,
                  pad_last_to_full=True, stacked=False)[1]


def stack_states(states):
    """Replicated per-seed states -> one state with a seed axis after the device axis.

    The states must have the same leaves (one configuration); static fields (``apply_fn``,
    ``tx``) are taken from the first."""
    treedef = jax.tree.structure(states[0])
    leaves = [jax.tree.leaves(s) for s in states]
    if any(len(x) != len(leaves[0]) for x in leaves):
        raise ValueError("states of different structure cannot run stacked")
    return jax.tree.unflatten(treedef, [jnp.stack(xs, axis=1)
                                        for xs in zip(*leaves, strict=True)])


def seed_state(stacked, index: int):
    """Seed ``index``'s replicated state out of :func:`stack_states`'s."""
    return jax.tree.map(lambda x: x[:, index], stacked)
