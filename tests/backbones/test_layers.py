"""Layers against hand-computed values, NumPy references and (when installed) torch."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featsim.backbones import layers

from ._helpers import rel_err

# (size, kernel, stride, padding, ceil_mode) -> PyTorch's output length, worked by hand from
# out = floor((size + 2p - k + (s - 1 if ceil)) / s) + 1, minus 1 when the last window
# would start past size + p.
POOL_SIZES = [
    ((112, 3, 2, 1, False), 56),  # ResNet stem at 224
    ((49, 3, 2, 1, False), 25),  # ResNet stem at 97
    ((6, 3, 2, 0, False), 2),
    ((6, 3, 2, 0, True), 3),  # ceil_mode adds the overhanging window
    ((5, 2, 2, 1, True), 3),  # floor((5+2-2+1)/2)+1 = 4, but window 4 starts at 6 >= 5+1
    ((7, 3, 3, 1, True), 3),
    ((147, 3, 2, 0, True), 73),  # Inception v3 / GoogLeNet style
]


@pytest.mark.parametrize(("args", "expected"), POOL_SIZES)
def test_pool_output_size_matches_torch_rule(args, expected):
    size, k, s, p, ceil = args
    assert layers.pool_output_size(size, k, s, p, ceil_mode=ceil) == expected


def _np_max_pool(x, k, s, p, ceil):
    """Naive NHWC max pool with PyTorch semantics (-inf padding, torch's output size)."""
    n, h, w, c = x.shape
    oh = layers.pool_output_size(h, k, s, p, ceil_mode=ceil)
    ow = layers.pool_output_size(w, k, s, p, ceil_mode=ceil)
    out = np.empty((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - p, j * s - p
            win = x[:, max(r0, 0) : min(r0 + k, h), max(c0, 0) : min(c0 + k, w)]
            out[:, i, j] = win.max(axis=(1, 2))
    return out


@pytest.mark.parametrize(("size", "k", "s", "p", "ceil"), [a for a, _ in POOL_SIZES[1:6]])
def test_max_pool_matches_naive_reference(size, k, s, p, ceil):
    x = np.random.default_rng(0).normal(size=(2, size, size + 1, 3)).astype(np.float32)
    got = jax.jit(
        functools.partial(layers.max_pool, kernel_size=k, stride=s, padding=p, ceil_mode=ceil)
    )(x)
    np.testing.assert_array_equal(np.asarray(got), _np_max_pool(x, k, s, p, ceil))


def test_pool_rejects_torch_invalid_padding():
    with pytest.raises(ValueError, match="at most half"):
        layers.max_pool(jnp.zeros((1, 8, 8, 1)), 3, stride=2, padding=2)


def test_global_avg_pool_shape_and_value():
    x = jnp.arange(2 * 3 * 5 * 4, dtype=jnp.float32).reshape(2, 3, 5, 4)
    y = layers.global_avg_pool(x)
    assert y.shape == (2, 4) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, np.asarray(x).mean(axis=(1, 2)), rtol=1e-6)


def test_flax_momentum():
    assert layers.flax_momentum(0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="torch_momentum"):
        layers.flax_momentum(1.5)


def _bn_train_step(x, momentum, epsilon=1e-5):
    bn = layers.BatchNorm(use_running_average=False, momentum=momentum, epsilon=epsilon)
    variables = bn.init(jax.random.key(0), x)
    return bn.apply(variables, x, mutable=["batch_stats"])


def test_batchnorm_train_updates_running_stats_like_torch_numpy_reference():
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(2, 4, 5, 6)).astype(np.float32)
    y, state = _bn_train_step(x, momentum=layers.flax_momentum(0.1))
    flat = x.reshape(-1, 6).astype(np.float64)
    # torch: running = 0.9 * running + 0.1 * batch, with the *unbiased* variance; the
    # initial running stats are mean 0, var 1.
    np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        state["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5
    )
    # The batch itself is normalised with the biased variance.
    want = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 6), want, rtol=1e-4, atol=1e-5)


def test_batchnorm_needs_two_values_per_channel_in_training():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _bn_train_step(np.ones((1, 1, 1, 3), np.float32), momentum=0.9)


def test_batchnorm_keeps_float32_stats_under_bfloat16():
    bn = layers.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    x = jnp.ones((2, 3, 3, 4), jnp.bfloat16)
    variables = bn.init(jax.random.key(0), x)
    y, state = bn.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert state["batch_stats"]["var"].dtype == jnp.float32


def test_batchnorm_synchronised_over_axis_name_matches_whole_batch():
    # vmap stands in for pmap: per-"device" halves with pmean must equal the whole batch.
    x = np.random.default_rng(2).normal(size=(2, 3, 4, 4, 5)).astype(np.float32)
    bn = layers.BatchNorm(use_running_average=False, axis_name="batch")
    variables = layers.BatchNorm(use_running_average=False).init(jax.random.key(0), x[0])

    def step(xi):
        return bn.apply(variables, xi, mutable=["batch_stats"])

    y, state = jax.vmap(step, axis_name="batch")(x)
    y_all, state_all = _bn_train_step(x.reshape(6, 4, 4, 5), momentum=0.9)
    np.testing.assert_allclose(np.asarray(y).reshape(6, 4, 4, 5), y_all, rtol=1e-5, atol=1e-5)
    for leaf in ("mean", "var"):
        np.testing.assert_allclose(
            state["batch_stats"][leaf][0], state_all["batch_stats"][leaf], rtol=1e-5
        )


# ----------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is the reference for layer equivalence")


def _nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


POOL_CASES = [
    # (h, w, kernel, stride, padding, ceil_mode)
    (9, 10, 3, 2, 1, False),
    (9, 10, 3, 2, 1, True),
    (8, 8, 3, 2, 0, True),
    (7, 11, 2, 2, 1, True),
    (10, 10, 3, 3, 1, True),
    (35, 35, 3, 2, 0, True),
    (13, 12, 3, 1, 1, False),
    (6, 6, 2, 2, 0, False),
]


@pytest.mark.parametrize(("h", "w", "k", "s", "p", "ceil"), POOL_CASES)
def test_max_pool_matches_torch(torch, h, w, k, s, p, ceil):
    x = np.random.default_rng(3).normal(size=(2, h, w, 3)).astype(np.float32)
    want = torch.nn.functional.max_pool2d(
        torch.from_numpy(_nchw(x)), k, stride=s, padding=p, ceil_mode=ceil
    )
    got = layers.max_pool(jnp.asarray(x), k, stride=s, padding=p, ceil_mode=ceil)
    np.testing.assert_array_equal(np.asarray(got), want.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize(("h", "w", "k", "s", "p", "ceil"), POOL_CASES)
def test_avg_pool_matches_torch(torch, h, w, k, s, p, ceil, count_include_pad):
    x = np.random.default_rng(4).normal(size=(2, h, w, 3)).astype(np.float32)
    want = torch.nn.functional.avg_pool2d(
        torch.from_numpy(_nchw(x)),
        k,
        stride=s,
        padding=p,
        ceil_mode=ceil,
        count_include_pad=count_include_pad,
    )
    got = layers.avg_pool(
        jnp.asarray(x), k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=count_include_pad
    )
    np.testing.assert_allclose(
        np.asarray(got), want.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6
    )


CONV_CASES = [
    # (in, out, kernel, stride, padding, dilation, groups, bias, size)
    (3, 8, 7, 2, 3, 1, 1, False, 23),  # ResNet stem on an odd input
    (8, 8, 3, 2, 1, 1, 4, False, 10),  # grouped, strided, even input ("SAME" would differ)
    (6, 6, 3, 1, 1, 1, 6, True, 9),  # depthwise with bias
    (4, 5, 3, 1, 2, 2, 1, True, 9),  # dilated
    (4, 6, 1, 2, 0, 1, 1, False, 9),  # strided 1x1 shortcut
    (3, 4, (1, 7), 1, (0, 3), 1, 1, True, 12),  # Inception-style asymmetric kernel
]


@pytest.mark.parametrize(("cin", "cout", "k", "s", "p", "d", "g", "bias", "size"), CONV_CASES)
def test_conv2d_matches_torch(torch, cin, cout, k, s, p, d, g, bias, size):
    ref = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias)
    x = np.random.default_rng(5).normal(size=(2, size, size + 2, cin)).astype(np.float32)
    conv = layers.conv2d(cout, k, stride=s, padding=p, dilation=d, groups=g, use_bias=bias)
    params = {"kernel": ref.weight.detach().numpy().transpose(2, 3, 1, 0)}
    if bias:
        params["bias"] = ref.bias.detach().numpy()
    got = conv.apply({"params": params}, jnp.asarray(x))
    with torch.no_grad():
        want = ref(torch.from_numpy(_nchw(x))).numpy().transpose(0, 2, 3, 1)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@pytest.mark.parametrize("train", [False, True])
def test_batchnorm_matches_torch(torch, eps, train):
    gen = torch.Generator().manual_seed(0)
    ref = torch.nn.BatchNorm2d(5, eps=eps, momentum=0.1)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(5, generator=gen) + 0.5)
        ref.bias.copy_(torch.randn(5, generator=gen))
        ref.running_mean.copy_(torch.randn(5, generator=gen))
        ref.running_var.copy_(torch.rand(5, generator=gen) + 0.5)
    ref.train(train)
    x = np.random.default_rng(6).normal(1.0, 2.0, size=(3, 4, 6, 5)).astype(np.float32)
    variables = {
        "params": {"scale": ref.weight.detach().numpy(), "bias": ref.bias.detach().numpy()},
        "batch_stats": {"mean": ref.running_mean.numpy(), "var": ref.running_var.numpy()},
    }
    bn = layers.batch_norm(train=train, epsilon=eps, momentum=layers.flax_momentum(0.1))
    got, state = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    with torch.no_grad():
        want = ref(torch.from_numpy(_nchw(x))).numpy().transpose(0, 2, 3, 1)
    assert rel_err(got, want) < 1e-5
    np.testing.assert_allclose(state["batch_stats"]["mean"], ref.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(state["batch_stats"]["var"], ref.running_var.numpy(), rtol=1e-5)


def test_flax_stock_batchnorm_would_not_match_torch(torch):
    # Documents why layers.BatchNorm exists: flax.linen.BatchNorm updates the running
    # variance with the biased batch variance, so even with the right momentum it drifts
    # from torch by a factor n / (n - 1) on the batch term.
    x = np.random.default_rng(7).normal(size=(2, 2, 2, 3)).astype(np.float32)
    stock = nn.BatchNorm(use_running_average=False, momentum=0.9)
    v = stock.init(jax.random.key(0), x)
    _, stock_state = stock.apply(v, x, mutable=["batch_stats"])
    _, ours = _bn_train_step(x, momentum=0.9)
    ref = torch.nn.BatchNorm2d(3, momentum=0.1).train()
    ref(torch.from_numpy(_nchw(x)))
    want = ref.running_var.numpy()
    np.testing.assert_allclose(ours["batch_stats"]["var"], want, rtol=1e-5)
    assert not np.allclose(stock_state["batch_stats"]["var"], want, rtol=1e-3)
