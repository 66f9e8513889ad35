"""Seeds of one configuration in one compiled program (vmap over seeds): each seed's step is
the step of its separate run (to float32 rounding, amplified by Adam as between 1 and 2
devices), and ``run_seeds(together=True)`` writes every seed's files as separate runs do."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import tiny_dataset  # tests/train/test_loop.py

from featsim import parallel
from featsim.train import AugmentConfig, TrainConfig
from featsim.train.epoch import run_epoch, stack_states
from featsim.train.loop import create_train_state, device_data, run_seeds
from featsim.train.steps import make_train_step


def test_stacked_step_equals_each_seeds_own_step():
    """resnet18 from scratch, augmentation on, synchronised BatchNorm: one step of two
    seeds stacked equals each seed's step alone: the loss to 1e-5, the BatchNorm statistics
    to 1e-5, and 99.99 % of the parameters to float32 rounding; Adam's first update is
    lr * g / (|g| + eps), so a gradient component near 0 whose float32 sum is rounded
    differently may flip sign and move by up to 2 lr = 2e-3."""
    config = TrainConfig("resnet18", strategy="scratch", batch_size=4,
                         augment=AugmentConfig(enabled=True))
    data = device_data(tiny_dataset(4, size=32))
    states, step = [], None
    for seed in (0, 1):
        state, step_config, _, _ = create_train_state(config, 1, 1, jax.random.key(seed))
        states.append(parallel.replicate(state))
        step = step or make_train_step(step_config, np.ones(2, np.float32))
    keys = [(jax.random.key(10 + s), jax.random.key(20 + s)) for s in (0, 1)]
    alone = []
    for state, (order_key, step_key) in zip(states, keys, strict=True):
        new, out = run_epoch(step, state, data, 4, order_key=order_key, step_key=step_key)
        alone.append((parallel.fetch(new, replicated=True), out.fetch()[0]))
    stacked, out = run_epoch(step, stack_states(states), data, 4,
                             order_key=jnp.stack([k[0] for k in keys]),
                             step_key=jnp.stack([k[1] for k in keys]), stacked=True)
    together = parallel.fetch(stacked, replicated=True)
    for i, (state, sums) in enumerate(alone):
        mine = out.seed(i).fetch()[0]
        assert mine["count"] == sums["count"] == 4
        np.testing.assert_allclose(mine["loss_sum"], sums["loss_sum"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(state.batch_stats),
                        jax.tree.leaves(together.batch_stats), strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-5, atol=1e-5)
        close, total = 0, 0
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(together.params),
                        strict=True):
            np.testing.assert_allclose(b[i], a, rtol=0, atol=2.001e-3)
            close += int(np.sum(np.abs(b[i] - a) <= 2e-6 + 2e-4 * np.abs(a)))
            total += a.size
        assert close / total > 0.9999
    # The two seeds did not run the same thing.
    assert alone[0][1]["loss_sum"] != alone[1][1]["loss_sum"]


def test_run_seeds_together_writes_what_separate_runs_write(tmp_path):
    config = TrainConfig("resnet18", strategy="scratch", epochs=2, batch_size=4)
    train, test = tiny_dataset(6, size=32), tiny_dataset(4, size=32, seed=1)
    apart = run_seeds(config, [0, 1], tmp_path / "apart", train=train, test=test,
                      progress=False)
    together = run_seeds(config, [0, 1], tmp_path / "together", train=train, test=test,
                         progress=False, together=True)
    assert together["together"] is True and apart["together"] is False
    for seed in (0, 1):
        a = json.loads((tmp_path / "apart" / f"seed_{seed}" / "history.json").read_text())
        b = json.loads((tmp_path / "together" / f"seed_{seed}" / "history.json").read_text())
        assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
        # Epoch 1 has two steps; the second starts from parameters that may differ by 2 lr
        # in a few components (see above), and training from scratch amplifies that: seen
        # 0.4 % and 2.5 % on the loss. So the run-level check is loose (10 %) and the exact
        # one is the step test above; the seeds themselves differ by far more (~2x).
        np.testing.assert_allclose(b[0]["train_loss"], a[0]["train_loss"], rtol=0.1)
        other = json.loads((tmp_path / "apart" / f"seed_{1 - seed}" / "history.json")
                           .read_text())
        assert abs(b[0]["train_loss"] - a[0]["train_loss"]) < abs(
            b[0]["train_loss"] - other[0]["train_loss"])
        for name in ("model.msgpack", "metrics.json", "config.json", "checkpoint.msgpack"):
            assert (tmp_path / "together" / f"seed_{seed}" / name).is_file(), name
        cfg = json.loads((tmp_path / "together" / f"seed_{seed}" / "config.json").read_text())
        assert cfg["seed"] == seed
    assert together["runs"][0]["test_loss"] != together["runs"][1]["test_loss"]
    with pytest.raises(ValueError, match="val_fraction=0"):
        run_seeds(TrainConfig("resnet18", strategy="scratch", val_fraction=0.5), [0, 1],
                  tmp_path / "bad", train=train, test=test, together=True)
