"""ShuffleNetV2 x1.0: equality with a torch copy of torchvision's module tree, heads, shuffle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featsim.backbones import convert_state_dict, get_backbone, list_backbones
from featsim.backbones.preprocessing import TORCHVISION_IMAGENET
from featsim.backbones.shufflenet import (
    SHUFFLENET_V2_KEYS,
    ShuffleNetV2,
    ShuffleUnit,
    channel_shuffle,
)

from ._helpers import rel_err

FEATURES = ("stem", "stage2", "stage3", "stage4", "conv5", "pre_logits")
# float32 end to end; measured errors are ~1e-6 (printed with -s).
TOL = 1e-4


def _shapes(bb, size, batch=2):
    """``((logits, features), variables)`` as shapes, from one trace of ``init``."""
    return jax.eval_shape(
        functools.partial(bb.module.init_with_output, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
    )


# ------------------------------------------------------------------ no torch needed


def test_registered():
    assert "shufflenet_v2_x1_0" in list_backbones()
    bb = get_backbone("shufflenet_v2_x1_0")
    assert bb.preprocessing == TORCHVISION_IMAGENET
    # torchvision's ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1 url; torch.hub checks the
    # 5666bf0f80 prefix against the file's SHA-256.
    assert bb.weights.filename == "shufflenetv2_x1-5666bf0f80.pth"
    assert bb.weights.url == "https://download.pytorch.org/models/shufflenetv2_x1-5666bf0f80.pth"


def test_channel_shuffle_matches_torch_definition():
    # torch: view(N, g, C/g, H, W) -> transpose(1, 2) -> flatten; in NHWC channel g*C/g + j
    # goes to j*g + g.
    x = np.arange(2 * 3 * 1 * 12, dtype=np.float32).reshape(2, 3, 1, 12)
    want = x.reshape(2, 3, 1, 3, 4).swapaxes(3, 4).reshape(2, 3, 1, 12)
    np.testing.assert_array_equal(channel_shuffle(x, 3), want)
    np.testing.assert_array_equal(
        channel_shuffle(x, 2)[0, 0, 0], [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]
    )
    with pytest.raises(ValueError, match="divisible by groups=5"):
        channel_shuffle(x, 5)


def test_feature_names_shapes_and_parameters():
    # 97 -> conv 49 -> pool 25 -> 13 -> 7 -> 4: odd sizes at every stride.
    (logits, feats), variables = _shapes(get_backbone("shufflenet_v2_x1_0"), 97)
    assert sorted(feats) == sorted(FEATURES) and logits.shape == (2, 1000)
    assert feats["stem"].shape == (2, 25, 25, 24)
    assert feats["stage2"].shape == (2, 13, 13, 116)
    assert feats["stage3"].shape == (2, 7, 7, 232)
    assert feats["stage4"].shape == (2, 4, 4, 464)
    assert feats["conv5"].shape == (2, 4, 4, 1024)
    assert feats["pre_logits"].shape == (2, 1024)
    # torchvision's documented num_params for ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1.
    params = jax.tree.leaves(variables["params"])
    assert sum(int(np.prod(p.shape)) for p in params) == 2_278_604


@pytest.mark.parametrize("num_classes", [1, None])
def test_heads(num_classes):
    bb = get_backbone("shufflenet_v2_x1_0", num_classes=num_classes, dtype=jnp.bfloat16)
    (logits, feats), variables = _shapes(bb, 64, batch=3)
    assert feats["conv5"].dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    if num_classes:
        assert variables["params"]["fc"]["kernel"].shape == (1024, 1)
        assert logits.shape == (3, 1) and logits.dtype == jnp.bfloat16
    else:
        assert "fc" not in variables["params"] and logits is None


def test_bad_arguments():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"NHWC input \[N, H, W, 3\]"):
        jax.eval_shape(ShuffleNetV2().init, jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="3 positive ints"):
        jax.eval_shape(ShuffleNetV2(stages_repeats=(4, 8)).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="5 positive ints"):
        jax.eval_shape(ShuffleNetV2(stages_out_channels=(24, 116)).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="stride-1 unit needs"):
        jax.eval_shape(ShuffleUnit(features=16).init, jax.random.key(0), jnp.zeros((1, 8, 8, 24)))


# ----------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is the reference for ShuffleNet equivalence")


@pytest.fixture(scope="module")
def ref(torch):
    from . import torch_reference_mobile

    return torch_reference_mobile


def _to_torch(torch, x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _reference(torch, ref, *args):
    torch.manual_seed(0)
    model = ref.ShuffleNetV2(*args) if args else ref.ARCHS["shufflenet_v2_x1_0"]()
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(8, 3, 64, 64, generator=generator)
    return ref.calibrate_batchnorm(model, calibration, generator)


@pytest.fixture(scope="module")
def converted(torch, ref):
    model = _reference(torch, ref)
    bb = get_backbone("shufflenet_v2_x1_0")
    # A random state dict in torchvision's layout, converted by the shared code.
    variables = convert_state_dict(
        ref.state_dict_numpy(model), bb.abstract_variables(), mapping=SHUFFLENET_V2_KEYS
    )
    return model, bb, variables


@pytest.mark.parametrize("size", [224, 97])
def test_matches_torch_reference(converted, size, torch, ref, record_property):
    model, bb, variables = converted
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        want_logits, want = model.tapped(_to_torch(torch, x))
    logits, feats = jax.jit(functools.partial(bb.module.apply, train=False))(variables, x)
    assert sorted(feats) == sorted(FEATURES) and logits.dtype == jnp.float32
    errors = {k: rel_err(feats[k], ref.to_nhwc(want[k])) for k in FEATURES}
    errors["logits"] = rel_err(logits, want_logits.numpy())
    record_property("rel_errors", errors)
    print(f"\nshufflenet_v2_x1_0 @ {size}: max rel err {max(errors.values()):.2e}  {errors}")
    assert max(errors.values()) < TOL, errors


def test_train_mode_step_matches_torch(torch, ref):
    # Batch statistics in the forward pass and torch's running-stat update in every BatchNorm,
    # both branches of the stride-2 units and a stride-1 unit included. A narrow four-unit
    # ShuffleNetV2 keeps the compile cheap.
    repeats, channels = (2, 1, 1), (8, 16, 32, 64, 128)
    model = _reference(torch, ref, list(repeats), list(channels)).train()
    bb = get_backbone("shufflenet_v2_x1_0", stages_repeats=repeats, stages_out_channels=channels)
    template = bb.abstract_variables()
    variables = convert_state_dict(
        ref.state_dict_numpy(model), template, mapping=SHUFFLENET_V2_KEYS
    )
    # Off the calibration distribution, so every running statistic has to move.
    x = (np.random.default_rng(0).normal(size=(4, 64, 64, 3)) * 2 + 0.5).astype(np.float32)

    train = jax.jit(functools.partial(bb.module.apply, train=True, mutable=["batch_stats"]))
    (logits, feats), state = train(variables, x)
    want_logits, want = model.tapped(_to_torch(torch, x))
    assert rel_err(logits, want_logits.detach().numpy()) < TOL
    assert rel_err(feats["stage2"], ref.to_nhwc(want["stage2"])) < TOL

    updated = convert_state_dict(ref.state_dict_numpy(model), template, mapping=SHUFFLENET_V2_KEYS)
    got_stats = dict(jax.tree.leaves_with_path(state["batch_stats"]))
    want_stats = dict(jax.tree.leaves_with_path(updated["batch_stats"]))
    # conv1, conv5, 3 stride-2 units x 5 BNs, 1 stride-1 unit x 3 BNs; mean and var each.
    assert len(got_stats) == len(want_stats) == 2 * (2 + 3 * 5 + 3)
    before = dict(jax.tree.leaves_with_path(variables["batch_stats"]))
    # Most statistics move (a mean behind BN -> conv without ReLU is input-independent).
    moved = [not np.allclose(got, before[path]) for path, got in got_stats.items()]
    assert sum(moved) > 0.75 * len(moved), sum(moved)
    for path, got in got_stats.items():
        np.testing.assert_allclose(got, want_stats[path], rtol=1e-4, atol=1e-5, err_msg=str(path))
