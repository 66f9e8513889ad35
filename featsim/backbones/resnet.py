"""ResNet, ResNeXt and Wide ResNet as in torchvision (``torchvision/models/resnet.py``).

torchvision's "v1.5" ResNet: the stride of a downsampling bottleneck sits on its 3x3 conv,
not the first 1x1. Flax module names mirror torchvision's state-dict keys
(``layer1.0.downsample.0`` -> ``layer1_0/downsample_0``), so conversion is the default
:func:`~featsim.backbones.convert.torch_module_path` rule plus the ``fc`` head.

References:
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017.
    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from featsim.backbones import layers
from featsim.backbones.convert import KeyMapping
from featsim.backbones.preprocessing import TORCHVISION_IMAGENET
from featsim.backbones.registry import register_backbone
from featsim.backbones.weights import WeightsSource

__all__ = [
    "TORCHVISION_KEYS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
]

Dtype = Any

# torchvision state-dict keys -> Flax paths: default rule, classifier is `fc`.
TORCHVISION_KEYS = KeyMapping(head=("fc",))


class _Block(nn.Module):
    """Fields shared by both residual blocks (set by :class:`ResNet`)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def _layers(self, train: bool):
        return layers.conv_and_norm(self, train)

    def _shortcut(self, x, conv, norm, out_features: int):
        if not self.downsample:
            return x
        x = conv(out_features, 1, stride=self.stride, name="downsample_0")(x)
        return norm(name="downsample_1")(x)


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34); ``expansion = 1``."""

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if self.groups != 1 or self.base_width != 64:
            raise ValueError(
                "BasicBlock only supports groups=1 and width_per_group=64 (as torchvision), "
                f"got groups={self.groups}, width_per_group={self.base_width}"
            )
        conv, norm = self._layers(train)
        y = conv(self.planes, 3, stride=self.stride, padding=1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.planes, 3, padding=1, name="conv2")(y)
        y = norm(name="bn2")(y)
        return nn.relu(y + self._shortcut(x, conv, norm, self.planes))


class Bottleneck(_Block):
    """1x1 -> grouped 3x3 (stride here: v1.5) -> 1x1; ``expansion = 4``."""

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv, norm = self._layers(train)
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        out_features = self.planes * self.expansion
        y = conv(width, 1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(width, 3, stride=self.stride, padding=1, groups=self.groups, name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y))
        y = conv(out_features, 1, name="conv3")(y)
        y = norm(name="bn3")(y)
        return nn.relu(y + self._shortcut(x, conv, norm, out_features))


class ResNet(nn.Module):
    """torchvision's ResNet family on NHWC input.

    Attributes:
        stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
        num_classes: classifier outputs (1 for a sigmoid head); ``None`` or 0 for no head,
            in which case ``logits`` is ``None`` and no ``fc`` parameters exist.
        groups: ResNeXt cardinality (3x3 conv groups).
        width_per_group: ResNeXt/Wide-ResNet width; 64 is plain ResNet, 128 is "wide _2".
        bn_epsilon: BatchNorm epsilon (torchvision: 1e-5).
        bn_momentum: BatchNorm momentum, Flax convention (0.9 == PyTorch's 0.1).
        bn_axis_name: axis name for synchronised BatchNorm under ``pmap``; None otherwise.
        dtype: computation dtype; BatchNorm statistics stay float32.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` for convs and the head. On GPUs/TPUs the default
            may use TF32/bf16 passes for float32; pass ``"highest"`` for bit-faithful checks.

    ``__call__(x, *, train=False)`` takes ``x`` of shape ``[N, H, W, 3]`` and returns
    ``(logits, features)``: ``logits`` is ``[N, num_classes]`` (or ``None``) and
    ``features`` holds ``"stem"`` (after the max-pool), ``"stage1"``..``"stage4"`` (NHWC)
    and ``"pre_logits"`` (the globally pooled ``[N, C]`` vector the head sees). With
    ``train=True``, call ``apply(..., mutable=["batch_stats"])``.

    Example:
        >>> model = ResNet(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, num_classes=10)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        >>> logits, feats = model.apply(variables, jnp.zeros((2, 224, 224, 3)))
        >>> logits.shape, feats["pre_logits"].shape
        ((2, 10), (2, 512))
    """

    stage_sizes: Sequence[int]
    block_cls: type[_Block]
    num_classes: int | None = 1000
    groups: int = 1
    width_per_group: int = 64
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_backbone_input("ResNet", x, self.num_classes)
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        bn = dict(
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            axis_name=self.bn_axis_name,
        )
        features = {}
        x = layers.conv2d(
            64, 7, stride=2, padding=3, name="conv1", precision=self.precision, **common
        )(x)
        x = nn.relu(layers.batch_norm(train=train, name="bn1", **bn, **common)(x))
        x = layers.max_pool(x, 3, stride=2, padding=1)
        features["stem"] = x

        in_features = 64
        for i, num_blocks in enumerate(self.stage_sizes):
            planes = 64 * 2**i
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                out_features = planes * self.block_cls.expansion
                x = self.block_cls(
                    planes=planes,
                    stride=stride,
                    downsample=stride != 1 or in_features != out_features,
                    groups=self.groups,
                    base_width=self.width_per_group,
                    bn_epsilon=self.bn_epsilon,
                    bn_momentum=self.bn_momentum,
                    bn_axis_name=self.bn_axis_name,
                    precision=self.precision,
                    name=f"layer{i + 1}_{j}",
                    **common,
                )(x, train=train)
                in_features = out_features
            features[f"stage{i + 1}"] = x

        x = layers.global_avg_pool(x)
        features["pre_logits"] = x
        if not self.num_classes:
            return None, features
        logits = layers.torch_linear(
            self.num_classes, x.shape[-1], name="fc", precision=self.precision, **common
        )(x)
        return logits, features


def _torchvision(filename: str) -> WeightsSource:
    return WeightsSource(
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        key_mapping=TORCHVISION_KEYS,
        description="torchvision IMAGENET1K_V1",
    )


resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
resnext50_32x4d = functools.partial(resnet50, groups=32, width_per_group=4)
wide_resnet50_2 = functools.partial(resnet50, width_per_group=128)

for _name, _factory, _filename in (
    ("resnet18", resnet18, "resnet18-f37072fd.pth"),
    ("resnet50", resnet50, "resnet50-0676ba61.pth"),
    ("resnext50_32x4d", resnext50_32x4d, "resnext50_32x4d-7cdf4587.pth"),
    ("wide_resnet50_2", wide_resnet50_2, "wide_resnet50_2-95faca4d.pth"),
):
    register_backbone(_name, preprocessing=TORCHVISION_IMAGENET, weights=_torchvision(_filename))(
        _factory
    )
