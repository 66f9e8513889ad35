"""BatchNorm population statistics recomputed before every evaluation and before saving
(``TrainConfig.recompute_bn_stats``, issue 12): a short scratch run's inference network is
nearly constant with the running averages and discriminates with recomputed statistics;
the statistics are the float64 reference's over every training row, un-augmented, none
padded; the training state keeps its running averages."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util
from sklearn.metrics import roc_auc_score

from featsim.backbones import layers, load_variables
from featsim.backbones.registry import get_backbone
from featsim.data.transforms import Transform
from featsim.train import AugmentConfig, TrainConfig, heads, train_and_evaluate
from featsim.train.batchnorm import bn_description, bn_stats_mode, bn_subset, even_batches
from featsim.train.datasets import Dataset
from featsim.train.loop import population_batch_stats
from featsim.train.steps import StepConfig


def test_even_batches_cover_every_row_once_without_padding_or_tiny_batches():
    for n, b in ((9, 8), (11, 4), (16, 8), (3, 8), (1, 1)):
        parts = even_batches(n, b)
        assert len(parts) == -(-n // b)
        np.testing.assert_array_equal(np.concatenate(parts), np.arange(n))
        sizes = [len(p) for p in parts]
        assert max(sizes) <= b and max(sizes) - min(sizes) <= 1, (n, b, sizes)
    assert [len(p) for p in even_batches(9, 8)] == [5, 4]  # not 8 + 1
    with pytest.raises(ValueError, match="n=0"):
        even_batches(0, 4)


class TwoNorms(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        a = layers.batch_norm(train=train, momentum=0.99, name="bn_a")(x)
        b = layers.batch_norm(train=train, momentum=0.9, name="bn_b")(x[..., :2] * 2.0)
        return jnp.concatenate([a.mean((1, 2)), b.mean((1, 2))], -1), {}


def test_population_batch_stats_match_float64_reference_on_raw_pixels():
    """Preprocessing as the eval step's (``x * scale + offset`` on [0, 255] pixels), 11 rows
    in batches of at most 4 (-> 4, 4, 3: every row once, none padded), row-weighted
    average of each batch's mean and unbiased variance (featsim's BatchNorm convention);
    a frozen leaf is kept."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 3, 2, 3)).astype(np.uint8)
    module = TwoNorms()
    variables = jax.tree.map(np.asarray, module.init(jax.random.key(0),
                                                     jnp.zeros((2, 3, 2, 3))))
    scale, offset = (1 / 127.5, 1 / 60.0, 1 / 255.0), (-1.0, -2.0, 0.5)
    cfg = StepConfig(module=module, scale=scale, offset=offset,
                     frozen_stats=frozenset({("bn_b", "var")}))
    old_b_var = np.full(2, 7.0, np.float32)
    variables["batch_stats"]["bn_b"]["var"] = old_b_var
    got = population_batch_stats(module, cfg, variables, images, 4, jax.random.key(0))

    x = images.astype(np.float64) * np.array(scale) + np.array(offset)
    parts = [x[i] for i in even_batches(11, 4)]
    assert [len(p) for p in parts] == [4, 4, 3]

    def reference(transform):
        means = [transform(p).reshape(-1, transform(p).shape[-1]).mean(0) for p in parts]
        var = [transform(p).reshape(-1, transform(p).shape[-1]).var(0, ddof=1) for p in parts]
        w = np.array([len(p) for p in parts], np.float64)[:, None]
        return (w * np.array(means)).sum(0) / w.sum(), (w * np.array(var)).sum(0) / w.sum()

    mean_a, var_a = reference(lambda p: p)
    mean_b, _ = reference(lambda p: p[..., :2] * 2.0)
    stats = traverse_util.flatten_dict(got)
    for key, want in ((("bn_a", "mean"), mean_a), (("bn_a", "var"), var_a),
                      (("bn_b", "mean"), mean_b)):
        assert stats[key].dtype == np.float32
        np.testing.assert_allclose(stats[key], want, rtol=2e-5, atol=1e-6, err_msg=str(key))
    np.testing.assert_array_equal(stats[("bn_b", "var")], old_b_var)  # frozen: untouched


def test_bn_stats_mode_by_strategy():
    stats = {"bn": {"mean": np.zeros(2), "var": np.ones(2)}}
    scratch = TrainConfig("elazhari_cnn", strategy="scratch")
    assert bn_stats_mode(scratch, stats) == "recomputed"
    assert bn_stats_mode(scratch.replace(recompute_bn_stats=False), stats) == "running"
    assert bn_stats_mode(TrainConfig("resnet18", strategy="linear", init="random"),
                         stats) == "frozen"
    assert bn_stats_mode(TrainConfig("resnet18", strategy="partial"), stats,
                         frozenset({("bn", "mean"), ("bn", "var")})) == "frozen"
    assert bn_stats_mode(scratch, None) == "none"
    with pytest.raises(ValueError, match="bn_stats_images"):
        TrainConfig("resnet18", bn_stats_images=1)


def test_bn_stats_images_limit_is_a_fixed_seeded_subset():
    np.testing.assert_array_equal(bn_subset(10, 10, 0), np.arange(10))
    np.testing.assert_array_equal(bn_subset(10, 50, 0), np.arange(10))
    pick = bn_subset(100, 30, 3)
    assert len(pick) == len(set(pick)) == 30 and np.all(np.diff(pick) > 0)
    np.testing.assert_array_equal(pick, bn_subset(100, 30, 3))  # same every epoch / resume
    assert not np.array_equal(pick, bn_subset(100, 30, 4))
    assert (bn_description("recomputed", 30, 100)
            == "recomputed on 30 of 100 training images (un-augmented)")


def _separable(n, seed):
    """Two classes that differ in brightness (as test_loop.py's tiny_dataset), 200 px: the
    smallest input elazhari_cnn's valid convolutions take is 190 px."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int32)
    images = rng.integers(0, 120, (n, 200, 200, 3)).astype(np.uint8)
    images[labels == 1] += 100
    return Dataset(images=images, labels=labels, groups=None,
                   ids=tuple(str(i) for i in range(n)), class_names=("a", "b"), source="tiny")


def _inference_probs(config, variables, data):
    module = heads.model_for(config, 1).module
    transform = Transform.for_backbone(get_backbone(config.backbone).preprocessing,
                                       config.normalization)
    scale, offset = transform.affine()
    x = data.images.astype(np.float32) * scale + offset
    logits, _ = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
    return np.asarray(jax.nn.sigmoid(logits[:, 0]), np.float64)


@pytest.fixture(scope="module")
def scratch_runs(tmp_path_factory):
    """elazhari_cnn (BatchNorm momentum 0.99) from scratch, 4 steps: with and without the
    recomputation, the same training otherwise."""
    root = tmp_path_factory.mktemp("bn")
    config = TrainConfig("elazhari_cnn", strategy="scratch", epochs=2, batch_size=8,
                         normalization="backbone", augment=AugmentConfig(enabled=False))
    train, test = _separable(16, 0), _separable(12, 1)
    out = {}
    for name, recompute in (("on", True), ("off", False)):
        cfg = config.replace(recompute_bn_stats=recompute)
        result = train_and_evaluate(cfg, root / name, train=train, test=test, progress=False)
        out[name] = (cfg, result, root / name)
    return out, test


def test_scratch_inference_discriminates_only_with_recomputed_statistics(scratch_runs):
    runs, test = scratch_runs
    (cfg_on, on, dir_on), (cfg_off, off, dir_off) = runs["on"], runs["off"]
    p_on = _inference_probs(cfg_on, load_variables(dir_on / "model.msgpack"), test)
    p_off = _inference_probs(cfg_off, load_variables(dir_off / "model.msgpack"), test)
    # Running averages after 4 steps at momentum 0.99: ~96% initial values (mean 0, var 1),
    # the inference network is nearly constant (probabilities within ~1e-3 of 0.5).
    assert np.std(p_off) < 2e-3, p_off
    assert off["test_accuracy"] == 0.5  # every test image on one side of 0.5
    # Recomputed population statistics: the same weights discriminate.
    assert np.std(p_on) > 0.05, p_on
    assert roc_auc_score(test.labels, p_on) > 0.8
    assert on["test_accuracy"] >= 0.8 and on["test_roc_auc"] > 0.8
    # metrics.json is computed from what model.msgpack holds
    np.testing.assert_allclose(on["test_accuracy"], np.mean((p_on >= 0.5) == test.labels))


def test_recompute_is_recorded_and_leaves_training_unchanged(scratch_runs):
    runs, _ = scratch_runs
    (_, on, dir_on), (_, off, dir_off) = runs["on"], runs["off"]
    assert on["bn_stats"] == "recomputed on 16 training images (un-augmented)"
    assert on["bn_stats_images"] == 16 and on["config"]["recompute_bn_stats"] is True
    assert off["bn_stats"].startswith("running averages") and off["bn_stats_images"] == 0
    hist_on = json.loads((dir_on / "history.json").read_text())
    hist_off = json.loads((dir_off / "history.json").read_text())
    assert [r["bn_stats_images"] for r in hist_on] == [16, 16]
    assert all("bn_stats_images" not in r for r in hist_off)
    # Training itself does not see the recomputation: same losses, same running averages.
    assert [r["train_loss"] for r in hist_on] == [r["train_loss"] for r in hist_off]
    running_on, running_off = _running(dir_on), _running(dir_off)
    model_on = traverse_util.flatten_dict(load_variables(dir_on / "model.msgpack"))
    model_off = traverse_util.flatten_dict(load_variables(dir_off / "model.msgpack"))
    assert len(running_on) == 8  # 4 BatchNorms x (mean, var)
    for key in model_on:
        if key[0] == "params":
            np.testing.assert_array_equal(model_on[key], model_off[key], err_msg=str(key))
    for key, running in running_on.items():
        np.testing.assert_array_equal(running, running_off[key], err_msg=str(key))
        np.testing.assert_array_equal(model_off[("batch_stats", *key)], running)  # as trained
        assert not np.allclose(model_on[("batch_stats", *key)], running), key  # replaced


def _running(workdir):
    """The training state's BatchNorm running averages (``checkpoint.msgpack``)."""
    payload = serialization.msgpack_restore((workdir / "checkpoint.msgpack").read_bytes())
    return traverse_util.flatten_dict(payload["state"]["batch_stats"])


@pytest.mark.parametrize("flag, expected", [((), True), (("--no-recompute-bn",), False)])
def test_train_cli_no_recompute_bn_flag(flag, expected, tmp_path, monkeypatch, capsys):
    import featsim.train
    from featsim.cli import main

    seen = {}

    def fake_run_seeds(config, seeds, workdir, **kwargs):
        seen["config"] = config
        return {"summary": {}, "runs": [{"bn_stats": "B"}]}

    monkeypatch.setattr(featsim.train, "run_seeds", fake_run_seeds)
    assert main(["train", "--backbone", "resnet18", "--strategy", "scratch", "--data",
                 str(tmp_path), "--out", str(tmp_path / "o"), *flag]) == 0
    assert seen["config"].recompute_bn_stats is expected
    assert "BatchNorm statistics: B" in capsys.readouterr().out
