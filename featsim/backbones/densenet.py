"""DenseNet-BC as in torchvision (``torchvision/models/densenet.py``).

Flax module names mirror torchvision's state-dict keys without the ``features.`` prefix
(``features.denseblock1.denselayer1.norm1`` -> ``denseblock1/denselayer1/norm1``,
``classifier`` stays ``classifier``). torchvision's published checkpoints predate that naming
and store ``...denselayer1.norm.1.weight`` for ``...denselayer1.norm1.weight`` (torchvision
renames them with a regex in ``_load_state_dict``); :data:`TORCHVISION_KEYS` accepts both.

torchvision's ``memory_efficient`` flag only checkpoints the bottleneck to save memory in
training; it does not change what is computed and has no equivalent field here (wrap the
module in ``flax.linen.remat`` for that).

References:
    Huang et al., "Densely Connected Convolutional Networks", CVPR 2017.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from featsim.backbones import layers
from featsim.backbones.convert import KeyMapping, torch_module_path
from featsim.backbones.preprocessing import TORCHVISION_IMAGENET
from featsim.backbones.registry import register_backbone
from featsim.backbones.weights import WeightsSource

__all__ = [
    "TORCHVISION_KEYS",
    "DenseNet",
    "densenet121",
    "densenet161",
]

Dtype = Any

# torchvision's DenseNet conv init: kaiming_normal_ with its defaults (fan_in, relu gain).
_kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torchvision's published checkpoints name a dense layer's modules `norm.1`, `conv.2`, ...
# (the pattern of torchvision's `_load_state_dict`, applied to module prefixes).
_LEGACY_LAYER = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])$")


def _torchvision_module_path(prefix: str) -> tuple[str, ...]:
    """``features.denseblock1.denselayer1.norm.1`` (or ``.norm1``) -> ``denseblock1/...``."""
    prefix = _LEGACY_LAYER.sub(r"\1\2", prefix)
    if prefix.startswith("features."):
        return torch_module_path(prefix.removeprefix("features."))
    if prefix == "classifier":
        return ("classifier",)
    # Not a torchvision DenseNet key: a path no Flax module has, so it is reported unmatched.
    return (f"<unmapped {prefix}>",)


# torchvision state-dict keys (new or legacy layer names) -> Flax paths; head is `classifier`.
TORCHVISION_KEYS = KeyMapping(module_path=_torchvision_module_path, head=("classifier",))


_COMMON_FIELDS = ("bn_epsilon", "bn_momentum", "bn_axis_name", "dtype", "param_dtype", "precision")


def _conv_and_norm(module: nn.Module, train: bool):
    """torchvision-initialised conv and BatchNorm factories with ``module``'s common fields."""
    return layers.conv_and_norm(module, train, kernel_init=_kaiming_normal_fan_in)


class _Common(nn.Module):
    """Fields every DenseNet submodule shares (set by :class:`DenseNet`)."""

    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None


class _DenseLayer(_Common):
    """BN-ReLU-1x1 conv (``bn_size * growth_rate``) -> BN-ReLU-3x3 conv (``growth_rate``)."""

    growth_rate: int = 32
    bn_size: int = 4
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv, norm = _conv_and_norm(self, train)
        y = nn.relu(norm(name="norm1")(x))
        y = conv(self.bn_size * self.growth_rate, 1, name="conv1")(y)
        y = nn.relu(norm(name="norm2")(y))
        y = conv(self.growth_rate, 3, padding=1, name="conv2")(y)
        if self.drop_rate > 0:
            y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
        return y


class _DenseBlock(_Common):
    """``num_layers`` dense layers; each sees the concatenation of all earlier outputs."""

    num_layers: int = 1
    growth_rate: int = 32
    bn_size: int = 4
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        common = {f: getattr(self, f) for f in _COMMON_FIELDS}
        for i in range(self.num_layers):
            new = _DenseLayer(
                growth_rate=self.growth_rate,
                bn_size=self.bn_size,
                drop_rate=self.drop_rate,
                name=f"denselayer{i + 1}",
                **common,
            )(x, train=train)
            # Channel order as torch.cat(features, 1): input first, then each new layer.
            x = jnp.concatenate([x, new], axis=-1)
        return x


class _Transition(_Common):
    """BN-ReLU-1x1 conv (``out_features``) -> 2x2 average pool, stride 2."""

    out_features: int = 1

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv, norm = _conv_and_norm(self, train)
        x = nn.relu(norm(name="norm")(x))
        x = conv(self.out_features, 1, name="conv")(x)
        return layers.avg_pool(x, 2, stride=2)


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC on NHWC input.

    Attributes:
        growth_rate: channels each dense layer adds (``k`` in the paper).
        block_config: dense layers per block, e.g. ``(6, 12, 24, 16)`` for DenseNet-121.
        num_init_features: channels of the first convolution.
        bn_size: bottleneck width factor (the 1x1 conv has ``bn_size * growth_rate`` outputs).
        drop_rate: dropout after each dense layer in training (needs a ``"dropout"`` rng);
            torchvision's models use 0.
        num_classes: classifier outputs (1 for a sigmoid head); ``None`` or 0 for no head,
            in which case ``logits`` is ``None`` and no ``classifier`` parameters exist.
        bn_epsilon: BatchNorm epsilon (torchvision: 1e-5).
        bn_momentum: BatchNorm momentum, Flax convention (0.9 == PyTorch's 0.1).
        bn_axis_name: axis name for synchronised BatchNorm under ``pmap``; None otherwise.
        dtype: computation dtype; BatchNorm statistics stay float32.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` for convs and the head. On GPUs/TPUs the default
            may use TF32/bf16 passes for float32; pass ``"highest"`` for bit-faithful checks.

    ``__call__(x, *, train=False)`` takes ``x`` of shape ``[N, H, W, 3]`` and returns
    ``(logits, features)``: ``logits`` is ``[N, num_classes]`` (or ``None``) and
    ``features`` holds (NHWC unless stated):

    * ``"stem"``: after ``conv0``-``norm0``-ReLU-``pool0`` (stride 4);
    * ``"stageI"``: the output of ``denseblockI``, *before* the transition that follows it
      (all of the block's concatenated channels, at the block's resolution), so every stage
      is taken at the same point and ``stage4`` (which has no transition, and is taken
      before ``norm5``) is like the others. The channels are the block's input followed by
      each dense layer's raw 3x3 conv output, neither normalised nor rectified (unlike
      ResNet's post-ReLU stages), so they can be negative. For DenseNet-121 at 224:
      256x56x56, 512x28x28, 1024x14x14, 1024x7x7 (C x H x W);
    * ``"pre_logits"``: ``[N, C]``, ``norm5``-ReLU-global average pool of ``stage4``, the
      vector torchvision's classifier sees.

    With ``train=True``, call ``apply(..., mutable=["batch_stats"])``.

    Example:
        >>> model = DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_classes=10)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        >>> logits, feats = model.apply(variables, jnp.zeros((2, 224, 224, 3)))
        >>> logits.shape, feats["pre_logits"].shape
        ((2, 10), (2, 1024))
    """

    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    num_classes: int | None = 1000
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_backbone_input("DenseNet", x, self.num_classes)
        common = {f: getattr(self, f) for f in _COMMON_FIELDS}
        conv, norm = _conv_and_norm(self, train)
        features = {}
        x = conv(self.num_init_features, 7, stride=2, padding=3, name="conv0")(x)
        x = nn.relu(norm(name="norm0")(x))
        x = layers.max_pool(x, 3, stride=2, padding=1)
        features["stem"] = x

        num_features = self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            x = _DenseBlock(
                num_layers=num_layers,
                growth_rate=self.growth_rate,
                bn_size=self.bn_size,
                drop_rate=self.drop_rate,
                name=f"denseblock{i + 1}",
                **common,
            )(x, train=train)
            features[f"stage{i + 1}"] = x
            num_features += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                num_features //= 2
                x = _Transition(out_features=num_features, name=f"transition{i + 1}", **common)(
                    x, train=train
                )

        x = nn.relu(norm(name="norm5")(x))
        x = layers.global_avg_pool(x)
        features["pre_logits"] = x
        if not self.num_classes:
            return None, features
        # torchvision: default Linear weight init, zero bias.
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            bias_init=nn.initializers.zeros,
            name="classifier",
        )(x)
        return logits, features


def _torchvision(filename: str) -> WeightsSource:
    return WeightsSource(
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        key_mapping=TORCHVISION_KEYS,
        description="torchvision IMAGENET1K_V1",
    )


densenet121 = functools.partial(
    DenseNet, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64
)
densenet161 = functools.partial(
    DenseNet, growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96
)

for _name, _factory, _filename in (
    ("densenet121", densenet121, "densenet121-a639ec97.pth"),
    ("densenet161", densenet161, "densenet161-8d451a50.pth"),
):
    register_backbone(_name, preprocessing=TORCHVISION_IMAGENET, weights=_torchvision(_filename))(
        _factory
    )
