"""The one place that spreads work across devices and processes.

Devices: sharded ``jax.jit`` over a mesh of the local devices, and ``pmap``. Processes:
``jax.distributed`` (:func:`initialize`), each process a share of the tasks
(:class:`ProcessShare`), results exchanged with :meth:`ProcessShare.gather` so that every
process ends with the one-process result.

Feature extraction and training call :func:`data_parallel` instead of ``jax.pmap`` directly,
so moving between ``pmap`` and ``jit`` + sharding stays a one-module edit. The batch axis is
split over every local device (``jax.local_devices()``; on a CPU host force several with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``); other arguments are replicated.

A batch whose size does not divide evenly is padded here (:func:`pad_batch`) and the padding
masked out by the caller, never dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "LOCAL",
    "ProcessError",
    "ProcessShare",
    "data_parallel",
    "device_count",
    "fetch",
    "initialize",
    "local_mesh",
    "local_rows",
    "pad_batch",
    "pmap",
    "process_share",
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


# --------------------------------------------------------------------------------------------
# Processes (jax.distributed).
# --------------------------------------------------------------------------------------------


class ProcessError(RuntimeError):
    """Another process of a distributed run failed, or contact with one was lost
    (``lost`` True: that process is gone)."""

    lost: bool = False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int = 60,
               initialization_timeout_s: int = 300) -> ProcessShare:
    """Joins a ``jax.distributed`` run; returns this process's :class:`ProcessShare`.

    Call it first, before any other JAX call (it must precede the backend's start). Given
    nothing, JAX detects the run from the environment (SLURM, Open MPI, cloud TPU); otherwise
    give all three: ``coordinator`` ``"host:port"`` (process 0 listens there),
    ``num_processes`` and this ``process_id`` (0 .. num_processes - 1). On CPUs the processes'
    collectives run over gloo (TCP). A process that dies makes the others stop: their next
    exchange fails at once with :class:`ProcessError` (its sockets are closed), and a process
    still computing is ended by JAX's coordination service after ``heartbeat_timeout_s``
    (an abort whose log says that another task died); if process 0 (the coordinator) dies,
    the others end within seconds. Calling it again in an initialised process returns the
    share.

    Raises:
        ValueError: some but not all of the three given, a bad address, or an id out of range.
        ProcessError: the run could not be formed (the coordinator was not reached in time).
    """
    if jax.distributed.is_initialized():
        return process_share()
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("give --coordinator HOST:PORT, --num-processes N and --process-id I "
                         "together, or none of them (detected from SLURM / Open MPI / TPU)")
    if coordinator is not None:
        host, _, port = str(coordinator).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
        if not (isinstance(num_processes, int) and num_processes >= 1):
            raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
        if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
            raise ValueError(f"process_id must be in 0..{num_processes - 1}, got {process_id!r}")
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s,
                                   initialization_timeout=initialization_timeout_s)
    except (RuntimeError, ValueError) as err:
        if coordinator is None and "coordinator_address" in str(err):
            raise ValueError("--distributed found no cluster environment (SLURM, Open MPI, "
                             "TPU): give --coordinator HOST:PORT --num-processes N "
                             "--process-id I") from err
        where = coordinator or "the detected coordinator"
        raise ProcessError(f"could not join the distributed run at {where}: "
                           f"{_first_line(err)}") from err
    share = process_share()
    # The first collective connects the processes (gloo's TCP pairs). Done here, a process
    # that dies later closes its sockets and the others' next exchange fails at once, instead
    # of waiting to connect to it until the heartbeat timeout aborts them.
    share.exchange(None)
    return share


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclasses.dataclass(frozen=True)
class ProcessShare:
    """This process's share of numbered tasks, and the exchange of their results.

    Task ``t`` belongs to process ``t % count`` (round robin: neighbouring tasks, which tend
    to cost the same, go to different processes). :meth:`gather` gives every process the
    results of all tasks, so code that reduces them in task order gets the one-process
    numbers exactly. One process (the default :data:`LOCAL`) owns every task and gathers
    nothing, and is the metrics' default ``share``, so they need no special case for one
    process.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"process {self.index} of {self.count} is not a valid share")

    @property
    def is_main(self) -> bool:
        """Process 0: the one that prints and writes files."""
        return self.index == 0

    def owns(self, task: int) -> bool:
        return task % self.count == self.index

    def tasks(self, n: int) -> range:
        """The tasks of ``0 .. n - 1`` this process computes."""
        return range(self.index, n, self.count)

    def gather(self, values: Mapping[int, Any]) -> dict[int, Any]:
        """Every process's ``{task: result}`` merged (the same dict on every process)."""
        merged: dict[int, Any] = {}
        for part in self.exchange(dict(values)):
            merged.update(part)
        return dict(sorted(merged.items()))

    def exchange(self, obj) -> list:
        """``obj`` of every process, in process order (pickled; objects of this program)."""
        if self.count == 1:
            return [obj]
        return [pickle.loads(b) for b in _allgather_bytes(pickle.dumps(obj, protocol=5))]

    def run(self, fn: Callable[[], Any]) -> list:
        """``fn()`` on every process, then its results in process order. An exception in any
        process is raised on every process (as :class:`ProcessError` naming the process),
        so no process waits for one that gave up."""
        try:
            outcome = ("ok", fn())
        except Exception as err:  # sent to the other processes, then re-raised here
            if self.count == 1:
                raise
            outcome = ("error", f"{type(err).__name__}: {err}", err)
        outcomes = self.exchange(outcome[:2])
        for i, out in enumerate(outcomes):
            if out[0] == "error":
                if i == self.index:
                    raise outcome[2]
                raise ProcessError(f"process {i} of {self.count} failed: {out[1]}")
        return [out[1] for out in outcomes]


LOCAL = ProcessShare()


def process_share() -> ProcessShare:
    """The share of this process: :data:`LOCAL` unless :func:`initialize` joined a run."""
    count = jax.process_count()
    return LOCAL if count == 1 else ProcessShare(jax.process_index(), count)


def _allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's bytes, in process order, over JAX's collectives (gloo on CPU)."""
    from jax.experimental import multihost_utils

    try:
        sizes = multihost_utils.process_allgather(np.array([len(data)], np.int64))
        longest = int(np.max(sizes))
        # Lengths rounded up to a power of two: few distinct shapes, few compilations.
        width = 1 << max(10, (longest - 1).bit_length())
        buffer = np.zeros(width, np.uint8)
        buffer[: len(data)] = np.frombuffer(data, np.uint8)
        gathered = multihost_utils.process_allgather(buffer)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as err:
        # A failed collective surfaces as JaxRuntimeError or, through jit, as a ValueError
        # whose text is the runtime's ("Gloo AllGather failed: ... Connection closed").
        lost = ProcessError(
            f"lost contact with another process of the distributed run ({_first_line(err)}); "
            "it probably died (see its output). Rerun the same command on every process: "
            "finished feature chunks are cached and training resumes from its checkpoint")
        lost.lost = True  # the CLI leaves without JAX's exit barrier, which would wait for it
        raise lost from err
    return [bytes(row[: int(n)]) for row, n in zip(gathered, np.ravel(sizes), strict=True)]
