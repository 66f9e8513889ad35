"""A depthwise convolution (one filter per channel) written as shifted multiply-adds, with its
own gradient.

XLA:CPU lowers grouped convolutions (``feature_group_count = C``) to a slow generic loop, and
the automatic gradient of the shifted form is several times its forward pass there: the
kernel gradient's ``kh * kw`` reductions over the whole batch each stream the activations
through memory, and the input gradient becomes ``kh * kw`` padded copies. The gradient here
is written by hand instead:

* the input gradient is again a stride-1 depthwise convolution, of the output gradient
  dilated by the stride (interior zero padding) with the kernel flipped, so it costs what
  the forward pass costs;
* the kernel gradient sums ``window * dy`` per tap; on CPU it does so in slices of the batch
  sized to stay in the cache (a ``lax.scan``), elsewhere (GPU, TPU: one fused reduction) over
  the whole batch at once (:func:`jax.lax.platform_dependent`).

Measured (2 cores, batch 16, forward + both gradients, ``benchmarks/depthwise.py``): see
``docs/performance.md``. Products and sums are float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["depthwise_conv", "output_size"]

#: Bytes of padded input per slice of the batch in the CPU kernel gradient (about an L2 cache
#: and a half on the machines measured; larger slices spill, smaller ones pay loop overhead).
CPU_SLICE_BYTES = 4 << 20

Strides = tuple[int, int]
Padding = tuple[tuple[int, int], tuple[int, int]]


def output_size(size: int, before: int, after: int, k: int, s: int) -> int:
    """Output positions along one axis: ``(size + before + after - k) // s + 1``."""
    return (size + before + after - k) // s + 1


def _window(xp, i: int, j: int, oh: int, ow: int, strides: Strides):
    """``xp[:, i::sh, j::sw, :]`` cut to ``oh x ow`` output positions."""
    n, _, _, c = xp.shape
    sh, sw = strides
    return lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                     (1, sh, sw, 1))


def _shifted_sum(xp, kernel, oh: int, ow: int, strides: Strides):
    """``sum_ij window_ij(xp) * kernel[i, j]``: the valid depthwise correlation of an already
    padded ``xp`` with ``kernel [kh, kw, C]``."""
    kh, kw, _ = kernel.shape
    y = None
    for i in range(kh):
        for j in range(kw):
            term = _window(xp, i, j, oh, ow, strides) * kernel[i, j]
            y = term if y is None else y + term
    return y


def _kernel_grad(xp, dy, kh: int, kw: int, strides: Strides):
    """``[kh, kw, C]``: per tap, ``sum over (n, y, x)`` of ``window_ij(xp) * dy``."""
    _, oh, ow, _ = dy.shape
    return jnp.stack([
        jnp.stack([jnp.sum(_window(xp, i, j, oh, ow, strides) * dy, axis=(0, 1, 2))
                   for j in range(kw)])
        for i in range(kh)])


def _kernel_grad_sliced(xp, dy, kh: int, kw: int, strides: Strides):
    """:func:`_kernel_grad` summed over slices of the batch of about :data:`CPU_SLICE_BYTES`
    (the largest divisor of the batch that fits; whole when it all fits)."""
    n = dy.shape[0]
    per_image = math.prod(xp.shape[1:]) * xp.dtype.itemsize
    fits = [d for d in range(1, n + 1) if n % d == 0 and d * per_image <= CPU_SLICE_BYTES]
    size = max(fits, default=1)
    if size == n:
        return _kernel_grad(xp, dy, kh, kw, strides)

    def add_slice(total, pair):
        return total + _kernel_grad(pair[0], pair[1], kh, kw, strides), None

    pairs = (xp.reshape(n // size, size, *xp.shape[1:]),
             dy.reshape(n // size, size, *dy.shape[1:]))
    total, _ = lax.scan(add_slice, jnp.zeros((kh, kw, dy.shape[-1]), jnp.float32), pairs)
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x, kernel, strides: Strides, padding: Padding):
    """``y[n, a, b, c] = sum_ij pad(x)[n, a*sh + i, b*sw + j, c] * kernel[i, j, c]``.

    Args:
      x: ``[N, H, W, C]``, float32 (cast by the caller).
      kernel: ``[kh, kw, C]``, float32.
      strides: ``(sh, sw)``.
      padding: ``((top, bottom), (left, right))`` zero padding.

    Returns:
      ``[N, OH, OW, C]`` float32, ``OH = (H + top + bottom - kh) // sh + 1`` (likewise OW).
      The same values as ``lax.conv_general_dilated(..., feature_group_count=C)`` up to float
      rounding; differentiable in ``x`` and ``kernel`` (first and higher order through the
      hand-written first-order rule).
    """
    (top, bottom), (left, right) = padding
    _, h, w, _ = x.shape
    kh, kw, _ = kernel.shape
    oh = output_size(h, top, bottom, kh, strides[0])
    ow = output_size(w, left, right, kw, strides[1])
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return _shifted_sum(xp, kernel, oh, ow, strides)


def _forward(x, kernel, strides, padding):
    return depthwise_conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
    x, kernel = residuals
    (top, bottom), (left, right) = padding
    _, h, w, _ = x.shape
    kh, kw, _ = kernel.shape
    _, oh, ow, _ = dy.shape
    sh, sw = strides
    # dx[r] = sum_i dy_dilated[r + top - i] * kernel[i]: a stride-1 correlation of the
    # dilated, shifted output gradient with the flipped kernel. Negative padding crops.
    low_h, low_w = kh - 1 - top, kw - 1 - left
    high_h = h + kh - 1 - low_h - ((oh - 1) * sh + 1)
    high_w = w + kw - 1 - low_w - ((ow - 1) * sw + 1)
    dilated = lax.pad(dy, jnp.zeros((), dy.dtype),
                      ((0, 0, 0), (low_h, high_h, sh - 1), (low_w, high_w, sw - 1), (0, 0, 0)))
    dx = _shifted_sum(dilated, kernel[::-1, ::-1], h, w, (1, 1))
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    dk = lax.platform_dependent(
        xp, dy,
        cpu=functools.partial(_kernel_grad_sliced, kh=kh, kw=kw, strides=strides),
        default=functools.partial(_kernel_grad, kh=kh, kw=kw, strides=strides))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


depthwise_conv.defvjp(_forward, _backward)
