"""El Azhari's flatten-MLP head: shapes, parameter count, the forward formula, which leaves
each strategy trains, a frozen body under ``linear``, and a falling training loss."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from featsim import parallel
from featsim.backbones import get_backbone, list_backbones, register_backbone, save_variables
from featsim.backbones.preprocessing import Preprocessing
from featsim.train import (
    STRATEGIES,
    AugmentConfig,
    TrainConfig,
    strategies,
    train_and_evaluate,
)
from featsim.train.datasets import Dataset
from featsim.train.heads import (
    HeadedBackbone,
    build_model,
    load_pretrained_model,
    pre_pool_feature,
)
from featsim.train.loop import create_train_state
from featsim.train.steps import make_train_step

TINY = "_test_heads_tiny_cnn"
MLP = ("mlp_hidden", "mlp_logits")


class TinyCNN(nn.Module):
    """32x32 input -> 16x16x8 stem -> 8x8x8 (BatchNorm) -> 4x4x4 -> mean pool."""

    num_classes: int | None = None
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        feats = {}
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="stem_conv")(x))
        feats["stem"] = x
        x = nn.Conv(8, (3, 3), strides=2, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name,
                         name="bn1")(x)
        feats["stage1"] = x = nn.relu(x)
        feats["stage2"] = x = nn.relu(nn.Conv(4, (3, 3), strides=2, name="conv2")(x))
        feats["pre_logits"] = x = x.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="fc")(x) if self.num_classes else None
        return logits, feats


if TINY not in list_backbones():
    register_backbone(TINY, preprocessing=Preprocessing(input_size=32, resize_size=32))(
        functools.partial(TinyCNN))


def tiny_dataset(n, num_classes=3, seed=0) -> Dataset:
    """Classes that differ in brightness, so a head can learn them."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    images = rng.integers(0, 80, (n, 32, 32, 3)).astype(np.uint8)
    images += (80 * labels).astype(np.uint8)[:, None, None, None]
    return Dataset(images=images, labels=labels, groups=None,
                   ids=tuple(str(i) for i in range(n)),
                   class_names=tuple("abcdefg"[:num_classes]), source="tiny")


@pytest.fixture
def body_weights(tmp_path):
    """A "pretrained" checkpoint of the headless tiny body (random, but fixed)."""
    bb = get_backbone(TINY, num_classes=None)
    variables = jax.tree.map(np.asarray, bb.init(jax.random.key(42)))
    flat = traverse_util.flatten_dict(variables)  # non-trivial running statistics
    flat[("batch_stats", "bn1", "mean")] = np.full(8, 0.1, np.float32)
    flat[("batch_stats", "bn1", "var")] = np.full(8, 2.0, np.float32)
    variables = traverse_util.unflatten_dict(flat)
    path = save_variables(tmp_path / "body.msgpack", variables, metadata={"backbone": TINY})
    return path, traverse_util.flatten_dict(variables)


def head_param_count(variables, backbone_variables) -> int:
    body = traverse_util.flatten_dict(backbone_variables["params"])
    return sum(int(np.prod(v.shape)) for k, v in
               traverse_util.flatten_dict(variables["params"]).items() if k not in body)


def test_el_azhari_table1_parameter_count_and_shapes():
    # Her Table 1: Flatten (None, 64) -> Dense(1000): 65,000 -> Dense(2): 2,002.
    model = build_model(TINY, 2, head="flatten_mlp")
    assert isinstance(model.module, HeadedBackbone)
    x = jnp.zeros((5, 32, 32, 3))
    variables = jax.eval_shape(model.module.init, jax.random.key(0), x)
    headless = jax.eval_shape(get_backbone(TINY, num_classes=None).module.init,
                              jax.random.key(0), x)
    params = variables["params"]
    assert params["mlp_hidden"]["kernel"].shape == (4 * 4 * 4, 1000)
    assert params["mlp_logits"]["kernel"].shape == (1000, 2)
    assert head_param_count(variables, headless) == 65_000 + 2_002
    logits, feats = jax.eval_shape(model.module.apply, variables, x)
    assert logits.shape == (5, 2) and logits.dtype == jnp.float32
    assert feats["pre_logits"].shape == (5, 4)


@pytest.mark.parametrize("name, size, expected", [
    ("resnet18", 64, "stage4"),           # 2x2x512 before the global pool
    ("shufflenet_v2_x1_0", 64, "conv5"),  # 2x2x1024
    ("vgg16", 64, "stage5"),              # after the last max-pool, as in the paper
])
def test_registered_backbones_parameter_count(name, size, expected):
    classes, hidden = 3, 1000
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    headless = get_backbone(name, num_classes=None).module
    body_vars = jax.eval_shape(headless.init, jax.random.key(0), x)
    _, feats = jax.eval_shape(headless.apply, body_vars, x)
    assert pre_pool_feature(feats) == expected
    _, h, w, c = feats[expected].shape
    model = build_model(name, classes, head="flatten_mlp", hidden=hidden)
    variables = jax.eval_shape(model.module.init, jax.random.key(0), x)
    want = h * w * c * hidden + hidden + hidden * classes + classes
    assert head_param_count(variables, body_vars) == want
    # The body keeps the plain backbone's keys (pretrained checkpoints load unchanged).
    flat_body = traverse_util.flatten_dict(body_vars)
    flat_model = traverse_util.flatten_dict(variables)
    assert set(flat_body) <= set(flat_model)
    assert {k[1] for k in set(flat_model) - set(flat_body)} == set(MLP)
    logits, _ = jax.eval_shape(model.module.apply, variables, x)
    assert logits.shape == (2, classes)


def test_forward_equals_flatten_dense_relu_dense_in_float64():
    model = build_model(TINY, 3, head="flatten_mlp", hidden=16)
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
    variables = model.module.init(jax.random.key(0), x)
    logits, feats = jax.jit(model.module.apply)(variables, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    fmap = np.asarray(feats["stage2"], np.float64).reshape(3, -1)  # NHWC, row-major
    hidden = np.maximum(fmap @ p["mlp_hidden"]["kernel"] + p["mlp_hidden"]["bias"], 0)
    expected = hidden @ p["mlp_logits"]["kernel"] + p["mlp_logits"]["bias"]
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-6)


def test_every_strategy_trains_the_whole_head(body_weights):
    model = build_model(TINY, 3, head="flatten_mlp")
    variables = model.abstract_variables()
    stages = strategies.leaf_stages(model.module, variables, model.input_shape)
    for strategy in STRATEGIES:
        labels = strategies.strategy_labels(stages, strategy)
        for layer in MLP:
            for leaf in ("kernel", "bias"):
                assert labels[("params", layer, leaf)] == "head", (strategy, layer)
        if strategy == "linear":
            body = {k: v for k, v in labels.items() if k[1] not in MLP}
            assert set(body.values()) == {"frozen"}


def test_linear_step_freezes_body_and_trains_both_head_layers(body_weights):
    path, pretrained = body_weights
    config = TrainConfig(TINY, strategy="linear", head="flatten_mlp", head_hidden=32,
                         batch_size=4, learning_rate=1e-2)
    state, step_config, _, _ = create_train_state(config, 3, 1, jax.random.key(0),
                                                  weights=path)
    before = traverse_util.flatten_dict({"params": state.params,
                                         "batch_stats": state.batch_stats})
    for key, value in pretrained.items():  # the body is the checkpoint's
        np.testing.assert_array_equal(before[key], value, err_msg=str(key))
    data = tiny_dataset(4)
    batch = {"images": data.images, "labels": data.labels, "mask": np.ones(4, np.float32)}
    step = parallel.pmap(make_train_step(step_config, np.ones(3, np.float32)),
                         in_axes=(0, 0, None))
    new, _ = step(parallel.replicate(state), parallel.shard(batch), jax.random.key(1))
    new = parallel.unreplicate(new)
    after = traverse_util.flatten_dict({"params": new.params, "batch_stats": new.batch_stats})
    assert set(after) == set(before)
    for key in pretrained:
        np.testing.assert_array_equal(after[key], before[key], err_msg=str(key))
    for layer in MLP:
        for leaf in ("kernel", "bias"):
            key = ("params", layer, leaf)
            assert not np.array_equal(after[key], before[key]), key


def test_uses_no_cached_features():
    config = TrainConfig(TINY, head="flatten_mlp", augment=AugmentConfig(enabled=False))
    assert config.strategy == "linear" and not config.uses_cached_features
    assert TrainConfig(TINY, augment=AugmentConfig(enabled=False)).uses_cached_features
    with pytest.raises(ValueError, match="head must be one of"):
        TrainConfig(TINY, head="mlp")


def test_load_pretrained_model_keeps_body_and_inits_head(body_weights):
    path, pretrained = body_weights
    model = load_pretrained_model(build_model(TINY, 3, head="flatten_mlp", hidden=8),
                                  path=path, rng=jax.random.key(0))
    flat = traverse_util.flatten_dict(model.variables)
    for key, value in pretrained.items():
        np.testing.assert_array_equal(flat[key], value, err_msg=str(key))
    assert flat[("params", "mlp_hidden", "kernel")].shape == (64, 8)
    assert np.all(flat[("params", "mlp_hidden", "bias")] == 0)  # Keras' zero bias
    assert np.std(flat[("params", "mlp_hidden", "kernel")]) > 0


def test_flatten_mlp_linear_training_loss_falls(tmp_path, body_weights):
    path, _ = body_weights
    config = TrainConfig(TINY, strategy="linear", head="flatten_mlp", head_hidden=64,
                         epochs=8, batch_size=8, learning_rate=2e-2,
                         augment=AugmentConfig(enabled=False))
    result = train_and_evaluate(config, tmp_path, train=tiny_dataset(24),
                                test=tiny_dataset(9, seed=1), weights=path, progress=False)
    assert result.get("path") != "cached_features"  # end to end, as documented
    history = json.loads((tmp_path / "history.json").read_text())
    losses = [row["train_loss"] for row in history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert 0.0 <= result["test_accuracy"] <= 1.0
