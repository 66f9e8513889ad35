"""Inception-v3 as in torchvision (``torchvision/models/inception.py``, ``Inception3``).

Ported module for module from torchvision, whose pretrained weights were themselves ported
from Google's TensorFlow Inception-v3. The details that differ from the ResNet family:

* every conv is a ``BasicConv2d`` (conv without bias, BatchNorm with ``eps=1e-3``, ReLU);
* the factorised (1, 7)/(7, 1) and (1, 3)/(3, 1) convs pad only along their long axis;
* the stem's and the reduction blocks' max pools have no padding (3x3, stride 2), while the
  pooling branches of InceptionA/C/E average 3x3 windows with stride 1, padding 1 and
  PyTorch's ``count_include_pad=True`` divisor;
* ``transform_input`` maps ImageNet-normalised input onto the ``[-1, 1]`` scaling the Google
  weights were trained with (see :class:`Inception3`);
* the auxiliary classifier ``AuxLogits`` (on ``Mixed_6e``) only runs in training mode.

Flax module names mirror torchvision's state-dict keys (``Mixed_6b.branch7x7_2.conv`` ->
``Mixed_6b/branch7x7_2/conv``), so conversion is the default
:func:`~featsim.backbones.convert.torch_module_path` rule; the classifier head is ``fc``
together with the auxiliary classifier ``AuxLogits`` (see :data:`TORCHVISION_KEYS`).

The ``"pre_logits"`` feature is the 2048-d pooled vector FID calls "pool3", but these are
torchvision's ImageNet weights, not the FID Inception weights of pytorch-fid / TTUR (a
different TensorFlow graph from 2015 with slightly different blocks and weights); FID values
computed from this backbone are not comparable with published FID numbers.

Reference:
    Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from featsim.backbones import layers
from featsim.backbones.convert import KeyMapping
from featsim.backbones.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from featsim.backbones.registry import register_backbone
from featsim.backbones.weights import WeightsSource

__all__ = [
    "FEATURE_BLOCKS",
    "MIN_INPUT_SIZE",
    "TORCHVISION_INCEPTION",
    "TORCHVISION_KEYS",
    "BasicConv2d",
    "Inception3",
    "InceptionA",
    "InceptionAux",
    "InceptionB",
    "InceptionC",
    "InceptionD",
    "InceptionE",
]

Dtype = Any
IntPair = int | tuple[int, int]

# torchvision state-dict keys -> Flax paths: default rule. The head is the classifier `fc`
# and the auxiliary classifier `AuxLogits`, which has no meaning without a classifier: a
# headless model (num_classes=None) or a new head (skip_head=True) leaves out both.
TORCHVISION_KEYS = KeyMapping(head=("fc", "AuxLogits"))

# torchvision's Inception_V3_Weights.IMAGENET1K_V1 transforms: ImageClassification(
# crop_size=299, resize_size=342), bilinear, antialiased, ImageNet mean/std.
TORCHVISION_INCEPTION = Preprocessing(input_size=299, resize_size=342)

# torchvision's meta "min_size": (75, 75); below it Mixed_7a's stride-2 3x3 windows vanish.
MIN_INPUT_SIZE = 75
# The aux head pools Mixed_6e 5x5/3 then applies a 5x5 conv: it needs a 17x17 map (input 299).
_AUX_MIN_SIZE = 17

# Feature key -> torchvision module whose output it is.
FEATURE_BLOCKS = {
    "stem": "maxpool2",
    "stage1": "Mixed_5d",
    "stage2": "Mixed_6e",
    "stage3": "Mixed_7c",
    "pre_logits": "avgpool",
}


def _torch_trunc_normal(stddev: float):
    # torchvision: trunc_normal_(std=stddev, a=-2, b=2). The bounds are absolute, i.e. at
    # least 20 standard deviations for stddev <= 0.1, so this is a plain normal.
    return nn.initializers.normal(stddev)


class _Module(nn.Module):
    """Fields every Inception module shares (set by :class:`Inception3`)."""

    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def _common(self) -> dict:
        return dict(
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            bn_axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
        )

    def _conv(self, features, kernel_size, *, name, stride=1, padding=0, stddev=0.1):
        return BasicConv2d(
            features=features,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            kernel_stddev=stddev,
            name=name,
            **self._common(),
        )


class BasicConv2d(_Module, kw_only=True):
    """torchvision's ``BasicConv2d``: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU.

    Attributes:
        features: output channels.
        kernel_size, stride, padding: int or ``(h, w)`` pair, as in ``torch.nn.Conv2d``.
        kernel_stddev: std of torchvision's (truncated) normal kernel init.
    """

    features: int
    kernel_size: IntPair
    stride: IntPair = 1
    padding: IntPair = 0
    kernel_stddev: float = 0.1

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = layers.conv2d(
            self.features,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            kernel_init=_torch_trunc_normal(self.kernel_stddev),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="conv",
        )(x)
        x = layers.batch_norm(
            train=train,
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
            name="bn",
        )(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    # F.avg_pool2d(x, kernel_size=3, stride=1, padding=1), count_include_pad=True.
    return layers.avg_pool(x, 3, stride=1, padding=1)


class InceptionA(_Module, kw_only=True):
    """35x35 block (Mixed_5b..5d): 1x1, 5x5, double 3x3 and pooling branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv = self._conv
        b1 = conv(64, 1, name="branch1x1")(x, train=train)
        b5 = conv(48, 1, name="branch5x5_1")(x, train=train)
        b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5, train=train)
        b3 = conv(64, 1, name="branch3x3dbl_1")(x, train=train)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3, train=train)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3, train=train)
        bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x), train=train)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3, double 3x3 and max-pool branches."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv = self._conv
        b3 = conv(384, 3, stride=2, name="branch3x3")(x, train=train)
        bd = conv(64, 1, name="branch3x3dbl_1")(x, train=train)
        bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd, train=train)
        bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd, train=train)
        bp = layers.max_pool(x, 3, stride=2)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(_Module, kw_only=True):
    """17x17 block (Mixed_6b..6e) with 7x7 convs factorised into (1, 7) and (7, 1)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv, c7 = self._conv, self.channels_7x7
        row, col = (
            dict(kernel_size=(1, 7), padding=(0, 3)),
            dict(kernel_size=(7, 1), padding=(3, 0)),
        )
        b1 = conv(192, 1, name="branch1x1")(x, train=train)
        b7 = conv(c7, 1, name="branch7x7_1")(x, train=train)
        b7 = conv(c7, **row, name="branch7x7_2")(b7, train=train)
        b7 = conv(192, **col, name="branch7x7_3")(b7, train=train)
        bd = conv(c7, 1, name="branch7x7dbl_1")(x, train=train)
        bd = conv(c7, **col, name="branch7x7dbl_2")(bd, train=train)
        bd = conv(c7, **row, name="branch7x7dbl_3")(bd, train=train)
        bd = conv(c7, **col, name="branch7x7dbl_4")(bd, train=train)
        bd = conv(192, **row, name="branch7x7dbl_5")(bd, train=train)
        bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x), train=train)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Module):
    """Grid reduction 17 -> 8 (Mixed_7a): strided 3x3, 7x7-then-3x3 and max-pool branches."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv = self._conv
        b3 = conv(192, 1, name="branch3x3_1")(x, train=train)
        b3 = conv(320, 3, stride=2, name="branch3x3_2")(b3, train=train)
        b7 = conv(192, 1, name="branch7x7x3_1")(x, train=train)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7, train=train)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7, train=train)
        b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7, train=train)
        bp = layers.max_pool(x, 3, stride=2)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(_Module):
    """8x8 block (Mixed_7b, 7c): 3x3 convs split into parallel (1, 3) and (3, 1) outputs."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv = self._conv
        row, col = (
            dict(kernel_size=(1, 3), padding=(0, 1)),
            dict(kernel_size=(3, 1), padding=(1, 0)),
        )
        b1 = conv(320, 1, name="branch1x1")(x, train=train)
        b3 = conv(384, 1, name="branch3x3_1")(x, train=train)
        b3 = jnp.concatenate(
            [
                conv(384, **row, name="branch3x3_2a")(b3, train=train),
                conv(384, **col, name="branch3x3_2b")(b3, train=train),
            ],
            axis=-1,
        )
        bd = conv(448, 1, name="branch3x3dbl_1")(x, train=train)
        bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd, train=train)
        bd = jnp.concatenate(
            [
                conv(384, **row, name="branch3x3dbl_3a")(bd, train=train),
                conv(384, **col, name="branch3x3dbl_3b")(bd, train=train),
            ],
            axis=-1,
        )
        bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x), train=train)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _linear(features: int, in_features: int, *, stddev: float, name: str, **kwargs) -> nn.Dense:
    """``torch.nn.Linear`` with torchvision's Inception init: normal(stddev) weight, default
    PyTorch bias ``U(-1/sqrt(in), 1/sqrt(in))`` (torchvision leaves the bias alone)."""
    bound = 1.0 / np.sqrt(in_features)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.Dense(
        features, kernel_init=_torch_trunc_normal(stddev), bias_init=bias_init, name=name, **kwargs
    )


class InceptionAux(_Module, kw_only=True):
    """The auxiliary classifier on Mixed_6e: avg-pool 5x5/3, 1x1 conv, 5x5 conv, fc.

    Needs a Mixed_6e map of at least 17x17 (input 299 and up), as in torchvision.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if min(x.shape[1:3]) < _AUX_MIN_SIZE:
            raise ValueError(
                f"the auxiliary classifier needs a Mixed_6e map of at least {_AUX_MIN_SIZE}x"
                f"{_AUX_MIN_SIZE} (input >= 299), got {x.shape[1:3]}; train at 299 or build "
                "the model with aux_logits=False"
            )
        x = layers.avg_pool(x, 5, stride=3)
        x = self._conv(128, 1, name="conv0")(x, train=train)
        x = self._conv(768, 5, stddev=0.01, name="conv1")(x, train=train)
        x = layers.global_avg_pool(x)
        return _linear(
            self.num_classes,
            x.shape[-1],
            stddev=0.001,
            name="fc",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
        )(x)


class Inception3(_Module):
    """torchvision's Inception-v3 on NHWC input.

    Attributes:
        num_classes: classifier outputs (1 for a sigmoid head); ``None`` or 0 for no head,
            in which case ``logits`` is ``None`` and neither ``fc`` nor ``AuxLogits``
            parameters exist.
        aux_logits: build the auxiliary classifier ``AuxLogits`` (torchvision's default,
            and what torchvision's checkpoint holds: its ``AuxLogits.*`` weights load into
            it, since featsim never drops checkpoint keys silently). It only runs with
            ``train=True``, where its output is ``features["aux_logits"]`` (for an auxiliary
            loss term) and needs inputs of at least 299x299. With
            ``aux_logits=False`` (e.g. to train at smaller sizes) a torchvision checkpoint
            loads with a new head (``load_pretrained(..., skip_head=True)``: ``fc`` and
            ``AuxLogits`` are the head); with its 1000-class ``fc`` it does not load, the
            ``AuxLogits.*`` keys being reported, unless they are removed from it first.
        transform_input: torchvision's ``transform_input``: take ImageNet-normalised input
            (``(p / 255 - mean) / std``, what :data:`TORCHVISION_INCEPTION` produces) and
            re-normalise it per channel to ``(p / 255 - 0.5) / 0.5``, the ``[-1, 1]``
            scaling the ported Google weights expect. Default True, as torchvision sets it
            when loading these weights. Set it False for input already scaled to
            ``[-1, 1]`` (``Preprocessing(..., scaling="[-1,1]")``) or for weights trained on
            ImageNet-normalised input.
        dropout_rate: dropout before ``fc`` in training mode (torchvision's ``dropout``);
            needs ``rngs={"dropout": key}`` when positive.
        bn_epsilon: BatchNorm epsilon (torchvision's Inception: 1e-3).
        bn_momentum: BatchNorm momentum, Flax convention (0.9 == PyTorch's 0.1).
        bn_axis_name: axis name for synchronised BatchNorm under ``pmap``; None otherwise.
        dtype: computation dtype; BatchNorm statistics stay float32.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` for convs and the heads. On GPUs/TPUs the default
            may use TF32/bf16 passes for float32; pass ``"highest"`` for bit-faithful checks.

    ``__call__(x, *, train=False)`` takes ``x`` of shape ``[N, H, W, 3]`` with
    ``H, W >= 75`` (299 is the native size) and returns ``(logits, features)``: ``logits``
    is ``[N, num_classes]`` (or ``None``) and ``features`` holds (see
    :data:`FEATURE_BLOCKS`) ``"stem"`` (after ``maxpool2``, 192 channels, 35x35 at 299),
    ``"stage1"`` (``Mixed_5d``, 288 channels, 35x35), ``"stage2"`` (``Mixed_6e``, 768,
    17x17), ``"stage3"`` (``Mixed_7c``, 2048, 8x8) and ``"pre_logits"`` (the globally
    pooled ``[N, 2048]`` vector, before dropout). With ``train=True`` call
    ``apply(..., mutable=["batch_stats"], rngs={"dropout": key})``; ``features`` then also
    holds ``"aux_logits"`` ``[N, num_classes]`` when the model has the auxiliary classifier.

    Example:
        >>> model = Inception3(num_classes=10)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
        >>> logits, feats = model.apply(variables, jnp.zeros((2, 299, 299, 3)))
        >>> logits.shape, feats["pre_logits"].shape
        ((2, 10), (2, 2048))
    """

    num_classes: int | None = 1000
    aux_logits: bool = True
    transform_input: bool = True
    dropout_rate: float = 0.5

    def _transform_input(self, x):
        # torchvision: x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5, channel by channel.
        scale = np.asarray(IMAGENET_STD, np.float32) / np.float32(0.5)
        shift = (np.asarray(IMAGENET_MEAN, np.float32) - np.float32(0.5)) / np.float32(0.5)
        return x * scale + shift

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_backbone_input("Inception3", x, self.num_classes)
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"Inception3 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} "
                f"(299x299 native), got spatial size {x.shape[1:3]}"
            )
        if self.transform_input:
            x = self._transform_input(x)

        conv = self._conv
        common = self._common()
        features = {}
        x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x, train=train)
        x = conv(32, 3, name="Conv2d_2a_3x3")(x, train=train)
        x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x, train=train)
        x = layers.max_pool(x, 3, stride=2)
        x = conv(80, 1, name="Conv2d_3b_1x1")(x, train=train)
        x = conv(192, 3, name="Conv2d_4a_3x3")(x, train=train)
        x = layers.max_pool(x, 3, stride=2)
        features["stem"] = x

        x = InceptionA(pool_features=32, name="Mixed_5b", **common)(x, train=train)
        x = InceptionA(pool_features=64, name="Mixed_5c", **common)(x, train=train)
        x = InceptionA(pool_features=64, name="Mixed_5d", **common)(x, train=train)
        features["stage1"] = x
        x = InceptionB(name="Mixed_6a", **common)(x, train=train)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(channels_7x7=c7, name=name, **common)(x, train=train)
        features["stage2"] = x

        if self.num_classes and self.aux_logits:
            aux = InceptionAux(num_classes=self.num_classes, name="AuxLogits", **common)
            if train:
                features["aux_logits"] = aux(x, train=True)
            elif self.is_initializing():
                # The aux head's parameters must exist in eval mode too (checkpoints hold
                # them), at any input size: create them from a 17x17 Mixed_6e placeholder.
                aux(jnp.zeros((1, _AUX_MIN_SIZE, _AUX_MIN_SIZE, x.shape[-1]), x.dtype))

        x = InceptionD(name="Mixed_7a", **common)(x, train=train)
        x = InceptionE(name="Mixed_7b", **common)(x, train=train)
        x = InceptionE(name="Mixed_7c", **common)(x, train=train)
        features["stage3"] = x

        x = layers.global_avg_pool(x)
        features["pre_logits"] = x
        if not self.num_classes:
            return None, features
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = _linear(
            self.num_classes,
            x.shape[-1],
            stddev=0.1,
            name="fc",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
        )(x)
        return logits, features


register_backbone(
    "inception_v3",
    preprocessing=TORCHVISION_INCEPTION,
    weights=WeightsSource(
        filename="inception_v3_google-0cc3c7bd.pth",
        url="https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
        key_mapping=TORCHVISION_KEYS,
        description="torchvision IMAGENET1K_V1 (ported from TensorFlow; transform_input=True)",
    ),
)(Inception3)
