"""The epoch driver: every example once in the order of ``batches``, sums and collected
outputs equal to a float64 numpy reference, no device-to-host transfer inside an epoch,
2 devices equal 1, and the pmap calls of training live in two modules only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from featsim import parallel
from featsim.train.datasets import batches
from featsim.train.epoch import DeviceData, Sums, evaluate_data, run_epoch

ROOT = Path(__file__).resolve().parents[2]


def _counting_step(state, batch, key):
    """State = running sum of the rows' values (so the order and the rows are visible);
    outputs: the masked sum and count (global), per-example values and a key-derived
    number (to check the step keys)."""
    x, mask = batch["x"], batch["mask"]
    total = lax.psum(jnp.sum(x * mask), parallel.DATA_AXIS)
    count = lax.psum(mask.sum(), parallel.DATA_AXIS)
    noise = jax.random.uniform(key)
    return state + total, {"loss_sum": total, "count": count, "probs": x * 10.0,
                           "key_sum": noise * count}


def _run(n, batch_size, *, shuffle=True, seed=3):
    x = np.arange(n, dtype=np.float32) + 1.0
    data = DeviceData.put({"x": x})
    state = parallel.replicate(jnp.zeros((), jnp.float32))
    order_key = jax.random.key(seed) if shuffle else None
    step_key = jax.random.key(seed + 1)
    state, outputs = run_epoch(_counting_step, state, data, batch_size, order_key=order_key,
                               step_key=step_key)
    return x, state, outputs, order_key, step_key


@pytest.mark.parametrize("n, batch_size", [(11, 4), (12, 4), (3, 4), (1, 1)])
def test_every_row_once_in_the_order_of_batches(n, batch_size):
    x, state, outputs, order_key, step_key = _run(n, batch_size)
    sums, collected, rows = outputs.fetch()
    expected_rows = np.concatenate([index[mask > 0] for index, mask in batches(
        n, batch_size, n_devices=jax.device_count(), shuffle_key=order_key)])
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(np.sort(rows), np.arange(n))
    np.testing.assert_allclose(collected["probs"], x[rows] * 10.0)
    assert sums["count"] == n
    np.testing.assert_allclose(sums["loss_sum"], np.sum(x, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(parallel.fetch(state, replicated=True), x.sum(), rtol=1e-6)
    # Step i got fold_in(step_key, i), weighted by its real rows.
    plan = list(batches(n, batch_size, n_devices=jax.device_count(), shuffle_key=order_key))
    expected = sum(float(jax.random.uniform(jax.random.fold_in(step_key, i))) * mask.sum()
                   for i, (_, mask) in enumerate(plan))
    np.testing.assert_allclose(sums["key_sum"], expected, rtol=1e-5)


def test_unshuffled_epoch_keeps_the_data_order_and_evaluation_pads_to_full_batches():
    x, _, outputs, _, _ = _run(10, 4, shuffle=False)
    np.testing.assert_array_equal(outputs.fetch()[2], np.arange(10))

    def eval_step(state, batch):
        return {"loss_sum": lax.psum(jnp.sum(batch["x"] * batch["mask"]), parallel.DATA_AXIS),
                "count": lax.psum(batch["mask"].sum(), parallel.DATA_AXIS),
                "probs": batch["x"]}

    data = DeviceData.put({"x": x})
    sums, collected, rows = evaluate_data(eval_step, parallel.replicate(jnp.zeros(())), data,
                                          4).fetch()
    np.testing.assert_array_equal(rows, np.arange(10))
    np.testing.assert_array_equal(collected["probs"], x)
    assert sums == {"loss_sum": float(x.sum()), "count": 10.0}


def test_the_host_queues_an_epoch_without_waiting_for_the_device():
    """run_epoch fetches nothing per step: it returns while the device is still computing
    (each step here does ~0.1-0.5 s of matrix products), having queued every step; the
    outputs arrive when fetched. A driver that read a loss per step would return only after
    the last step, with its outputs ready."""

    def heavy_step(state, batch, key):
        matrix, total = state
        for _ in range(6):
            matrix = jnp.tanh(matrix @ matrix) * 0.5
        total, out = _counting_step(total, batch, key)
        return (matrix, total + 0.0 * matrix[0, 0]), out

    x = np.arange(22, dtype=np.float32)
    data = DeviceData.put({"x": x})
    start = parallel.replicate((np.eye(700, dtype=np.float32), np.zeros((), np.float32)))
    run_epoch(heavy_step, start, data, 4, order_key=jax.random.key(0))[1].fetch()  # compile
    state, outputs = run_epoch(heavy_step, start, data, 4, order_key=jax.random.key(1),
                               step_key=jax.random.key(2))
    pending = not state[1].is_ready()
    assert pending, "run_epoch returned only after the device had finished the epoch"
    assert len(outputs.steps) == 6  # 5 full steps of 4 and one of 2
    sums, _, rows = outputs.fetch()
    assert sums["count"] == 22 and sorted(rows) == list(range(22))
    np.testing.assert_allclose(parallel.fetch(state[1], replicated=True), x.sum())


def test_an_epoch_runs_under_jax_transfer_guard_disallow():
    """The epoch loop (shuffling, step keys, batch cutting, the steps) makes no implicit
    transfer between host and device: it runs under ``jax.transfer_guard("disallow")``.

    On XLA:CPU, JAX guards only host-to-device transfers (device memory is host memory, so
    reads are not guarded: checked here, a read inside the guard passes); on GPU and TPU the
    same guard also refuses any device-to-host read. The CPU side of "no read per step" is
    test_the_host_queues_an_epoch_without_waiting_for_the_device."""
    x = np.arange(23, dtype=np.float32)
    data = DeviceData.put({"x": x})
    start = parallel.replicate(jnp.zeros((), jnp.float32))
    run_epoch(_counting_step, start, data, 4, order_key=jax.random.key(0),
              step_key=jax.random.key(1))[1].fetch()  # compile outside the guard
    order_key, step_key = jax.random.key(2), jax.random.key(3)
    with jax.transfer_guard("disallow"):
        state, outputs = run_epoch(_counting_step, start, data, 4, order_key=order_key,
                                   step_key=step_key)
        with pytest.raises(Exception, match="Disallowed host-to-device"):  # the guard is live
            jnp.asarray(np.ones(3, np.float32)) + 1
    sums, _, rows = outputs.fetch()
    assert sums["count"] == 23 and sorted(rows) == list(range(23))
    np.testing.assert_allclose(parallel.fetch(state, replicated=True), x.sum())


def test_sums_merge_by_key_and_refuse_other_keys():
    a = Sums.from_outputs({"loss_sum": 1.5, "count": 2.0, "probs": np.ones(3)})
    b = Sums.from_outputs({"loss_sum": 0.5, "count": 3.0})
    merged = a.merge(b)
    assert set(merged.values) == {"loss_sum", "count"} and merged.mean("loss_sum") == 0.4
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(Sums.from_outputs({"loss_sum": 1.0}))
    with pytest.raises(ValueError, match="different lengths"):
        DeviceData.put({"a": np.zeros(3), "b": np.zeros(4)})


def test_two_devices_epoch_equals_one_device():
    """The driver over 2 forced CPU devices gives the rows, sums and collected values of
    1 device (each device takes its rows of the same global batches)."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        assert jax.local_device_count() == 2
        import sys
        sys.path.insert(0, TESTS_DIR)
        from test_epoch import _run
        for n, b in ((11, 4), (9, 2), (1, 2)):
            x, state, outputs, _, _ = _run(n, b)
            sums, collected, rows = outputs.fetch()
            print(n, b, list(rows), sums["count"], sums["loss_sum"], sums["key_sum"],
                  list(collected["probs"]))
    """).replace("TESTS_DIR", repr(str(Path(__file__).parent)))

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    two = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # The one-device reference runs here (this process has one device).
    assert jax.local_device_count() == 1
    lines = []
    for n, b in ((11, 4), (9, 2), (1, 2)):
        _, _, outputs, _, _ = _run(n, b)
        sums, collected, rows = outputs.fetch()
        lines.append(f"{n} {b} {list(rows)} {sums['count']} {sums['loss_sum']} "
                     f"{sums['key_sum']} {list(collected['probs'])}")
    # (1, 2): one real row padded to 2 on two devices, one row on one device: the same.
    assert two.stdout.strip().splitlines() == lines


def test_training_modules_leave_pmap_to_parallel_and_the_driver():
    """Only featsim.parallel and the epoch driver call pmap or split batches over devices,
    so moving from pmap to jit + sharding stays an edit of those two modules."""
    device_calls = {"pmap", "shard", "unshard", "local_rows", "device_put_replicated",
                    "device_put_sharded"}
    allowed = {"featsim/parallel.py", "featsim/train/epoch.py"}
    offenders = []
    for path in sorted((ROOT / "featsim").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in device_calls:
                    offenders.append(f"{rel}:{node.lineno}: {name}(...)")
    assert not offenders, "\n".join(offenders)
