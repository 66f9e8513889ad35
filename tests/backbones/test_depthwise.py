"""featsim.backbones.depthwise: values and hand-written gradients against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featsim.backbones import depthwise
from featsim.backbones.depthwise import depthwise_conv

# (x shape, kernel size, strides, padding): odd and even sizes, TF SAME's (0, 1), 5x5, no
# padding, padding wider than the kernel reach, unequal strides.
CASES = [
    ((2, 9, 9, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 10, 9, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 11, 10, 2), (3, 3), (2, 2), ((0, 1), (0, 1))),
    ((3, 12, 12, 5), (5, 5), (2, 2), ((2, 2), (2, 2))),
    ((2, 8, 7, 3), (5, 5), (1, 1), ((2, 2), (2, 2))),
    ((2, 7, 8, 2), (3, 3), (1, 1), ((0, 0), (0, 0))),
    ((1, 6, 6, 2), (3, 3), (1, 1), ((3, 0), (1, 2))),
    ((2, 9, 10, 3), (3, 5), (2, 1), ((1, 1), (2, 2))),
    ((1, 13, 13, 2), (3, 3), (3, 3), ((1, 1), (1, 1))),
]


def _reference(x, k, strides, padding, g):
    """``(y, dx, dk)`` of ``L = sum(y * g)`` by direct float64 loops over the taps."""
    (top, bottom), (left, right) = padding
    sh, sw = strides
    n, h, w, c = x.shape
    kh, kw, _ = k.shape
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh = (h + top + bottom - kh) // sh + 1
    ow = (w + left + right - kw) // sw + 1
    y = np.zeros((n, oh, ow, c))
    dxp = np.zeros_like(xp)
    dk = np.zeros_like(k)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + (oh - 1) * sh + 1, sh)
            cols = slice(j, j + (ow - 1) * sw + 1, sw)
            y += xp[:, rows, cols] * k[i, j]
            dxp[:, rows, cols] += g * k[i, j]
            dk[i, j] = np.sum(xp[:, rows, cols] * g, axis=(0, 1, 2))
    return y, dxp[:, top:top + h, left:left + w], dk


def _check(shape, ksize, strides, padding, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    k = rng.normal(size=(*ksize, shape[-1]))
    y_ref, _, _ = _reference(x, k, strides, padding, np.zeros(1))
    g = rng.normal(size=y_ref.shape)
    y_ref, dx_ref, dk_ref = _reference(x, k, strides, padding, g)

    def loss(x, k):
        return jnp.sum(depthwise_conv(x, k, strides, padding) * g.astype(np.float32))

    x32, k32 = jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32)
    y = jax.jit(depthwise_conv, static_argnums=(2, 3))(x32, k32, strides, padding)
    dx, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x32, k32)
    for got, ref in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5,
                                   atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("shape,ksize,strides,padding", CASES)
def test_value_and_gradients_match_float64_loops(shape, ksize, strides, padding):
    _check(shape, ksize, strides, padding)


@pytest.mark.parametrize("shape,ksize,strides,padding", [CASES[1], CASES[3]])
def test_cpu_kernel_gradient_in_batch_slices(monkeypatch, shape, ksize, strides, padding):
    # A slice budget of ~1 padded image forces the lax.scan over slices of the batch (the CPU
    # path); with 2 and 3 images it runs 2 and 3 slices.
    monkeypatch.setattr(depthwise, "CPU_SLICE_BYTES", 1)
    jax.clear_caches()
    try:
        _check(shape, ksize, strides, padding, seed=1)
    finally:
        jax.clear_caches()


def test_second_order_gradient_matches_autodiff_of_the_plain_form():
    # Differentiating the hand-written backward pass again (e.g. a gradient penalty) gives
    # what JAX's autodiff of the plain shifted sum gives.
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3)), jnp.float32)
    padding, strides = ((1, 1), (1, 1)), (2, 2)

    def plain(x, k):
        xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
        return depthwise._shifted_sum(xp, k, 4, 4, strides)

    def penalty(conv):
        return lambda k: jnp.sum(jax.grad(lambda x: jnp.sum(conv(x, k) ** 3))(x) ** 2)

    ours = jax.grad(penalty(lambda x, k: depthwise_conv(x, k, strides, padding)))(k)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(jax.grad(penalty(plain))(k)),
                               rtol=1e-4)
