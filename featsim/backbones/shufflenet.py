"""ShuffleNetV2 as in torchvision (``torchvision/models/shufflenetv2.py``), on NHWC input.

A 3x3 stride-2 conv and a 3x3 stride-2 max-pool, three stages of units that split the
channels in two, transform one half (1x1 -> 3x3 depthwise -> 1x1) and shuffle the halves
together again, then a 1x1 ``conv5``, a global mean and a linear classifier. The first unit
of each stage has stride 2 and transforms the whole input in two branches instead of
splitting it. BatchNorm eps 1e-5 and PyTorch momentum 0.1, as torchvision.

Flax module names mirror torchvision's state-dict keys (``stage2.0.branch2.3`` ->
``stage2_0/branch2_3``, ``conv1.0`` -> ``conv1_0``), so conversion is the default
:func:`~featsim.backbones.convert.torch_module_path` rule plus the ``fc`` head.

Features: ``"stem"`` (after the max-pool, reduction 4), ``"stage2"`` .. ``"stage4"``
(reductions 8, 16, 32; torchvision's stage names), ``"conv5"`` (reduction 32) and
``"pre_logits"`` (the mean-pooled ``conv5``, what ``fc`` sees).

Reference:
    Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
    ECCV 2018.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from featsim.backbones import layers
from featsim.backbones.convert import KeyMapping
from featsim.backbones.mobilenet import depthwise_conv2d
from featsim.backbones.preprocessing import TORCHVISION_IMAGENET
from featsim.backbones.registry import register_backbone
from featsim.backbones.weights import WeightsSource

__all__ = [
    "SHUFFLENET_V2_KEYS",
    "ShuffleNetV2",
    "ShuffleUnit",
    "channel_shuffle",
    "shufflenet_v2_x1_0",
]

Dtype = Any

# torchvision state-dict keys -> Flax paths: default rule, classifier is `fc`.
SHUFFLENET_V2_KEYS = KeyMapping(head=("fc",))

# PyTorch's default Conv2d init (kaiming_uniform_(a=sqrt(5))): U(+-1/sqrt(fan_in)).
# torchvision's ShuffleNetV2 keeps it.
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def channel_shuffle(x, groups: int):
    """torchvision's ``channel_shuffle`` on NHWC: channel ``g * (C // groups) + j`` moves to
    ``j * groups + g``.

    Args:
        x: array of shape ``[N, H, W, C]`` with ``C`` divisible by ``groups``.
        groups: number of groups.
    """
    n, h, w, c = x.shape
    if c % groups:
        raise ValueError(f"channel_shuffle needs channels divisible by groups={groups}, got {c}")
    x = x.reshape(n, h, w, groups, c // groups)
    return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 ``InvertedResidual`` (one unit).

    ``stride == 1``: split channels in halves, keep the first, send the second through
    ``branch2``; ``stride > 1``: ``branch1`` (3x3 depthwise -> BN -> 1x1 -> BN -> ReLU) and
    ``branch2`` (1x1 -> BN -> ReLU -> 3x3 depthwise -> BN -> 1x1 -> BN -> ReLU) both see the whole
    input. Then concatenate and :func:`channel_shuffle` with 2 groups.
    """

    features: int
    stride: int = 1
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if not 1 <= self.stride <= 3:
            raise ValueError(f"illegal stride value {self.stride} (torchvision allows 1..3)")
        in_features = x.shape[-1]
        branch = self.features // 2
        if self.stride == 1 and in_features != 2 * branch:
            raise ValueError(
                f"a stride-1 unit needs in_features == 2 * (features // 2), got in_features="
                f"{in_features}, features={self.features}"
            )
        conv, norm = layers.conv_and_norm(self, train, kernel_init=_torch_conv_init)

        depthwise = functools.partial(
            depthwise_conv2d,
            3,
            stride=self.stride,
            padding=1,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_torch_conv_init,
        )

        def branch2(y):
            y = conv(branch, 1, name="branch2_0")(y)
            y = nn.relu(norm(name="branch2_1")(y))
            y = depthwise(name="branch2_3")(y)
            y = norm(name="branch2_4")(y)
            y = conv(branch, 1, name="branch2_5")(y)
            return nn.relu(norm(name="branch2_6")(y))

        if self.stride == 1:
            x1, x2 = jnp.split(x, 2, axis=-1)
            out = jnp.concatenate([x1, branch2(x2)], axis=-1)
        else:
            y = depthwise(name="branch1_0")(x)
            y = norm(name="branch1_1")(y)
            y = conv(branch, 1, name="branch1_2")(y)
            y = nn.relu(norm(name="branch1_3")(y))
            out = jnp.concatenate([y, branch2(x)], axis=-1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision's ShuffleNetV2 on NHWC input.

    Attributes:
        stages_repeats: units in stages 2, 3, 4 (torchvision: ``(4, 8, 4)``).
        stages_out_channels: channels of ``conv1``, stages 2-4 and ``conv5``
            (x1.0: ``(24, 116, 232, 464, 1024)``).
        num_classes: classifier outputs (1 for a sigmoid head); ``None`` or 0 for no head, in
            which case ``logits`` is ``None`` and no ``fc`` parameters exist.
        bn_epsilon: BatchNorm epsilon (torchvision: 1e-5).
        bn_momentum: BatchNorm momentum, Flax convention (0.9 == PyTorch's 0.1).
        bn_axis_name: axis name for synchronised BatchNorm under ``pmap``; None otherwise.
        dtype: computation dtype; BatchNorm statistics stay float32.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` for convs and the head.

    ``__call__(x, *, train=False)`` takes ``x`` of shape ``[N, H, W, 3]`` and returns
    ``(logits, features)`` with features ``"stem"``, ``"stage2"``..``"stage4"``, ``"conv5"``
    and ``"pre_logits"`` (see the module docstring). With ``train=True``, call
    ``apply(..., mutable=["batch_stats"])``.

    Example:
        >>> model = ShuffleNetV2(num_classes=10)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        >>> logits, feats = model.apply(variables, jnp.zeros((2, 224, 224, 3)))
        >>> logits.shape, feats["pre_logits"].shape
        ((2, 10), (2, 1024))
    """

    stages_repeats: Sequence[int] = (4, 8, 4)
    stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024)
    num_classes: int | None = 1000
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_backbone_input("ShuffleNetV2", x, self.num_classes)
        if len(self.stages_repeats) != 3:
            raise ValueError(
                f"expected stages_repeats as 3 positive ints, got {self.stages_repeats!r}"
            )
        if len(self.stages_out_channels) != 5:
            raise ValueError(
                f"expected stages_out_channels as 5 positive ints, got {self.stages_out_channels!r}"
            )
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        bn = dict(
            train=train,
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        stem_channels, *stage_channels, last_channels = self.stages_out_channels

        x = layers.conv2d(
            stem_channels,
            3,
            stride=2,
            padding=1,
            kernel_init=_torch_conv_init,
            name="conv1_0",
            **common,
        )(x)
        x = nn.relu(layers.batch_norm(name="conv1_1", **bn)(x))
        x = layers.max_pool(x, 3, stride=2, padding=1)
        features = {"stem": x}

        for stage, (repeats, channels) in enumerate(
            zip(self.stages_repeats, stage_channels, strict=True), start=2
        ):
            for i in range(repeats):
                x = ShuffleUnit(
                    features=channels,
                    stride=2 if i == 0 else 1,
                    bn_epsilon=self.bn_epsilon,
                    bn_momentum=self.bn_momentum,
                    bn_axis_name=self.bn_axis_name,
                    name=f"stage{stage}_{i}",
                    **common,
                )(x, train=train)
            features[f"stage{stage}"] = x

        x = layers.conv2d(last_channels, 1, kernel_init=_torch_conv_init, name="conv5_0", **common)(
            x
        )
        x = nn.relu(layers.batch_norm(name="conv5_1", **bn)(x))
        features["conv5"] = x
        x = layers.global_avg_pool(x)
        features["pre_logits"] = x
        if not self.num_classes:
            return None, features
        logits = layers.torch_linear(self.num_classes, x.shape[-1], name="fc", **common)(x)
        return logits, features


shufflenet_v2_x1_0 = functools.partial(
    ShuffleNetV2, stages_repeats=(4, 8, 4), stages_out_channels=(24, 116, 232, 464, 1024)
)

register_backbone(
    "shufflenet_v2_x1_0",
    preprocessing=TORCHVISION_IMAGENET,
    weights=WeightsSource(
        # torchvision's file name; its hash prefix is 5666bf0f80 (torch.hub checks it).
        filename="shufflenetv2_x1-5666bf0f80.pth",
        url="https://download.pytorch.org/models/shufflenetv2_x1-5666bf0f80.pth",
        key_mapping=SHUFFLENET_V2_KEYS,
        description="torchvision IMAGENET1K_V1",
    ),
)(shufflenet_v2_x1_0)
