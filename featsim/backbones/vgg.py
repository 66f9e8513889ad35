"""VGG as in torchvision (``torchvision/models/vgg.py``), without BatchNorm.

Flax module names are torchvision's state-dict keys under the default
:func:`~featsim.backbones.convert.torch_module_path` rule: the convs keep their index in
torchvision's ``features`` Sequential (``features.28`` -> ``features_28``) and the three
Linears theirs in ``classifier`` (``classifier_0``, ``classifier_3``, ``classifier_6``, the
last being the head). Conversion needs no permutation: the 7x7 pooled map is flattened in
PyTorch's channel-major (C, H, W) order, so ``classifier.0.weight`` applies unchanged.

References:
    Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
    Recognition", ICLR 2015.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from featsim.backbones import layers
from featsim.backbones.convert import KeyMapping
from featsim.backbones.preprocessing import TORCHVISION_IMAGENET
from featsim.backbones.registry import register_backbone
from featsim.backbones.weights import WeightsSource

__all__ = [
    "TORCHVISION_KEYS",
    "VGG",
    "VGG16_STAGES",
    "adaptive_avg_pool",
    "vgg16",
]

Dtype = Any

# torchvision state-dict keys -> Flax paths: default rule, the head is `classifier.6`.
TORCHVISION_KEYS = KeyMapping(head=("classifier.6",))

# torchvision's configuration "D": conv widths per stage, each stage ending in a 2x2 max-pool.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    # PyTorch's adaptive pooling: window i is [floor(i * size / out), ceil((i + 1) * size / out)).
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(x, output_size: int | tuple[int, int]):
    """``torch.nn.functional.adaptive_avg_pool2d`` on NHWC input.

    Output cell ``(i, j)`` averages rows ``[floor(i*H/oh), ceil((i+1)*H/oh))`` and columns
    ``[floor(j*W/ow), ceil((j+1)*W/ow))``, as PyTorch does: windows may overlap or repeat
    rows when the input is not a multiple of (or is smaller than) the output size.

    Args:
        x: float array of shape ``[N, H, W, C]``.
        output_size: ``oh`` (square) or ``(oh, ow)``.

    Returns:
        Array of shape ``[N, oh, ow, C]`` and ``x``'s dtype.

    Raises:
        ValueError: ``x`` is not rank 4, or an output size is not positive.

    Example:
        >>> adaptive_avg_pool(jnp.ones((2, 3, 3, 512)), 7).shape
        (2, 7, 7, 512)
    """
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool expects NHWC input of rank 4, got shape {x.shape}")
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    if oh < 1 or ow < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    h, w = x.shape[1:3]
    # A rectangle's mean is the mean over its rows of the row means: pool H, then W.
    rows = jnp.stack([x[:, s:e].mean(axis=1) for s, e in _adaptive_windows(h, oh)], axis=1)
    out = jnp.stack([rows[:, :, s:e].mean(axis=2) for s, e in _adaptive_windows(w, ow)], axis=2)
    return out.astype(x.dtype)


class VGG(nn.Module):
    """torchvision's VGG (no BatchNorm) on NHWC input.

    Attributes:
        stages: conv widths per stage; each stage is 3x3 conv + ReLU layers followed by a
            2x2 max-pool (:data:`VGG16_STAGES` for VGG-16).
        num_classes: outputs of the last Linear (1 for a sigmoid head); ``None`` or 0 for no
            head, in which case ``logits`` is ``None`` and no ``classifier_6`` parameters
            exist. The first two Linears (4096-d) are kept: they produce ``pre_logits``.
        dropout: dropout rate after the first two Linears in training (torchvision: 0.5);
            ``train=True`` then needs ``rngs={"dropout": key}``.
        dtype: computation dtype.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` for convs and Linears. On GPUs/TPUs the default may
            use TF32/bf16 passes for float32; pass ``"highest"`` for bit-faithful checks.

    ``__call__(x, *, train=False)`` takes ``x`` of shape ``[N, H, W, 3]`` (H, W >= 32) and
    returns ``(logits, features)``: ``logits`` is ``[N, num_classes]`` (or ``None``) and
    ``features`` holds

    * ``"stage1"``..``"stage5"``: NHWC, after each stage's max-pool (strides 2..32);
    * ``"stem"``: VGG has no stem separate from its stages; this is ``stage1`` (the same
      values), kept so every backbone exposes the same keys. Leave one of the two out of
      layer-by-layer comparisons;
    * ``"pooled"``: ``[N, 512 * 7 * 7]``, ``stage5`` after ``AdaptiveAvgPool2d((7, 7))``,
      flattened in PyTorch's (C, H, W) order (what ``torch.flatten(x, 1)`` gives on NCHW);
    * ``"pre_logits"``: ``[N, 4096]``, the output of the second Linear + ReLU (+ dropout
      in training), the vector the last Linear sees. Unlike the conv families' pooled
      ``pre_logits``, this has passed through two ImageNet-trained fully connected layers.

    Dropout only acts with ``train=True``; there is no BatchNorm, so no ``batch_stats``.

    Example:
        >>> model = VGG(stages=VGG16_STAGES, num_classes=10)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        >>> logits, feats = model.apply(variables, jnp.zeros((2, 224, 224, 3)))
        >>> logits.shape, feats["pooled"].shape, feats["pre_logits"].shape
        ((2, 10), (2, 25088), (2, 4096))
    """

    stages: Sequence[Sequence[int]] = VGG16_STAGES
    num_classes: int | None = 1000
    dropout: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_backbone_input("VGG", x, self.num_classes)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        features = {}
        index = 0  # position in torchvision's `features` Sequential: conv, ReLU, ..., pool
        for i, widths in enumerate(self.stages):
            for width in widths:
                conv = layers.conv2d(
                    width, 3, padding=1, use_bias=True, name=f"features_{index}", **common
                )
                x = nn.relu(conv(x))
                index += 2
            x = layers.max_pool(x, 2, stride=2)
            index += 1
            features[f"stage{i + 1}"] = x
        features["stem"] = features["stage1"]

        x = adaptive_avg_pool(x, 7)
        # torch.flatten on NCHW is channel-major: flatten that way so that
        # classifier.0.weight loads without a permutation.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        features["pooled"] = x

        # torchvision's Linear init: N(0, 0.01) weights, zero bias.
        dense = functools.partial(
            nn.Dense,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.zeros,
            **common,
        )
        for name in ("classifier_0", "classifier_3"):
            x = nn.relu(dense(4096, name=name)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        features["pre_logits"] = x
        if not self.num_classes:
            return None, features
        return dense(self.num_classes, name="classifier_6")(x), features


def _torchvision(filename: str) -> WeightsSource:
    return WeightsSource(
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        key_mapping=TORCHVISION_KEYS,
        description="torchvision IMAGENET1K_V1",
    )


vgg16 = functools.partial(VGG, stages=VGG16_STAGES)

register_backbone(
    "vgg16", preprocessing=TORCHVISION_IMAGENET, weights=_torchvision("vgg16-397923af.pth")
)(vgg16)
