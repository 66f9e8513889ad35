"""MobileNetV2 as in torchvision, and MobileNetV1 as in TF-slim / TF-Hub, on NHWC input.

**MobileNetV2** follows ``torchvision/models/mobilenetv2.py``: inverted residuals with ReLU6,
channel counts rounded by ``_make_divisible`` (:func:`make_divisible`), a 1x1 conv to 1280
features and a ``Dropout(0.2) + Linear`` classifier; BatchNorm eps 1e-5, momentum 0.1
(PyTorch convention). Flax module names mirror torchvision's state-dict keys
(``features.2.conv.1.0`` -> ``features_2/conv_1_0``), so conversion is the default
:func:`~featsim.backbones.convert.torch_module_path` rule plus the ``classifier.1`` head.

**MobileNetV1** follows TF-slim's ``nets/mobilenet_v1.py`` (Howard et al. 2017), the
definition behind the TF-Hub, TF-Lite and TF.js ImageNet models: a 3x3 stride-2 conv, then 13
depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, each conv + BatchNorm + ReLU6),
global mean pool, dropout and a linear classifier; channels are
``max(int(d * width_multiplier), min_depth)``; BatchNorm eps 1e-3, decay 0.9997. Module names
are slim's scopes (``Conv2d_0``, ``Conv2d_1_depthwise``, ``Conv2d_1_pointwise``, ...,
``Logits``), each holding ``conv`` and ``bn``; the TF.js loader lives in
:mod:`featsim.backbones.tfjs`. Two options exist because TF weights need them:

* ``padding="tf_same"`` (default) pads as TensorFlow's ``padding="SAME"``: total padding
  ``max((ceil(n / s) - 1) * s + k - n, 0)`` split with the extra pixel at the *bottom/right*
  (:func:`tf_same_padding`). For a stride-2 3x3 conv on an even input that is ``(0, 1)``, not
  PyTorch's symmetric ``(1, 1)``: TF-trained weights read shifted inputs under symmetric
  padding. ``padding="symmetric"`` gives the PyTorch convention (``k // 2`` each side).
* ``folded_bn=True`` replaces every conv + BatchNorm by a conv with a bias and no BatchNorm:
  inference graphs (TF.js, TF-Lite) ship BatchNorm folded into the conv weights
  (``w' = w * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``), which
  cannot be unfolded. Setting BatchNorm to an identity instead would need ``var = 1 - eps``
  and extra, meaningless variables; a biased conv holds exactly what the file holds.

The classifier of the TF models has 1001 outputs, index 0 being "background": ImageNet class
``c`` (0..999 in the standard order) is logit ``c + 1``.

Features (``features`` dict, NHWC), taken as the last activation at each resolution:

=============  =====================  ==============================  ==========
key            MobileNetV2            MobileNetV1                     reduction
=============  =====================  ==============================  ==========
``stem``       ``features.0``         ``Conv2d_0``                    2
``stage1``     ``features.1``         ``Conv2d_1_pointwise``          2
``stage2``     ``features.3``         ``Conv2d_3_pointwise``          4
``stage3``     ``features.6``         ``Conv2d_5_pointwise``          8
``stage4``     ``features.13``        ``Conv2d_11_pointwise``         16
``stage5``     ``features.18`` (1280) ``Conv2d_13_pointwise``         32
=============  =====================  ==============================  ==========

``pre_logits`` is the globally mean-pooled ``stage5`` (``[N, C]``), what the classifier sees.

References:
    Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
    Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
    Applications", arXiv:1704.04861, 2017.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from featsim.backbones import layers
from featsim.backbones.convert import KeyMapping
from featsim.backbones.layers import depthwise_conv2d, tf_same_padding
from featsim.backbones.preprocessing import TORCHVISION_IMAGENET, Preprocessing
from featsim.backbones.registry import register_backbone
from featsim.backbones.weights import WeightsSource

__all__ = [
    "MOBILENET_V1_KEYS",
    "MOBILENET_V1_PADDINGS",
    "MOBILENET_V1_TF",
    "MOBILENET_V2_KEYS",
    "MOBILENET_V2_SETTING",
    "InvertedResidual",
    "MobileNetV1",
    "MobileNetV2",
    "make_divisible",
    "mobilenet_v1",
    "mobilenet_v1_025",
    "mobilenet_v2",
]

Dtype = Any

# torchvision state-dict keys -> Flax paths: default rule; the classifier is `classifier.1`
# (`classifier.0` is the parameter-free Dropout).
MOBILENET_V2_KEYS = KeyMapping(head=("classifier.1",))
# PyTorch-layout keys of MobileNetV1 (`Conv2d_3_depthwise.conv.weight`, `...bn.running_var`,
# `Logits.weight`), for state dicts written from featsim's own torch reference or a port of
# slim checkpoints. There is no torchvision MobileNetV1.
MOBILENET_V1_KEYS = KeyMapping(head=("Logits",))

# t (expansion), c (channels), n (repeats), s (stride of the first block): torchvision's table.
MOBILENET_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# TF-slim's body: (stride, depth) of Conv2d_0, then of the 13 depthwise-separable blocks.
_V1_STEM = (2, 32)
_V1_BLOCKS = (
    (1, 64),
    (2, 128),
    (1, 128),
    (2, 256),
    (1, 256),
    (2, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (2, 1024),
    (1, 1024),
)
MOBILENET_V1_PADDINGS = ("tf_same", "symmetric")

# TF-slim evaluates MobileNetV1 with inception_preprocessing: central 87.5% crop, bilinear
# resize to 224, pixels to [-1, 1]; the TF-Hub model card only fixes 224x224 inputs in [0, 1].
# The TF-Hub/TF.js graph applies `x * 2 - 1` itself (its `hub_input/Mul`, `hub_input/Sub`
# nodes); featsim's module starts after that op, so it takes [-1, 1] (p / 127.5 - 1 ==
# (p / 255) * 2 - 1). The recipe resizes the shorter side to 256 and centre-crops 224: the same
# 0.875 fraction with the aspect kept, as the Hugging Face port of these checkpoints does.
# Measured with the TF.js 0.25 weights on /work/shared/data/imagenet_sample_1k (top-1/top-5):
# this recipe 0.561/0.800, slim's crop-then-squash 0.543/0.780, a plain 224 resize 0.504/0.761.
MOBILENET_V1_TF = Preprocessing(
    input_size=224, resize_size=256, interpolation="bilinear", scaling="[-1,1]"
)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible`` (from TF-slim): nearest multiple of ``divisor``.

    Rounds ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``, default
    ``divisor``), going one multiple up if rounding lost more than 10%.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _relu6(x):
    # torch.nn.ReLU6 is hardtanh(0, 6); jnp.clip keeps the dtype.
    return jnp.clip(x, 0, 6)


# ----------------------------------------------------------------------------- MobileNetV2


class _Fields(nn.Module):
    """Fields every block shares (set by the network)."""

    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def _conv_bn(self, x, features, *, train, name, kernel_size=3, stride=1, groups=1):
        """torchvision's ``Conv2dNormActivation`` with ReLU6: modules ``{name}_0`` (conv),
        ``{name}_1`` (BN)."""
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        padding = (kernel_size - 1) // 2
        if groups > 1 and groups == features == x.shape[-1]:
            conv = depthwise_conv2d(
                kernel_size, stride=stride, padding=padding, name=f"{name}_0", **common
            )
        else:
            conv = layers.conv2d(
                features,
                kernel_size,
                stride=stride,
                padding=padding,
                groups=groups,
                precision=self.precision,
                name=f"{name}_0",
                **common,
            )
        x = conv(x)
        x = self._bn(x, train=train, name=f"{name}_1")
        return _relu6(x)

    def _bn(self, x, *, train, name):
        return layers.batch_norm(
            train=train,
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)


class InvertedResidual(_Fields):
    """MobileNetV2 block: 1x1 expand (if ``expand_ratio != 1``) -> 3x3 depthwise -> 1x1 linear.

    Submodules follow torchvision's ``conv`` Sequential: ``conv_0_0``/``conv_0_1`` (expand
    conv/BN), ``conv_1_0``/``conv_1_1`` (depthwise), ``conv_2``/``conv_3`` (projection); without
    expansion the indices shift down by one. The residual is added when ``stride == 1`` and
    the channel count is unchanged.
    """

    features: int = 16
    stride: int = 1
    expand_ratio: float = 1

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if self.stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {self.stride}")
        in_features = x.shape[-1]
        hidden = round(in_features * self.expand_ratio)
        y, index = x, 0
        if self.expand_ratio != 1:
            y = self._conv_bn(y, hidden, kernel_size=1, train=train, name="conv_0")
            index = 1
        y = self._conv_bn(
            y, hidden, stride=self.stride, groups=hidden, train=train, name=f"conv_{index}"
        )
        y = layers.conv2d(
            self.features,
            1,
            name=f"conv_{index + 1}",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
        )(y)
        y = self._bn(y, train=train, name=f"conv_{index + 2}")
        if self.stride == 1 and in_features == self.features:
            return x + y
        return y


class MobileNetV2(_Fields):
    """torchvision's MobileNetV2 on NHWC input.

    Attributes:
        num_classes: classifier outputs (1 for a sigmoid head); ``None`` or 0 for no head, in
            which case ``logits`` is ``None`` and no ``classifier_1`` parameters exist.
        width_mult: channel multiplier (torchvision's ``width_mult``).
        round_nearest: channels are rounded to multiples of this (1 turns rounding off).
        inverted_residual_setting: rows ``(t, c, n, s)``; default :data:`MOBILENET_V2_SETTING`.
        dropout_rate: classifier dropout (torchvision: 0.2). With ``train=True`` the apply call
            needs ``rngs={"dropout": key}``.
        bn_epsilon: BatchNorm epsilon (torchvision: 1e-5).
        bn_momentum: BatchNorm momentum, Flax convention (0.9 == PyTorch's 0.1).
        bn_axis_name: axis name for synchronised BatchNorm under ``pmap``; None otherwise.
        dtype: computation dtype; BatchNorm statistics stay float32.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` for convs and the head (``"highest"`` for bit-faithful
            checks on GPU/TPU).

    ``__call__(x, *, train=False)`` returns ``(logits, features)``; ``features`` holds
    ``"stem"``, ``"stage1"``..``"stage5"`` (see the module docstring) and ``"pre_logits"``.
    With ``train=True``, call ``apply(..., mutable=["batch_stats"], rngs={"dropout": key})``.

    Example:
        >>> model = MobileNetV2(num_classes=10)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        >>> logits, feats = model.apply(variables, jnp.zeros((2, 224, 224, 3)))
        >>> logits.shape, feats["pre_logits"].shape
        ((2, 10), (2, 1280))
    """

    num_classes: int | None = 1000
    width_mult: float = 1.0
    round_nearest: int = 8
    inverted_residual_setting: Sequence[Sequence[int]] = MOBILENET_V2_SETTING
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_backbone_input("MobileNetV2", x, self.num_classes)
        setting = [tuple(row) for row in self.inverted_residual_setting]
        if not setting or any(len(row) != 4 for row in setting):
            raise ValueError(
                "inverted_residual_setting must be a non-empty sequence of (t, c, n, s) rows, "
                f"got {self.inverted_residual_setting!r}"
            )
        divisible = functools.partial(make_divisible, divisor=self.round_nearest)
        block_fields = dict(
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            bn_axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
        )
        # (stride, layer) pairs, so features can be tapped at the last layer of a resolution.
        plan = [(2, None)]
        for t, c, n, s in setting:
            out = divisible(c * self.width_mult)
            plan += [(s if i == 0 else 1, (out, t)) for i in range(n)]
        plan.append((1, "last"))
        last_channel = divisible(1280 * max(1.0, self.width_mult))

        features, reduction = {}, 1
        for index, (stride, spec) in enumerate(plan):
            if spec is None:
                x = self._conv_bn(
                    x, divisible(32 * self.width_mult), stride=2, train=train, name="features_0"
                )
            elif spec == "last":
                x = self._conv_bn(
                    x, last_channel, kernel_size=1, train=train, name=f"features_{index}"
                )
            else:
                out, t = spec
                x = InvertedResidual(
                    features=out,
                    stride=stride,
                    expand_ratio=t,
                    name=f"features_{index}",
                    **block_fields,
                )(x, train=train)
            reduction *= stride
            if index == 0:
                features["stem"] = x
            if index + 1 == len(plan) or plan[index + 1][0] > 1:
                features[f"stage{int(math.log2(reduction))}"] = x

        x = layers.global_avg_pool(x)
        features["pre_logits"] = x
        if not self.num_classes:
            return None, features
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.zeros,
            name="classifier_1",
        )(x)
        return logits, features


# ----------------------------------------------------------------------------- MobileNetV1


class _ConvBN(nn.Module):
    """One slim conv: ``conv`` (+ ``bn`` unless ``folded_bn``), then ReLU6."""

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    padding: str = "tf_same"
    folded_bn: bool = False
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.9997
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        k, s = self.kernel_size, self.stride
        if self.padding == "tf_same":
            pads = tuple(tf_same_padding(n, k, s) for n in x.shape[1:3])
        else:
            pads = ((k // 2, k // 2), (k // 2, k // 2))
        # slim's mobilenet_v1_arg_scope: truncated normal, stddev 0.09.
        init = nn.initializers.truncated_normal(0.09)
        if self.groups > 1 and self.groups == self.features == x.shape[-1]:
            conv = depthwise_conv2d(
                k,
                stride=s,
                padding=pads,
                use_bias=self.folded_bn,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=init,
                name="conv",
            )
        else:
            conv = nn.Conv(
                self.features,
                (k, k),
                strides=(s, s),
                padding=pads,
                feature_group_count=self.groups,
                use_bias=self.folded_bn,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=init,
                name="conv",
            )
        x = conv(x)
        if not self.folded_bn:
            x = layers.batch_norm(
                train=train,
                epsilon=self.bn_epsilon,
                momentum=self.bn_momentum,
                axis_name=self.bn_axis_name,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="bn",
            )(x)
        return _relu6(x)


class MobileNetV1(nn.Module):
    """TF-slim's MobileNetV1 on NHWC input, with a width multiplier.

    Attributes:
        num_classes: classifier outputs; the TF models have 1001 (index 0 = background).
            ``None`` or 0 for no head (``logits`` is ``None``, no ``Logits`` parameters).
        width_multiplier: slim's ``depth_multiplier`` (alpha in the paper): 1.0, 0.75, 0.5,
            0.25 for the published models.
        min_depth: smallest channel count (slim: 8).
        padding: ``"tf_same"`` (TensorFlow ``SAME``, asymmetric for stride 2; what TF weights
            were trained with) or ``"symmetric"`` (PyTorch's ``k // 2`` on each side).
        folded_bn: convs carry a bias and there is no BatchNorm, for weights whose BatchNorm is
            folded into the convs (TF.js / TF-Lite graphs); see the module docstring.
        dropout_rate: before the classifier (slim: keep_prob 0.999). With ``train=True`` and a
            non-zero rate, apply needs ``rngs={"dropout": key}``.
        bn_epsilon: BatchNorm epsilon (slim: 1e-3).
        bn_momentum: BatchNorm momentum, Flax convention (slim's decay 0.9997).
        bn_axis_name: axis name for synchronised BatchNorm under ``pmap``; None otherwise.
        dtype: computation dtype; BatchNorm statistics stay float32.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` for convs and the head.

    ``__call__(x, *, train=False)`` takes ``x`` in ``[-1, 1]`` (:data:`MOBILENET_V1_TF`) of
    shape ``[N, H, W, 3]`` and returns ``(logits, features)``; ``features`` holds ``"stem"``,
    ``"stage1"``..``"stage5"`` (see the module docstring) and ``"pre_logits"``.

    Example:
        >>> model = MobileNetV1(width_multiplier=0.25, num_classes=1001, folded_bn=True)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        >>> logits, feats = model.apply(variables, jnp.zeros((2, 224, 224, 3)))
        >>> logits.shape, feats["pre_logits"].shape
        ((2, 1001), (2, 256))
    """

    num_classes: int | None = 1001
    width_multiplier: float = 1.0
    min_depth: int = 8
    padding: str = "tf_same"
    folded_bn: bool = False
    dropout_rate: float = 0.001
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.9997
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def depth(self, channels: int) -> int:
        """Channels of a layer that has ``channels`` at width 1.0 (slim's ``depth``)."""
        return max(int(channels * self.width_multiplier), self.min_depth)

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_backbone_input("MobileNetV1", x, self.num_classes)
        if self.width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be > 0, got {self.width_multiplier}")
        if self.padding not in MOBILENET_V1_PADDINGS:
            raise ValueError(
                f"padding must be one of {MOBILENET_V1_PADDINGS}, got {self.padding!r}"
            )
        conv = functools.partial(
            _ConvBN,
            padding=self.padding,
            folded_bn=self.folded_bn,
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            bn_axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
        )
        stride, channels = _V1_STEM
        x = conv(self.depth(channels), 3, stride=stride, name="Conv2d_0")(x, train=train)
        features = {"stem": x}
        reduction = stride
        strides = [s for s, _ in _V1_BLOCKS]
        for i, (stride, channels) in enumerate(_V1_BLOCKS, start=1):
            x = conv(
                x.shape[-1], 3, stride=stride, groups=x.shape[-1], name=f"Conv2d_{i}_depthwise"
            )(x, train=train)
            x = conv(self.depth(channels), 1, name=f"Conv2d_{i}_pointwise")(x, train=train)
            reduction *= stride
            if i == len(_V1_BLOCKS) or strides[i] > 1:
                features[f"stage{int(math.log2(reduction))}"] = x

        x = layers.global_avg_pool(x)
        features["pre_logits"] = x
        if not self.num_classes:
            return None, features
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.initializers.truncated_normal(0.09),
            name="Logits",
        )(x)
        return logits, features


# ----------------------------------------------------------------------------- registry

mobilenet_v2 = functools.partial(MobileNetV2)
mobilenet_v1 = functools.partial(MobileNetV1, width_multiplier=1.0)
mobilenet_v1_025 = functools.partial(MobileNetV1, width_multiplier=0.25)

register_backbone(
    "mobilenet_v2",
    preprocessing=TORCHVISION_IMAGENET,
    weights=WeightsSource(
        filename="mobilenet_v2-b0353104.pth",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        key_mapping=MOBILENET_V2_KEYS,
        description="torchvision IMAGENET1K_V1",
    ),
)(mobilenet_v2)

# No registered file: the real weights (TF-Hub's MobileNetV1 0.25/224, BatchNorm folded) come
# as a TF.js graph, which featsim.backbones.tfjs.load_tfjs_mobilenet_v1 reads into a
# `folded_bn=True` module; featsim.backbones.save_variables then writes a .msgpack that
# get_backbone(..., pretrained=True, weights_path=...) loads.
register_backbone("mobilenet_v1", preprocessing=MOBILENET_V1_TF)(mobilenet_v1)
register_backbone("mobilenet_v1_025", preprocessing=MOBILENET_V1_TF)(mobilenet_v1_025)
