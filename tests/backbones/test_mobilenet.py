"""MobileNetV2 and MobileNetV1: equality with torch references, heads, padding, dtypes.

MobileNetV2 is compared with a plain-torch copy of torchvision's module tree (same state-dict
keys); MobileNetV1 with a plain-torch copy of TF-slim's, TensorFlow ``SAME`` padding emulated
with ``F.pad``. Both load the reference's random state dict through ``convert_state_dict``.
The real TF.js MobileNetV1 weights are tested in ``test_tfjs.py``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from featsim.backbones import convert_state_dict, get_backbone, list_backbones, load_pretrained
from featsim.backbones.layers import DepthwiseConv, tf_same_padding
from featsim.backbones.mobilenet import (
    MOBILENET_V1_KEYS,
    MOBILENET_V1_TF,
    MOBILENET_V2_KEYS,
    MobileNetV1,
    MobileNetV2,
    make_divisible,
)
from featsim.backbones.preprocessing import TORCHVISION_IMAGENET

from ._helpers import rel_err

FEATURES = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "pre_logits")
# float32 end to end; measured errors are ~1e-6 (printed with -s).
TOL = 1e-4


def _apply(module, *, train=False):
    if train:
        return jax.jit(functools.partial(module.apply, train=True, mutable=["batch_stats"]))
    return jax.jit(functools.partial(module.apply, train=False))


def _shapes(bb, size, batch=2):
    """``((logits, features), variables)`` as shapes, from one trace of ``init``."""
    return jax.eval_shape(
        functools.partial(bb.module.init_with_output, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
    )


# ------------------------------------------------------------------ no torch needed


def test_registered_names_and_recipes():
    assert {"mobilenet_v2", "mobilenet_v1", "mobilenet_v1_025"} <= set(list_backbones())
    v2 = get_backbone("mobilenet_v2")
    assert v2.preprocessing == TORCHVISION_IMAGENET
    assert v2.weights.filename == "mobilenet_v2-b0353104.pth"
    assert v2.weights.url.endswith("/mobilenet_v2-b0353104.pth")
    for name, width in (("mobilenet_v1", 1.0), ("mobilenet_v1_025", 0.25)):
        bb = get_backbone(name, num_classes=1001)
        assert bb.module.width_multiplier == width and bb.module.padding == "tf_same"
        assert bb.preprocessing == MOBILENET_V1_TF and bb.weights is None
    assert MOBILENET_V1_TF.scaling == "[-1,1]"
    assert (MOBILENET_V1_TF.input_size, MOBILENET_V1_TF.resize_size) == (224, 256)


@pytest.mark.parametrize(
    ("value", "expected"),
    # torchvision's _make_divisible on channel counts of its width multipliers.
    [(32.0, 32), (1280.0, 1280), (24 * 0.5, 16), (16 * 0.5, 8), (24 * 0.35, 8), (96 * 0.75, 72),
     (160 * 0.35, 56), (32 * 1.4, 48), (1280 * 1.4, 1792)],
)  # fmt: skip
def test_make_divisible(value, expected):
    assert make_divisible(value, 8) == expected


def test_tf_same_padding_matches_tensorflow_rule():
    # Hand-checked against TF's rule: out = ceil(n / s), extra pixel after.
    assert tf_same_padding(224, 3, 2) == (0, 1)
    assert tf_same_padding(225, 3, 2) == (1, 1)
    assert tf_same_padding(97, 3, 2) == (1, 1)
    assert tf_same_padding(112, 3, 1) == (1, 1)
    assert tf_same_padding(224, 7, 2) == (2, 3)
    assert tf_same_padding(7, 1, 1) == (0, 0)
    assert tf_same_padding(2, 3, 2) == (0, 1)
    # lax's "SAME" is TF's SAME: the same split for every small geometry.
    for size in range(1, 20):
        for k in (1, 2, 3, 5):
            for s in (1, 2, 3):
                for d in (1, 2):
                    want = lax.padtype_to_pads((size,), ((k - 1) * d + 1,), (s,), "SAME")[0]
                    assert tf_same_padding(size, k, s, d) == tuple(want), (size, k, s, d)
    with pytest.raises(ValueError, match="stride"):
        tf_same_padding(10, 3, 0)


@pytest.mark.parametrize(
    ("size", "stride", "padding", "bias"),
    [(9, 1, ((1, 1), (1, 1)), False), (10, 2, ((0, 1), (1, 0)), True)],
)
def test_depthwise_conv_equals_grouped_conv(size, stride, padding, bias):
    x = np.random.default_rng(0).normal(size=(2, size, size + 2, 6)).astype(np.float32)
    dw = DepthwiseConv(kernel_size=(3, 3), strides=(stride, stride), padding=padding, use_bias=bias)
    grouped = nn.Conv(
        6,
        (3, 3),
        strides=stride,
        padding=padding,
        feature_group_count=6,
        use_bias=bias,
        precision=lax.Precision.HIGHEST,
    )
    variables = grouped.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, dw.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, variables
    )
    if bias:
        variables = {"params": {**variables["params"], "bias": jnp.arange(6.0)}}
    got = jax.jit(dw.apply)(variables, x)
    want = grouped.apply(variables, x)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-6


def test_feature_names_and_shapes():
    # 97 -> 49 -> 25 -> 13 -> 7 -> 4: odd sizes at every stride.
    (logits, feats), _ = _shapes(get_backbone("mobilenet_v2", num_classes=10), 97)
    assert sorted(feats) == sorted(FEATURES) and logits.shape == (2, 10)
    assert feats["stem"].shape == (2, 49, 49, 32)
    assert feats["stage1"].shape == (2, 49, 49, 16)
    assert feats["stage2"].shape == (2, 25, 25, 24)
    assert feats["stage3"].shape == (2, 13, 13, 32)
    assert feats["stage4"].shape == (2, 7, 7, 96)
    assert feats["stage5"].shape == (2, 4, 4, 1280)
    assert feats["pre_logits"].shape == (2, 1280)

    (logits, feats), _ = _shapes(get_backbone("mobilenet_v1_025", num_classes=1001), 97)
    assert sorted(feats) == sorted(FEATURES) and logits.shape == (2, 1001)
    assert feats["stem"].shape == (2, 49, 49, 8)
    assert feats["stage1"].shape == (2, 49, 49, 16)
    assert feats["stage2"].shape == (2, 25, 25, 32)
    assert feats["stage3"].shape == (2, 13, 13, 64)
    assert feats["stage4"].shape == (2, 7, 7, 128)
    assert feats["stage5"].shape == (2, 4, 4, 256)
    assert feats["pre_logits"].shape == (2, 256)


@pytest.mark.parametrize(
    ("name", "head", "width", "num_classes"),
    [
        ("mobilenet_v2", "classifier_1", 1280, 1),
        ("mobilenet_v1", "Logits", 1024, 5),
        ("mobilenet_v2", "classifier_1", 1280, None),
        ("mobilenet_v1_025", "Logits", 256, 0),
    ],
)
def test_heads(name, head, width, num_classes):
    (logits, feats), variables = _shapes(get_backbone(name, num_classes=num_classes), 32, batch=3)
    assert feats["pre_logits"].shape == (3, width)
    if num_classes:
        assert variables["params"][head]["kernel"].shape == (width, num_classes)
        assert logits.shape == (3, num_classes)
    else:
        assert head not in variables["params"]
        assert logits is None


def test_parameter_counts():
    def count(name, **kwargs):
        params = get_backbone(name, **kwargs).abstract_variables()["params"]
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

    # torchvision's documented num_params for MobileNet_V2_Weights.IMAGENET1K_V1.
    assert count("mobilenet_v2") == 3_504_872
    # keras.applications.MobileNet(alpha=1.0): 4,231,976 trainable parameters (1000 classes).
    assert count("mobilenet_v1", num_classes=1000) == 4_231_976
    # The TF.js 0.25 graph's weights: 467,597 numbers minus its 4 scalar/index constants.
    assert count("mobilenet_v1_025", num_classes=1001, folded_bn=True) == 467_593


def test_folded_bn_variant_has_biases_and_no_batch_stats():
    template = get_backbone(
        "mobilenet_v1_025", num_classes=1001, folded_bn=True
    ).abstract_variables()
    assert "batch_stats" not in template
    assert set(template["params"]["Conv2d_3_depthwise"]["conv"]) == {"kernel", "bias"}
    assert template["params"]["Conv2d_3_depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 32)
    bn = get_backbone("mobilenet_v1_025").abstract_variables()
    assert set(bn["params"]["Conv2d_3_depthwise"]) == {"conv", "bn"}
    assert set(bn["params"]["Conv2d_3_depthwise"]["conv"]) == {"kernel"}


def test_bfloat16_dtypes():
    for name in ("mobilenet_v2", "mobilenet_v1_025"):
        bb = get_backbone(name, dtype=jnp.bfloat16)
        (logits, feats), variables = _shapes(bb, 64)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
        assert logits.dtype == jnp.bfloat16
        assert all(f.dtype == jnp.bfloat16 for f in feats.values()), name


def test_bad_arguments():
    for module in (MobileNetV2(), MobileNetV1()):
        with pytest.raises(ValueError, match=r"NHWC input \[N, H, W, 3\]"):
            jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="padding must be one of"):
        jax.eval_shape(
            MobileNetV1(padding="SAME").init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )
    with pytest.raises(ValueError, match="width_multiplier must be > 0"):
        jax.eval_shape(
            MobileNetV1(width_multiplier=0).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )
    with pytest.raises(ValueError, match=r"\(t, c, n, s\) rows"):
        jax.eval_shape(
            MobileNetV2(inverted_residual_setting=((1, 16, 1),)).init,
            jax.random.key(0),
            jnp.zeros((1, 32, 32, 3)),
        )


def test_dropout_needs_rng_only_in_training():
    bb = get_backbone("mobilenet_v1_025", num_classes=3, dropout_rate=0.5)
    template = bb.abstract_variables()
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    train = functools.partial(bb.module.apply, train=True, mutable=["batch_stats"])
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(train, template, x)
    (logits, _), _ = jax.eval_shape(
        functools.partial(train, rngs={"dropout": jax.random.key(0)}), template, x
    )
    assert logits.shape == (2, 3)
    assert _shapes(bb, 32)[0][0].shape == (2, 3)  # eval needs no rng


# ----------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is the reference for MobileNet equivalence")


@pytest.fixture(scope="module")
def ref(torch):
    from . import torch_reference_mobile

    return torch_reference_mobile


def _reference(torch, ref, name, **kwargs):
    torch.manual_seed(0)
    model = ref.ARCHS[name](**kwargs)
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(8, 3, 64, 64, generator=generator)
    return ref.calibrate_batchnorm(model, calibration, generator)


@pytest.fixture(scope="module")
def reference(torch, ref):
    """Builds (once per module) read-only calibrated references; see ``_reference``."""
    cache = {}

    def get(name, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = _reference(torch, ref, name, **kwargs)
        return cache[key]

    return get


def _to_torch(torch, x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _compare(torch, ref, model, module, variables, x):
    with torch.no_grad():
        want_logits, want = model.tapped(_to_torch(torch, x))
    logits, feats = _apply(module)(variables, x)
    assert sorted(feats) == sorted(FEATURES)
    assert logits.dtype == jnp.float32
    errors = {k: rel_err(feats[k], ref.to_nhwc(want[k])) for k in FEATURES}
    errors["logits"] = rel_err(logits, want_logits.numpy())
    return errors


CASES = [("mobilenet_v2", 1000, MOBILENET_V2_KEYS), ("mobilenet_v1_025", 1001, MOBILENET_V1_KEYS)]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def converted(request, ref, reference):
    name, num_classes, mapping = request.param
    model = reference(name, num_classes=num_classes)
    bb = get_backbone(name, num_classes=num_classes)
    # A random state dict in PyTorch layout (the reference's), converted by the shared code.
    variables = convert_state_dict(
        ref.state_dict_numpy(model), bb.abstract_variables(), mapping=mapping
    )
    return name, model, bb, variables


@pytest.mark.parametrize("size", [224, 97])
def test_matches_torch_reference(converted, size, torch, ref, record_property):
    name, model, bb, variables = converted
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    errors = _compare(torch, ref, model, bb.module, variables, x)
    record_property("rel_errors", errors)
    print(f"\n{name} @ {size}: max rel err {max(errors.values()):.2e}  {errors}")
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize(("name", "width"), [("mobilenet_v2", 0.5), ("mobilenet_v2", 1.4)])
def test_width_multipliers_convert_shape_for_shape(torch, ref, name, width):
    # _make_divisible at other widths: every reference tensor must land on a Flax leaf of the
    # same shape (convert_state_dict checks shapes and that nothing is left over).
    model = ref.ARCHS[name](width_mult=width)
    bb = get_backbone(name, width_mult=width)
    variables = convert_state_dict(
        ref.state_dict_numpy(model), bb.abstract_variables(), mapping=MOBILENET_V2_KEYS
    )
    count = sum(v.size for v in jax.tree.leaves(variables["params"]))
    assert count == sum(p.numel() for p in model.parameters())


def test_mobilenet_v1_symmetric_padding_and_width_1(torch, ref):
    # Width 1.0 with PyTorch's symmetric padding. At 96 every stride-2 input is even, where TF's
    # SAME pads (0, 1) (at odd sizes both conventions pad (1, 1)): the TF-padded reference on the
    # same weights differs by far more than the tolerance, so the padding tests have teeth.
    model = _reference(torch, ref, "mobilenet_v1", tf_padding=False)
    bb = get_backbone("mobilenet_v1", num_classes=1001, padding="symmetric")
    variables = convert_state_dict(
        ref.state_dict_numpy(model), bb.abstract_variables(), mapping=MOBILENET_V1_KEYS
    )
    x = np.random.default_rng(5).normal(size=(2, 96, 96, 3)).astype(np.float32)
    errors = _compare(torch, ref, model, bb.module, variables, x)
    print(f"\nmobilenet_v1 symmetric @ 96: max rel err {max(errors.values()):.2e}  {errors}")
    assert max(errors.values()) < TOL, errors

    tf_model = _reference(torch, ref, "mobilenet_v1", tf_padding=True)
    tf_model.load_state_dict(model.state_dict())
    xt = _to_torch(torch, x)
    with torch.no_grad():
        differ = rel_err(tf_model(xt).numpy(), model(xt).numpy())
    assert differ > 100 * TOL, differ


def test_new_head_from_checkpoint_file(ref, reference, tmp_path):
    # The replace-the-head path through the registry: a torchvision-key file on disk loaded
    # with a new 1-output head (skip_head), and headless. Everything but the head must be the
    # checkpoint's, converted exactly as in the equivalence test.
    from safetensors.numpy import save_file

    model = reference("mobilenet_v2", num_classes=1000)
    path = tmp_path / "mobilenet_v2.safetensors"
    state_dict = ref.state_dict_numpy(model)
    save_file(state_dict, str(path))

    one = get_backbone("mobilenet_v2", num_classes=1)
    bb = load_pretrained(one, path=path, skip_head=True, rng=jax.random.key(0))
    headless = get_backbone("mobilenet_v2", num_classes=None, pretrained=True, weights_path=path)
    want = convert_state_dict(
        state_dict, headless.abstract_variables(), mapping=MOBILENET_V2_KEYS, skip_head=True
    )

    head = bb.variables["params"]["classifier_1"]
    assert head["kernel"].shape == (1280, 1) and np.std(head["kernel"]) > 0
    assert "classifier_1" not in headless.variables["params"]
    got = dict(jax.tree.leaves_with_path(bb.variables))
    got_headless = dict(jax.tree.leaves_with_path(headless.variables))
    assert got_headless.keys() == dict(jax.tree.leaves_with_path(want)).keys()
    for key, value in jax.tree.leaves_with_path(want):
        np.testing.assert_array_equal(got.pop(key), value)
        np.testing.assert_array_equal(got_headless[key], value)
    assert len(got) == 2  # only the new head's kernel and bias are left


def test_train_mode_step_matches_torch(torch, ref):
    # Batch statistics in the forward pass and torch's running-stat update (momentum 0.1,
    # unbiased variance) in every BatchNorm: stem, a t=1 block, an expanding block, a residual
    # block and the last conv. A three-block MobileNetV2 keeps the compile cheap.
    setting = ((1, 16, 1, 1), (6, 24, 2, 2))
    model = _reference(torch, ref, "mobilenet_v2", dropout=0.0, setting=setting).train()
    bb = get_backbone("mobilenet_v2", dropout_rate=0.0, inverted_residual_setting=setting)
    template = bb.abstract_variables()
    variables = convert_state_dict(ref.state_dict_numpy(model), template, mapping=MOBILENET_V2_KEYS)
    # Off the calibration distribution, so every running statistic has to move.
    x = (np.random.default_rng(0).normal(size=(4, 64, 64, 3)) * 2 + 0.5).astype(np.float32)

    (logits, feats), state = _apply(bb.module, train=True)(variables, x)
    want_logits, want = model.tapped(_to_torch(torch, x))
    assert rel_err(logits, want_logits.detach().numpy()) < TOL
    assert rel_err(feats["pre_logits"], want["pre_logits"].detach().numpy()) < TOL

    updated = convert_state_dict(ref.state_dict_numpy(model), template, mapping=MOBILENET_V2_KEYS)
    before = dict(jax.tree.leaves_with_path(variables["batch_stats"]))
    got_stats = dict(jax.tree.leaves_with_path(state["batch_stats"]))
    want_stats = dict(jax.tree.leaves_with_path(updated["batch_stats"]))
    assert len(got_stats) == len(want_stats) == 2 * (1 + 2 + 3 + 3 + 1)  # mean, var per BN
    # Most statistics move (a mean behind BN -> conv without ReLU is input-independent).
    moved = [not np.allclose(got, before[path]) for path, got in got_stats.items()]
    assert sum(moved) > 0.75 * len(moved), sum(moved)
    for path, got in got_stats.items():
        np.testing.assert_allclose(got, want_stats[path], rtol=1e-4, atol=1e-5, err_msg=str(path))
