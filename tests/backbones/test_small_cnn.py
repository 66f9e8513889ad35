"""El Azhari's Table 1 CNN: parameter counts and shapes against the paper, Keras'
SeparableConv2D against a float64 loop reference, and training from scratch."""

from __future__ import annotations

import functools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from featsim.backbones import get_backbone, load_variables
from featsim.backbones.small_cnn import (
    ELAZHARI_PREPROCESSING,
    ELAZHARI_TABLE1,
    MIN_INPUT_SIZE,
    ElAzhariCNN,
    SeparableConv2D,
)
from featsim.features.extract import feature_layers
from featsim.train import AugmentConfig, TrainConfig, train_and_evaluate
from featsim.train.datasets import Dataset

# Table 1 rows (1-based, as printed) of each layer of the model.
SEPCONV_ROWS = {"sepconv1": 1, "sepconv2": 3, "sepconv3": 6, "sepconv4": 9, "sepconv5": 13,
                "sepconv6": 14, "sepconv7": 16}
BN_ROWS = {"bn1": 5, "bn2": 8, "bn3": 11, "bn4": 18}


def _table(row):
    return ELAZHARI_TABLE1[row - 1]


def _keras_separable_params(c_in, c_out, k=3):
    # depthwise k*k per input channel (depth_multiplier 1), pointwise c_in*c_out, one bias.
    return k * k * c_in + c_in * c_out + c_out


def _per_layer_counts(num_classes=2):
    """Keras-style parameter count per top-level layer: params + batch_stats (BatchNorm's
    moving mean and variance count in Keras' summary, as non-trainable parameters)."""
    bb = get_backbone("elazhari_cnn", num_classes=num_classes)
    shapes = bb.abstract_variables()
    counts: dict[str, int] = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        counts[path[1]] = counts.get(path[1], 0) + int(np.prod(leaf.shape))
    return counts


def test_registered_without_weights_and_with_the_papers_preprocessing():
    bb = get_backbone("elazhari_cnn", num_classes=2)
    assert isinstance(bb.module, ElAzhariCNN)
    assert bb.weights is None
    assert bb.preprocessing == ELAZHARI_PREPROCESSING
    p = bb.preprocessing
    # 198 x 198 after a valid 3x3 conv: a 200 x 200 input, scaled to [0, 1].
    assert (p.input_size, p.crop, p.scaling) == (200, "none", "[0,1]")
    np.testing.assert_allclose(p.normalize(np.array([[0, 51, 255]], np.uint8)),
                               [[0.0, 0.2, 1.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="no pretrained weights"):
        get_backbone("elazhari_cnn", pretrained=True, num_classes=None)


def test_feature_layers_like_the_other_backbones():
    assert set(feature_layers(get_backbone("elazhari_cnn", num_classes=2))) == {
        "stem", "stage1", "stage2", "stage3", "stage4", "stage5", "pooled", "pre_logits",
        "logits"}
    assert "logits" not in feature_layers(get_backbone("elazhari_cnn", num_classes=None))


def test_parameter_counts_match_table1_where_it_is_self_consistent():
    counts = _per_layer_counts()
    # Channels in -> out of each SeparableConv2D, from the table's output shapes.
    channels = {"sepconv1": (3, 16), "sepconv2": (16, 16), "sepconv3": (16, 32),
                "sepconv4": (32, 32), "sepconv5": (32, 64), "sepconv6": (64, 64),
                "sepconv7": (64, 64)}
    for name, (c_in, c_out) in channels.items():
        assert counts[name] == _keras_separable_params(c_in, c_out), name
    for name, row in BN_ROWS.items():
        layer, shape, params = _table(row)
        assert layer == "BatchNormalization"
        assert counts[name] == params == 4 * shape[-1], name  # gamma, beta, mean, var

    # Consistent rows: the model has exactly the printed number.
    for name in ("sepconv1", "sepconv2", "sepconv3", "sepconv4", "sepconv7"):
        layer, _, params = _table(SEPCONV_ROWS[name])
        assert layer == "SeparableConv2D" and counts[name] == params, name
    assert _table(21) == ("Dense", (2,), 2002) and counts["logits"] == 2002

    # Row 13 (10x10x32 -> 8x8x64) prints 64, impossible for 64 filters with a bias (the
    # bias alone is 64, the pointwise kernel 32*64 more): it has 2400, printed on row 14.
    assert _table(13)[2] == 64 and counts["sepconv5"] == 2400 == _table(14)[2]
    # Row 14 (8x8x64 -> 8x8x64) prints 2400, the count for 32 input channels; with 64 it
    # is 4736, the same as row 16's (4x4x64 -> 2x2x64) printed and consistent 4736.
    assert counts["sepconv6"] == 4736 == _table(16)[2]
    # Rows 19-20: Flatten has no parameters and Dense(64 -> 1000) has 65000; the table
    # prints them swapped.
    assert _table(19) == ("Flatten", (64,), 65000) and _table(20) == ("Dense", (1000,), 0)
    assert counts["fc"] == 64 * 1000 + 1000 == 65000
    assert set(counts) == {*SEPCONV_ROWS, *BN_ROWS, "fc", "logits"}

    table_total = sum(params for _, _, params in ELAZHARI_TABLE1)
    assert table_total == 77317
    assert sum(counts.values()) == 81989 == table_total + (2400 - 64) + (4736 - 2400)


def test_output_shapes_match_table1_except_row_6():
    module = ElAzhariCNN(num_classes=2)

    def run(x):
        variables = module.init(jax.random.key(0), x)
        return module.apply(variables, x, capture_intermediates=True,
                            mutable=["intermediates"])

    (logits, feats), state = jax.eval_shape(run, jax.ShapeDtypeStruct((1, 200, 200, 3),
                                                                      jnp.float32))
    inter = state["intermediates"]
    got = {name: inter[name]["__call__"][0].shape[1:] for name in SEPCONV_ROWS}
    for name, row in SEPCONV_ROWS.items():
        want = _table(row)[1]
        if row == 6:
            # Printed 48x48x32, but the next 2x2 max-pool prints 23x23, which needs 46 (or
            # 47): a valid conv (48 -> 46 -> 23) keeps every later row of the table.
            assert want == (48, 48, 32) and _table(7)[1] == (23, 23, 32)
            assert got[name] == (46, 46, 32)
        else:
            assert got[name] == want, name
    taps = {"stem": 2, "stage1": 5, "stage2": 8, "stage3": 12, "stage4": 15, "stage5": 18,
            "pooled": 19, "pre_logits": 20}
    for name, row in taps.items():
        assert feats[name].shape[1:] == _table(row)[1], name
    assert logits.shape == (1, 2)


def test_input_size_limits():
    module = ElAzhariCNN(num_classes=2)
    # The valid convs and floor pools need 190 px: 190 -> ... -> 1 x 1 at stage5.
    out = jax.eval_shape(functools.partial(module.init_with_output, jax.random.key(0)),
                         jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3),
                                              jnp.float32))
    assert out[0][1]["stage5"].shape == (1, 1, 1, 64)
    with pytest.raises(ValueError, match="at least 190"):
        module.init(jax.random.key(0), jnp.zeros((1, 189, 200, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        module.init(jax.random.key(0), jnp.zeros((1, 200, 200, 1)))


def _separable_reference(x, dw, pw, bias, padding):
    """float64 loops: Keras SeparableConv2D (depth multiplier 1, stride 1)."""
    x = np.asarray(x, np.float64)
    k = dw.shape[0]
    if padding == "same":
        x = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    n, h, w, c = x.shape
    oh, ow = h - k + 1, w - k + 1
    depth = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            depth[:, i, j, :] = np.einsum("nabc,abc->nc", x[:, i:i + k, j:j + k, :],
                                          dw[:, :, 0, :])
    return np.einsum("nhwc,cd->nhwd", depth, pw[0, 0]) + bias


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_separable_conv_matches_loop_reference(padding):
    layer = SeparableConv2D(5, 3, padding, precision="highest")
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 4))
    variables = layer.init(jax.random.key(2), x)
    params = jax.tree.map(np.asarray, variables["params"])
    # Keras' layout: one bias, on the pointwise conv; none on the depthwise one.
    assert set(traverse_util.flatten_dict(params)) == {
        ("depthwise", "kernel"), ("pointwise", "kernel"), ("pointwise", "bias")}
    bias = np.asarray(jax.random.normal(jax.random.key(3), (5,)))  # init is zeros
    params["pointwise"]["bias"] = bias
    got = jax.jit(layer.apply)({"params": params}, x)
    want = _separable_reference(np.asarray(x), params["depthwise"]["kernel"],
                                params["pointwise"]["kernel"], bias, padding)
    assert got.shape == want.shape == ((2, 7, 6, 5) if padding == "same" else (2, 5, 4, 5))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_keras_initialisers():
    variables = get_backbone("elazhari_cnn", num_classes=2).init(jax.random.key(0))
    p = variables["params"]
    assert not np.any(np.asarray(p["sepconv3"]["pointwise"]["bias"]))
    assert not np.any(np.asarray(p["fc"]["bias"]))
    # glorot_uniform: U(+-sqrt(6 / (fan_in + fan_out))); Dense 64 -> 1000.
    kernel = np.asarray(p["fc"]["kernel"])
    bound = np.sqrt(6.0 / (64 + 1000))
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.05)


def _tiny_dataset(n, size, seed=0) -> Dataset:
    """Two classes that differ in brightness (as tests/train/test_loop.py's)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int32)
    images = rng.integers(0, 120, (n, size, size, 3)).astype(np.uint8)
    images[labels == 1] += 100
    return Dataset(images=images, labels=labels, groups=None,
                   ids=tuple(str(i) for i in range(n)), class_names=("a", "b"), source="tiny")


def test_trains_from_scratch_and_loss_falls(tmp_path):
    # 200 px, not the suite's usual 32-64: the architecture's valid convs need >= 190 px
    # (see test_input_size_limits). The model is small (~10 MFLOP per image), so 16 images
    # x 4 epochs stay cheap.
    config = TrainConfig("elazhari_cnn", strategy="scratch", epochs=4, batch_size=8,
                         learning_rate=1e-3, normalization="backbone",
                         augment=AugmentConfig(enabled=False))
    result = train_and_evaluate(config, tmp_path, train=_tiny_dataset(16, 200),
                                test=_tiny_dataset(8, 200, seed=1), progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    losses = [row["train_loss"] for row in history]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    assert result["epochs_run"] == 4 and result["stop_reason"] is None
    assert 0.0 <= result["test_accuracy"] <= 1.0
    trained = traverse_util.flatten_dict(load_variables(tmp_path / "model.msgpack"))
    assert trained[("params", "logits", "kernel")].shape == (1000, 1)  # binary: one sigmoid
    # Scratch trains every layer: each constant-initialised leaf (biases 0, BatchNorm
    # scale 1) has moved, in the first block as in the head.
    constant = {k: v for k, v in trained.items()
                if k[0] == "params" and k[-1] in ("bias", "scale")}
    assert len(constant) == 7 + 4 * 2 + 2
    for key, value in constant.items():
        start = 1.0 if key[-1] == "scale" else 0.0
        assert np.any(value != start), key


def test_dropout_acts_in_training_with_its_rng():
    module = ElAzhariCNN(num_classes=1, dropout=0.5)
    x = jax.random.uniform(jax.random.key(1), (4, 200, 200, 3))
    variables = jax.jit(module.init)(jax.random.key(0), x)

    @jax.jit
    def train_logits(key):
        return module.apply(variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": key})[0][0]

    np.testing.assert_array_equal(train_logits(jax.random.key(2)), train_logits(jax.random.key(2)))
    assert not np.array_equal(train_logits(jax.random.key(2)), train_logits(jax.random.key(3)))
    with pytest.raises(flax.errors.InvalidRngError):
        module.apply(variables, x, train=True, mutable=["batch_stats"])
