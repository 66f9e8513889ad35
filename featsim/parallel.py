"""The one place that spreads work across local devices (sharded ``jax.jit`` over a mesh).

Feature extraction and training call :func:`data_parallel` instead of ``jax.pmap`` directly,
so moving between ``pmap`` and ``jit`` + sharding stays a one-module edit. The batch axis is
split over every local device (``jax.local_devices()``; on a CPU host force several with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``); other arguments are replicated.

A batch whose size does not divide evenly is padded here (:func:`pad_batch`) and the padding
masked out by the caller, never dropped.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "data_parallel",
    "device_count",
    "fetch",
    "local_mesh",
    "local_rows",
    "pad_batch",
    "pmap",
    "replicate",
    "shard",
    "unreplicate",
    "unshard",
]

DATA_AXIS = "data"


def device_count() -> int:
    """Number of local devices the batch axis is split over."""
    return jax.local_device_count()


@functools.cache
def local_mesh() -> Mesh:
    """A 1-D mesh over the local devices, axis :data:`DATA_AXIS`."""
    return Mesh(np.array(jax.local_devices()), (DATA_AXIS,))


def data_parallel(fn, *, replicated_argnums: tuple[int, ...] = (0,)):
    """``jax.jit(fn)`` with the leading axis of the non-replicated arguments sharded.

    Args:
        fn: ``fn(*args)``; arguments in ``replicated_argnums`` (e.g. the variables) are
            copied to every device, the others are batches whose leading axis is split.
            Outputs are sharded along their leading axis too.
        replicated_argnums: positions of the replicated arguments.

    Returns:
        The compiled function. Batch arguments must have a leading size divisible by
        :func:`device_count` (see :func:`pad_batch`).
    """
    mesh = local_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

    @functools.wraps(fn)
    def call(*args):
        shardings = tuple(
            replicated if i in replicated_argnums else sharded for i in range(len(args))
        )
        return _jitted(len(args), shardings)(*args)

    @functools.cache
    def _jitted(nargs, shardings):
        return jax.jit(fn, in_shardings=shardings, out_shardings=sharded)

    return call


def pad_batch(batch: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Pads ``batch`` along axis 0 to ``size`` rows with zeros.

    Returns:
        ``(padded, n_valid)``: the caller keeps ``padded[:n_valid]`` of every output.

    Raises:
        ValueError: ``batch`` already has more than ``size`` rows.
    """
    n = batch.shape[0]
    if n > size:
        raise ValueError(f"batch of {n} rows does not fit a padded size of {size}")
    if n == size:
        return batch, n
    pad = np.zeros((size - n, *batch.shape[1:]), batch.dtype)
    return np.concatenate([batch, pad]), n


def pmap(fn, *, in_axes=0, donate_argnums=()):
    """``jax.pmap(fn)`` over the local devices with the axis name :data:`DATA_AXIS`."""
    return jax.pmap(fn, axis_name=DATA_AXIS, in_axes=in_axes, donate_argnums=donate_argnums)


def replicate(tree, devices=None):
    """A copy of ``tree`` on every device (leading axis = device), as ``pmap`` expects.

    (``jax.device_put_replicated`` is deprecated since JAX 0.8: this is its drop-in.)
    """
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.array(devices), (DATA_AXIS,)), PartitionSpec(DATA_AXIS))

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x[None], (len(devices), *x.shape)), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree):
    """The first device's copy of a replicated ``tree``, as host numpy arrays (only that copy
    is transferred, in one call)."""
    return jax.tree.map(np.asarray, jax.device_get(jax.tree.map(lambda x: x[0], tree)))


def shard(tree):
    """Splits the leading axis ``n`` of every leaf into ``[devices, n / devices]``."""
    n = device_count()

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"leading axis {x.shape[0]} is not a multiple of {n} devices")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, tree)


def unshard(x) -> np.ndarray:
    """``[devices, b, ...]`` -> ``[devices * b, ...]`` on the host."""
    x = np.asarray(x)
    return x.reshape(-1, *x.shape[2:])


def local_rows(x, axis: int = 0):
    """Inside a :func:`pmap` program: this device's contiguous share of a *global* batch
    axis (the rows ``shard`` would have given it; devices of all processes in order).

    The training programs build each global batch on the device and call this to pick the
    rows the device computes on, so no batch is gathered or split on the host.
    """
    from jax import lax

    ndev = jax.device_count()
    size = x.shape[axis]
    if size % ndev:
        raise ValueError(f"axis {axis} of size {size} is not a multiple of {ndev} devices")
    share = size // ndev
    return lax.dynamic_slice_in_dim(x, lax.axis_index(DATA_AXIS) * share, share, axis)


def fetch(tree, *, replicated: bool = False):
    """Device outputs of a :func:`pmap` program to host numpy arrays, in one transfer.

    Args:
        replicated: the leaves are identical on every device (``psum`` results, the
            state): keep the first device's copy. Otherwise the leading device axis is kept.
    """
    return unreplicate(tree) if replicated else jax.device_get(tree)
