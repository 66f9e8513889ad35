"""VGG-16: equality with a torch reference of torchvision's modules, adaptive pooling, heads."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import featsim.backbones.vgg
from featsim.backbones import convert_state_dict, get_backbone
from featsim.backbones.vgg import TORCHVISION_KEYS, adaptive_avg_pool

from ._helpers import rel_err

FEATURES = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "pooled", "pre_logits")
# float32 end to end; errors measured so far are ~1e-6 (see the report printed with -s).
TOL = 1e-4


def _apply(module, **kwargs):
    return jax.jit(functools.partial(module.apply, **kwargs))


def _flat(tree):
    return traverse_util.flatten_dict(dict(tree))


def _shapes(module, variables, input_shape, dtype=jnp.float32):
    return jax.eval_shape(
        functools.partial(module.apply, train=False),
        variables,
        jax.ShapeDtypeStruct(input_shape, dtype),
    )


def _adaptive_avg_pool_loops(x, out):
    """float64 loops over PyTorch's window formula, independent of the vectorised version."""
    n, h, w, c = x.shape
    y = np.zeros((n, out, out, c))
    for i in range(out):
        h0, h1 = int(np.floor(i * h / out)), int(np.ceil((i + 1) * h / out))
        for j in range(out):
            w0, w1 = int(np.floor(j * w / out)), int(np.ceil((j + 1) * w / out))
            y[:, i, j] = x[:, h0:h1, w0:w1].astype(np.float64).mean(axis=(1, 2))
    return y


# ------------------------------------------------------------------ no torch needed


def test_registered():
    bb = get_backbone("vgg16")
    assert isinstance(bb.module, featsim.backbones.vgg.VGG)
    assert bb.weights.filename == "vgg16-397923af.pth"
    assert bb.weights.url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert bb.preprocessing.input_size == 224 and bb.preprocessing.resize_size == 256


def test_feature_names_and_shapes():
    bb = get_backbone("vgg16", num_classes=10)
    template = bb.abstract_variables()
    assert "batch_stats" not in template
    logits, feats = _shapes(bb.module, template, (2, 97, 97, 3))
    assert sorted(feats) == sorted(FEATURES)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    # 97 -> 48 -> 24 -> 12 -> 6 -> 3 (floor at every pool), then adaptively up to 7x7.
    assert feats["stem"].shape == feats["stage1"].shape == (2, 48, 48, 64)
    assert feats["stage3"].shape == (2, 12, 12, 256)
    assert feats["stage5"].shape == (2, 3, 3, 512)
    assert feats["pooled"].shape == (2, 512 * 7 * 7)
    assert feats["pre_logits"].shape == (2, 4096)


def test_single_output_head_and_no_head():
    template = get_backbone("vgg16", num_classes=1).abstract_variables()
    assert template["params"]["classifier_6"]["kernel"].shape == (4096, 1)
    for num_classes in (None, 0):
        bb = get_backbone("vgg16", num_classes=num_classes)
        template = bb.abstract_variables()
        # The 4096-d fully connected layers stay: they produce pre_logits.
        assert set(template["params"]) >= {"classifier_0", "classifier_3"}
        assert "classifier_6" not in template["params"]
        logits, feats = _shapes(bb.module, template, (2, 64, 64, 3))
        assert logits is None and feats["pre_logits"].shape == (2, 4096)


def test_parameter_count_matches_torchvision():
    # torchvision's documented num_params for the IMAGENET1K_V1 weights.
    params = get_backbone("vgg16").abstract_variables()["params"]
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == 138_357_544


def test_bfloat16_shapes_and_dtypes():
    bb = get_backbone("vgg16", dtype=jnp.bfloat16)
    logits, feats = _shapes(bb.module, bb.abstract_variables(), (1, 64, 64, 3))
    assert logits.dtype == jnp.bfloat16
    assert all(feats[k].dtype == jnp.bfloat16 for k in FEATURES)


def test_rejects_bad_input():
    bb = get_backbone("vgg16")
    with pytest.raises(ValueError, match=r"NHWC input \[N, H, W, 3\]"):
        jax.eval_shape(bb.module.init, jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    # Five 2x2 pools need at least 32 pixels (torchvision's min_size).
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(bb.module.init, jax.random.key(0), jnp.zeros((1, 31, 31, 3)))


@pytest.mark.parametrize(
    "shape",
    [(2, 7, 7, 3), (1, 14, 14, 2), (1, 10, 10, 3), (1, 3, 3, 4), (1, 1, 1, 2), (2, 13, 9, 3)],
)
def test_adaptive_avg_pool_windows(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = jax.jit(adaptive_avg_pool, static_argnums=1)(x, 7)
    assert got.shape == (shape[0], 7, 7, shape[3]) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _adaptive_avg_pool_loops(x, 7), rtol=1e-6, atol=1e-6)
    if shape[1] == 7:
        np.testing.assert_array_equal(got, x)


def test_adaptive_avg_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="rank 4"):
        adaptive_avg_pool(jnp.zeros((7, 7, 3)), 7)
    with pytest.raises(ValueError, match="positive"):
        adaptive_avg_pool(jnp.zeros((1, 7, 7, 3)), (7, 0))


# ----------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="torch is the reference for VGG equivalence")
    # One intra-op thread: on a shared, loaded CPU, OpenMP workers spin-wait for each other
    # and a two-thread forward can cost ten times the CPU time of a one-thread one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(torch):
    from . import torch_reference_vgg

    return torch_reference_vgg


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def converted(torch, ref):
    torch.manual_seed(0)
    model = ref.randomize_biases(ref.ARCHS["vgg16"](), torch.Generator().manual_seed(1)).eval()
    bb = get_backbone("vgg16")
    variables = convert_state_dict(
        ref.state_dict_numpy(model), bb.abstract_variables(), mapping=TORCHVISION_KEYS
    )
    return model, bb, variables


# vgg16 is ~15 GFLOPs an image at 224: one image there, two at the odd size. 97 leaves a
# 3x3 map, which the adaptive pool spreads over 7x7 with overlapping windows.
@pytest.mark.parametrize(("size", "batch"), [(224, 1), (97, 2)])
def test_matches_torchvision_reference(converted, size, batch, torch, ref, record_property):
    model, bb, variables = converted
    x = np.random.default_rng(size).normal(size=(batch, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        want_logits, want = model.tapped(_nchw(torch, x))
    logits, feats = _apply(bb.module, train=False)(variables, x)
    assert sorted(feats) == sorted(FEATURES)
    errors = {k: rel_err(feats[k], ref.to_nhwc(want[k])) for k in FEATURES}
    errors["logits"] = rel_err(logits, want_logits.numpy())
    record_property("rel_errors", errors)
    print(f"\nvgg16 @ {size}: max rel err {max(errors.values()):.2e}  {errors}")
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("shape", [(2, 3, 10, 10), (1, 4, 13, 9), (1, 2, 3, 3), (1, 2, 1, 1)])
def test_adaptive_avg_pool_matches_torch(shape, torch):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.adaptive_avg_pool2d(x, (7, 7)).numpy().transpose(0, 2, 3, 1)
    got = adaptive_avg_pool(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), 7)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_new_single_output_head(converted, ref):
    # Fine-tuning with a sigmoid head: everything but classifier.6 comes from the checkpoint.
    model, _, variables = converted
    bb = get_backbone("vgg16", num_classes=1)
    flat = _flat(bb.abstract_variables())
    new_head = {
        ("params", "classifier_6", "kernel"): np.full((4096, 1), 0.5, np.float32),
        ("params", "classifier_6", "bias"): np.array([0.25], np.float32),
    }
    flat.update(new_head)
    loaded = _flat(
        convert_state_dict(
            ref.state_dict_numpy(model),
            traverse_util.unflatten_dict(flat),
            mapping=TORCHVISION_KEYS,
            skip_head=True,
        )
    )
    want = _flat(variables)
    assert loaded.keys() == want.keys()
    for k, v in loaded.items():
        expected = new_head[k] if k[1] == "classifier_6" else want[k]
        np.testing.assert_array_equal(v, expected, err_msg="/".join(k))
    logits, _ = _shapes(bb.module, traverse_util.unflatten_dict(loaded), (3, 64, 64, 3))
    assert logits.shape == (3, 1)


def test_dropout_only_in_training(converted):
    _, bb, variables = converted
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    _, eval_feats = _apply(bb.module, train=False)(variables, x)
    train = _apply(bb.module, train=True)
    # An "rbg" key: compiling threefry's bit generator costs seconds of CPU per jit here, and
    # what is tested is how the module uses its rng, not the generator.
    rngs = {"dropout": jax.random.key(1, impl="rbg")}
    _, train_feats = train(variables, x, rngs=rngs)
    # No BatchNorm: the conv features do not depend on the mode.
    np.testing.assert_array_equal(train_feats["stage5"], eval_feats["stage5"])
    np.testing.assert_array_equal(train_feats["pooled"], eval_feats["pooled"])
    # Dropout zeroes units that ReLU let through.
    kept = np.mean(np.asarray(train_feats["pre_logits"]) != 0)
    assert kept < 0.75 * np.mean(np.asarray(eval_feats["pre_logits"]) > 0)
    again = train(variables, x, rngs=rngs)[1]["pre_logits"]
    np.testing.assert_array_equal(again, train_feats["pre_logits"])  # explicit rng: reproducible
    other = train(variables, x, rngs={"dropout": jax.random.key(2, impl="rbg")})[1]
    assert not np.allclose(other["pre_logits"], train_feats["pre_logits"])
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        train(variables, x)
