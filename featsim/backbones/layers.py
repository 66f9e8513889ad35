"""Layers that compute what PyTorch computes, shared by every backbone family (NHWC).

Ports of PyTorch models go wrong in a few known places; each helper here pins one down:

* convolution padding is explicit (``((p, p), (p, p))``), never ``"SAME"``, which pads
  asymmetrically for even inputs and strided convs;
* BatchNorm ``momentum`` uses the Flax convention (weight of the *old* statistics), so
  PyTorch's default ``momentum=0.1`` is ``0.9`` here (:func:`flax_momentum`), and the
  running variance is updated with the unbiased batch variance as ``torch.nn.BatchNorm2d``
  does (``flax.linen.BatchNorm`` uses the biased one);
* pooling uses PyTorch's output-size rule, including ``ceil_mode``, and average pooling
  PyTorch's divisor (``count_include_pad``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from featsim.backbones.depthwise import depthwise_conv, output_size

__all__ = [
    "BatchNorm",
    "DepthwiseConv",
    "avg_pool",
    "batch_norm",
    "check_backbone_input",
    "conv2d",
    "conv_and_norm",
    "depthwise_conv2d",
    "flax_momentum",
    "global_avg_pool",
    "kaiming_normal_fan_out",
    "max_pool",
    "pool_output_size",
    "tf_same_padding",
    "torch_linear",
]

Dtype = Any
IntPair = int | tuple[int, int]

# torchvision's conv init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


def flax_momentum(torch_momentum: float) -> float:
    """Converts a PyTorch BatchNorm momentum to the Flax convention.

    PyTorch updates ``running = (1 - m) * running + m * batch``; Flax updates
    ``running = m * running + (1 - m) * batch``. PyTorch's default 0.1 is Flax's 0.9.
    """
    if not 0.0 <= torch_momentum <= 1.0:
        raise ValueError(f"torch_momentum must be in [0, 1], got {torch_momentum}")
    return 1.0 - torch_momentum


def conv2d(
    features: int,
    kernel_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    use_bias: bool = False,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    precision: Any = None,
    kernel_init: Callable = kaiming_normal_fan_out,
) -> nn.Conv:
    """A ``torch.nn.Conv2d`` equivalent: symmetric explicit padding, groups, dilation.

    The kernel is HWIO (``[kh, kw, in // groups, out]``); a PyTorch OIHW weight maps onto it
    with ``weight.transpose(2, 3, 1, 0)``.

    Args:
        features: output channels.
        kernel_size: int or ``(kh, kw)``.
        stride, padding, dilation: int or pair, as in PyTorch (``padding=p`` pads ``p`` on
            both sides of each spatial axis).
        groups: PyTorch ``groups`` (``feature_group_count``); ``groups == in_channels``
            gives a depthwise conv.
        use_bias: PyTorch ``bias``; torchvision convs followed by BatchNorm have none.
        name, dtype, param_dtype, precision, kernel_init: passed to ``flax.linen.Conv``.
    """
    ph, pw = _pair(padding, "padding")
    return nn.Conv(
        features=features,
        kernel_size=_pair(kernel_size, "kernel_size"),
        strides=_pair(stride, "stride"),
        padding=((ph, ph), (pw, pw)),
        kernel_dilation=_pair(dilation, "dilation"),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=kernel_init,
        name=name,
    )


def torch_linear(
    features: int,
    in_features: int,
    *,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    precision: Any = None,
) -> nn.Dense:
    """A ``torch.nn.Linear`` equivalent with PyTorch's default init.

    Both kernel and bias are drawn from ``U(-1/sqrt(in_features), 1/sqrt(in_features))``.
    The kernel is ``[in, out]``; a PyTorch ``[out, in]`` weight maps onto it transposed.
    """
    bound = 1.0 / math.sqrt(in_features)

    def bias_init(key, shape, dtype=param_dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_init=bias_init,
        name=name,
    )


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` over the last (channel) axis, Flax momentum convention.

    Variables: ``params/{scale, bias}`` and ``batch_stats/{mean, var}`` (the names
    ``flax.linen.BatchNorm`` uses). In training mode the batch is normalised with the biased
    variance, and the running statistics are updated as
    ``running = momentum * running + (1 - momentum) * batch`` with the *unbiased* batch
    variance for ``var``, exactly as PyTorch does. Statistics are computed in float32 with a
    two-pass (centred) variance, whatever ``dtype`` is.

    Attributes:
        use_running_average: normalise with the running statistics (eval mode).
        momentum: Flax convention; 0.9 equals PyTorch's default 0.1 (see
            :func:`flax_momentum`).
        epsilon: added to the variance; torchvision uses 1e-5, a few families 1e-3.
        dtype: output dtype.
        param_dtype: dtype of ``scale`` and ``bias``.
        axis_name: a ``pmap``/``shard_map`` axis to average batch statistics over
            (synchronised BatchNorm); ``None`` for per-device statistics.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        x32 = jnp.asarray(x, jnp.float32)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            mean = jnp.mean(x32, axis=axes)
            if self.axis_name is not None:
                mean = lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if self.axis_name is not None:
                var = lax.pmean(var, self.axis_name)
                count = count * lax.psum(1, self.axis_name)
            elif count < 2:
                # torch raises here too; the unbiased variance is undefined.
                raise ValueError(
                    "BatchNorm in training mode needs more than 1 value per channel, got "
                    f"input of shape {x.shape}"
                )
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased

        inv = lax.rsqrt(var + self.epsilon) * jnp.asarray(scale, jnp.float32)
        y = (x32 - mean) * inv + jnp.asarray(bias, jnp.float32)
        return jnp.asarray(y, self.dtype)


def batch_norm(
    *,
    train: bool,
    epsilon: float = 1e-5,
    momentum: float = 0.9,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    axis_name: str | None = None,
) -> BatchNorm:
    """A :class:`BatchNorm` in training (batch statistics) or eval (running) mode.

    Args:
        train: use and update batch statistics (needs ``mutable=["batch_stats"]``).
        epsilon: torchvision's default is 1e-5; pass the reference's value (e.g. 1e-3).
        momentum: Flax convention; convert PyTorch values with :func:`flax_momentum`.
        name, dtype, param_dtype, axis_name: see :class:`BatchNorm`.
    """
    return BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        axis_name=axis_name,
        name=name,
    )


def pool_output_size(
    size: int, kernel_size: int, stride: int, padding: int, *, ceil_mode: bool = False
) -> int:
    """PyTorch's pooling output length along one axis (``pooling_output_shape``).

    With ``ceil_mode`` the last window may hang over the padded input, but it must start
    inside the input or the left padding, otherwise it is dropped.
    """
    numerator = size + 2 * padding - kernel_size + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_geometry(x, kernel_size, stride, padding, ceil_mode):
    if x.ndim != 4:
        raise ValueError(f"pooling expects NHWC input of rank 4, got shape {x.shape}")
    kernel = _pair(kernel_size, "kernel_size")
    strides = kernel if stride is None else _pair(stride, "stride")
    pads = _pair(padding, "padding")
    outs, pad_pairs = [], []
    for size, k, s, p in zip(x.shape[1:3], kernel, strides, pads, strict=True):
        if p > k // 2:
            raise ValueError(
                f"padding should be at most half of the kernel size (as in PyTorch), got "
                f"padding={p} for kernel_size={k}"
            )
        out = pool_output_size(size, k, s, p, ceil_mode=ceil_mode)
        if out < 1:
            raise ValueError(
                f"input of spatial size {x.shape[1:3]} is too small for kernel_size="
                f"{kernel}, stride={strides}, padding={pads}"
            )
        # Right padding that covers the last window; windows past `out` are sliced off.
        hi = max((out - 1) * s + k - size - p, 0)
        outs.append(out)
        pad_pairs.append((p, hi))
    return kernel, strides, tuple(pad_pairs), tuple(outs)


def max_pool(
    x,
    kernel_size: IntPair,
    *,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
):
    """``torch.nn.functional.max_pool2d`` on NHWC input.

    Padding is implicit ``-inf`` (padded positions never win), and the output size follows
    PyTorch's rule, including ``ceil_mode``.

    Args:
        x: float array of shape ``[N, H, W, C]``.
        kernel_size, stride, padding: int or pair; ``stride`` defaults to ``kernel_size``.
        ceil_mode: PyTorch's ``ceil_mode``.

    Returns:
        Array of shape ``[N, H_out, W_out, C]``.
    """
    kernel, strides, pads, (oh, ow) = _pool_geometry(x, kernel_size, stride, padding, ceil_mode)
    y = lax.reduce_window(
        x,
        np.array(-np.inf, x.dtype),  # concrete: JAX then uses its differentiable max pool
        lax.max,
        (1, *kernel, 1),
        (1, *strides, 1),
        ((0, 0), *pads, (0, 0)),
    )
    return y[:, :oh, :ow, :]


def avg_pool(
    x,
    kernel_size: IntPair,
    *,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
):
    """``torch.nn.functional.avg_pool2d`` on NHWC input, with PyTorch's divisor.

    With ``count_include_pad`` the divisor counts the zero padding but not the part of a
    ``ceil_mode`` window that hangs past it; without, it counts only input pixels.

    Args:
        x: float array of shape ``[N, H, W, C]``.
        kernel_size, stride, padding: int or pair; ``stride`` defaults to ``kernel_size``.
        ceil_mode, count_include_pad: as in PyTorch.

    Returns:
        Array of shape ``[N, H_out, W_out, C]``.
    """
    kernel, strides, pads, (oh, ow) = _pool_geometry(x, kernel_size, stride, padding, ceil_mode)
    window = ((1, *kernel, 1), (1, *strides, 1))
    total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, *window, ((0, 0), *pads, (0, 0)))
    # The divisor depends only on the geometry: count the positions that PyTorch counts.
    counted = []
    for size, (lo, hi) in zip(x.shape[1:3], pads, strict=True):
        line = np.zeros(lo + size + hi, np.float32)
        line[: lo + size + lo] = 1.0 if count_include_pad else 0.0
        line[lo : lo + size] = 1.0
        counted.append(line)
    mask = np.outer(*counted)[None, :, :, None]
    divisor = lax.reduce_window(
        jnp.asarray(mask), np.array(0, np.float32), lax.add, *window, "VALID"
    )
    y = total / divisor.astype(x.dtype)
    return y[:, :oh, :ow, :]


def global_avg_pool(x):
    """``AdaptiveAvgPool2d(1)`` + flatten: ``[N, H, W, C] -> [N, C]``."""
    if x.ndim != 4:
        raise ValueError(f"global_avg_pool expects NHWC input of rank 4, got shape {x.shape}")
    return jnp.mean(x, axis=(1, 2))


def tf_same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's ``padding="SAME"`` along one axis: ``(before, after)``.

    The output has ``ceil(size / stride)`` positions; the padding that needs is split with the
    odd pixel *after* (bottom/right). E.g. ``tf_same_padding(224, 3, 2) == (0, 1)`` where
    PyTorch's ``padding=1`` gives ``(1, 1)``.
    """
    if size < 1 or kernel_size < 1 or stride < 1 or dilation < 1:
        raise ValueError(
            f"size, kernel_size, stride and dilation must be >= 1, got size={size}, "
            f"kernel_size={kernel_size}, stride={stride}, dilation={dilation}"
        )
    out = -(-size // stride)
    effective = (kernel_size - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """A depthwise conv (one ``kh x kw`` filter per channel) as ``kh * kw`` shifted multiply-adds.

    Same variables and result as ``flax.linen.Conv(C, feature_group_count=C)`` (kernel
    ``[kh, kw, 1, C]``, optional bias ``[C]``; a PyTorch ``[C, 1, kh, kw]`` weight maps onto it
    with the usual OIHW -> HWIO transpose), up to float rounding. XLA:CPU lowers grouped
    convolutions to a slow generic loop: a 3x3 depthwise conv on ``[100, 112, 112, 16]`` took
    3.4 s there against 0.23 s for this form (jax 0.10, 2 cores); on accelerators XLA fuses the
    shifted products into one elementwise kernel. The gradient is written by hand
    (:func:`featsim.backbones.depthwise.depthwise_conv`): the automatic one of the shifted
    form costs several forward passes on CPU. Products and sums are float32 whatever
    ``dtype`` is, so ``precision`` has nothing to choose.

    Attributes:
        kernel_size: ``(kh, kw)``.
        strides: ``(sh, sw)``.
        padding: explicit ``((top, bottom), (left, right))`` zero padding.
        use_bias: add a per-channel bias.
        dtype: output dtype.
        param_dtype: kernel and bias dtype.
        kernel_init, bias_init: initialisers (the kernel's fan-in is ``kh * kw``).
    """

    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = kaiming_normal_fan_out
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4:
            raise ValueError(f"DepthwiseConv expects NHWC input of rank 4, got shape {x.shape}")
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        _, h, w, c = x.shape
        kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, c), self.param_dtype)
        (top, bottom), (left, right) = self.padding
        if output_size(h, top, bottom, kh, sh) < 1 or output_size(w, left, right, kw, sw) < 1:
            raise ValueError(
                f"input of spatial size {(h, w)} is too small for kernel {self.kernel_size} "
                f"with padding {self.padding}"
            )
        y = depthwise_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel[:, :, 0], jnp.float32),
                           (sh, sw), self.padding)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
            y = y + jnp.asarray(bias, jnp.float32)
        return jnp.asarray(y, self.dtype)


def depthwise_conv2d(
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 0,
    use_bias: bool = False,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable = kaiming_normal_fan_out,
) -> DepthwiseConv:
    """A ``torch.nn.Conv2d(C, C, k, stride, padding, groups=C)`` equivalent (see
    :class:`DepthwiseConv`); ``padding`` is PyTorch's symmetric int or explicit pairs."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return DepthwiseConv(
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        name=name,
    )


def conv_and_norm(module: nn.Module, train: bool, *, kernel_init: Callable | None = None):
    """``(conv, norm)`` factories carrying a backbone module's common fields.

    ``conv`` is :func:`conv2d` with the module's ``dtype``, ``param_dtype`` and ``precision``
    (and ``kernel_init`` when given: families differ in torchvision's init); ``norm`` is
    :func:`batch_norm` with ``train`` and the module's ``bn_epsilon``, ``bn_momentum`` and
    ``bn_axis_name``.
    """
    conv_kwargs = dict(dtype=module.dtype, param_dtype=module.param_dtype,
                       precision=module.precision)
    if kernel_init is not None:
        conv_kwargs["kernel_init"] = kernel_init
    conv = functools.partial(conv2d, **conv_kwargs)
    norm = functools.partial(
        batch_norm,
        train=train,
        epsilon=module.bn_epsilon,
        momentum=module.bn_momentum,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        axis_name=module.bn_axis_name,
    )
    return conv, norm


def check_backbone_input(name: str, x, num_classes) -> None:
    """Raises ValueError unless ``x`` is NHWC RGB ``[N, H, W, 3]`` and ``num_classes`` is
    None or >= 0 (0 and None both mean: no classifier head)."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} expects NHWC input [N, H, W, 3], got shape {x.shape}")
    if num_classes is not None and num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 or None, got {num_classes}")
