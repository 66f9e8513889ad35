"""El Azhari's small SeparableConv2D CNN (their Table 1), trained from scratch.

M. El Azhari, "Transfer learning for Covid-19 detection in medical images"
(``shared/papers/el-azhari-covid-transfer-learning.md``, Fig. 1 / Table 1) compares five
ImageNet backbones with this Keras model, trained from scratch:

===  ==================  ====================  ==============  ===================  ==============
row  Table 1 layer       Table 1 output shape  Table 1 params  here: shape, params  tap
===  ==================  ====================  ==============  ===================  ==============
1    SeparableConv2D     198 x 198 x 16        91              same, 91
2    MaxPooling          99 x 99 x 16          0               same, 0              ``stem``
3    SeparableConv2D     97 x 97 x 16          416             same, 416
4    MaxPooling          48 x 48 x 16          0               same, 0
5    BatchNormalization  48 x 48 x 16          64              same, 64             ``stage1``
6    SeparableConv2D     48 x 48 x 32 (!)      688             46 x 46 x 32, 688
7    MaxPooling          23 x 23 x 32          0               same, 0
8    BatchNormalization  23 x 23 x 32          128             same, 128            ``stage2``
9    SeparableConv2D     21 x 21 x 32          1344            same, 1344
10   MaxPooling          10 x 10 x 32          0               same, 0
11   BatchNormalization  10 x 10 x 32          128             same, 128
12   Dropout             10 x 10 x 32          0               same, 0              ``stage3``
13   SeparableConv2D     8 x 8 x 64            64 (!)          same, 2400
14   SeparableConv2D     8 x 8 x 64            2400 (!)        same, 4736
15   MaxPooling          4 x 4 x 64            0               same, 0              ``stage4``
16   SeparableConv2D     2 x 2 x 64            4736            same, 4736
17   MaxPooling          1 x 1 x 64            0               same, 0
18   BatchNormalization  1 x 1 x 64            256             same, 256            ``stage5``
19   Flatten             64                    65000 (!)       same, 0              ``pooled``
20   Dense               1000                  0 (!)           same, 65000          ``pre_logits``
21   Dense               2                     2002            same, 2002           logits
===  ==================  ====================  ==============  ===================  ==============

Total: 81,989 parameters here (Keras' count: BatchNorm's moving mean and variance included,
i.e. ``params`` + ``batch_stats``); the table's column sums to 77,317.

Keras semantics reproduced: ``SeparableConv2D(filters, 3)`` is a 3x3 depthwise conv
(``depth_multiplier=1``, no bias) followed by a 1x1 pointwise conv with the layer's one bias,
so it has ``9 C_in + C_in C_out + C_out`` parameters; padding ``"valid"`` (the Keras default)
except row 14, whose 8 x 8 -> 8 x 8 needs ``"same"``; ``MaxPooling2D()`` is 2x2, stride 2,
floor; ``BatchNormalization()`` has momentum 0.99 and epsilon 1e-3; Flatten is channels-last
(H, W, C) order; initialisers are Keras' (Glorot-uniform kernels, zero biases). The first
row's 198 x 198 output fixes the input at 200 x 200 x 3 (any input of at least 190 px runs;
only 200 gives the 64-d Flatten of the table, larger inputs widen the Dense(1000) layer).

Where Table 1 does not add up (marked (!) above), and what this module does:

* **Row 6** (third SeparableConv2D, 688 params = 16*9 + 16*32 + 32, consistent): its output
  is listed as 48 x 48 x 32 (``"same"`` padding), but the next row, a 2x2 MaxPooling, gives
  23 x 23, which only a 46 x 46 (or 47 x 47) input can (48 -> 24). Here the conv is
  ``"valid"`` (48 -> 46 -> 23), which reproduces every later shape of the table (23, 21,
  10, 8, 8, 4, 2, 1); reading it as ``"same"`` would put all of them off by one (24, 22, 11,
  9, 9, 4, ...). Parameter counts do not depend on this choice.
* **Rows 13-14** (the two 8 x 8 x 64 SeparableConv2D): 64 parameters is impossible for a
  SeparableConv2D with 64 filters and a bias (the pointwise bias alone is 64, the pointwise
  kernel another ``32 * 64``). Row 13 maps 10 x 10 x 32 -> 8 x 8 x 64: 288 + 2048 + 64 =
  **2400**, the number printed on row 14. Row 14 maps 8 x 8 x 64 -> 8 x 8 x 64: 576 + 4096 +
  64 = **4736**, the number printed on row 16, which row 16 (4 x 4 x 64 -> 2 x 2 x 64) also
  has. The printed column looks shifted down by one row here; this module has 2400 and 4736.
* **Rows 19-20** (Flatten, Dense(1000)): Flatten has no parameters and Dense(64 -> 1000) has
  64 * 1000 + 1000 = 65000: the two entries are swapped (the total is unaffected).

Not stated by the paper, so chosen here: ReLU after every SeparableConv2D and after
Dense(1000) (Keras' usual choice; the table cannot show activations), softmax on the last
Dense (here: logits; featsim's binary training uses one sigmoid output, ``num_classes=1``),
and the Dropout rate (0.2 by default, a field). Preprocessing: the paper resizes images and
scales them to [0, 1]; Keras' image loader resizes with nearest-neighbour interpolation by
default (:data:`ELAZHARI_PREPROCESSING`). There are no pretrained weights.

References:
    M. El Azhari, "Transfer learning for Covid-19 detection in medical images" (Fig. 1,
    Table 1, sec. 3.1).
    Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", CVPR 2017
    (the SeparableConv2D layer).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from featsim.backbones import layers
from featsim.backbones.preprocessing import Preprocessing
from featsim.backbones.registry import register_backbone

__all__ = [
    "ELAZHARI_PREPROCESSING",
    "ELAZHARI_TABLE1",
    "MIN_INPUT_SIZE",
    "ElAzhariCNN",
    "SeparableConv2D",
]

Dtype = Any

# Keras' default initialisers: glorot_uniform kernels (the depthwise kernel's fans, 9 C and
# 9, sum to the same as Flax's view of a [3, 3, 1, C] kernel, so the distribution is Keras').
_glorot = nn.initializers.glorot_uniform()

#: The 200 x 200 x 3 input the table's first row implies, scaled to [0, 1].
ELAZHARI_PREPROCESSING = Preprocessing(
    input_size=200, resize_size=200, crop="none", interpolation="nearest", antialias=False,
    scaling="[0,1]")

#: Table 1 as printed: ``(layer, output shape without batch, params)`` per row.
ELAZHARI_TABLE1 = (
    ("SeparableConv2D", (198, 198, 16), 91),
    ("MaxPooling", (99, 99, 16), 0),
    ("SeparableConv2D", (97, 97, 16), 416),
    ("MaxPooling", (48, 48, 16), 0),
    ("BatchNormalization", (48, 48, 16), 64),
    ("SeparableConv2D", (48, 48, 32), 688),
    ("MaxPooling", (23, 23, 32), 0),
    ("BatchNormalization", (23, 23, 32), 128),
    ("SeparableConv2D", (21, 21, 32), 1344),
    ("MaxPooling", (10, 10, 32), 0),
    ("BatchNormalization", (10, 10, 32), 128),
    ("Dropout", (10, 10, 32), 0),
    ("SeparableConv2D", (8, 8, 64), 64),
    ("SeparableConv2D", (8, 8, 64), 2400),
    ("MaxPooling", (4, 4, 64), 0),
    ("SeparableConv2D", (2, 2, 64), 4736),
    ("MaxPooling", (1, 1, 64), 0),
    ("BatchNormalization", (1, 1, 64), 256),
    ("Flatten", (64,), 65000),
    ("Dense", (1000,), 0),
    ("Dense", (2,), 2002),
)

#: Smallest input side the valid convs and pools leave at least 1 x 1 for.
MIN_INPUT_SIZE = 190

# (filters, padding) of the seven SeparableConv2D layers; "valid" for row 6: see above.
_CONVS = ((16, "valid"), (16, "valid"), (32, "valid"), (32, "valid"), (64, "valid"),
          (64, "same"), (64, "valid"))


class SeparableConv2D(nn.Module):
    """Keras ``SeparableConv2D(filters, kernel_size, padding)``, stride 1, depth multiplier 1.

    A depthwise ``k x k`` conv without bias, then a 1x1 pointwise conv with bias. Variables:
    ``depthwise/kernel`` ``[k, k, 1, C_in]``, ``pointwise/kernel`` ``[1, 1, C_in, filters]``,
    ``pointwise/bias`` ``[filters]``.

    Attributes:
        filters: output channels.
        kernel_size: side of the depthwise kernel.
        padding: ``"valid"`` or ``"same"`` (odd kernels: ``k // 2`` on each side).
        dtype, param_dtype, precision: as in the other backbones.
    """

    filters: int
    kernel_size: int = 3
    padding: str = "valid"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        if self.padding not in ("valid", "same"):
            raise ValueError(f'padding must be "valid" or "same", got {self.padding!r}')
        if self.padding == "same" and self.kernel_size % 2 == 0:
            raise ValueError(f'"same" padding needs an odd kernel_size, got {self.kernel_size}')
        pad = self.kernel_size // 2 if self.padding == "same" else 0
        x = layers.depthwise_conv2d(
            self.kernel_size, padding=pad, use_bias=False, name="depthwise", dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=_glorot)(x)
        return layers.conv2d(
            self.filters, 1, use_bias=True, name="pointwise", dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, kernel_init=_glorot)(x)


class ElAzhariCNN(nn.Module):
    """El Azhari's Table 1 CNN on NHWC input in [0, 1] (see the module docstring).

    Attributes:
        num_classes: outputs of the last Dense (the paper: 2 with softmax; featsim's binary
            training uses 1, a sigmoid). ``None`` or 0 for no head (``logits`` is ``None``).
        dropout: rate of the Dropout after the fourth block (not given by the paper);
            ``train=True`` with a non-zero rate needs ``rngs={"dropout": key}``.
        hidden: width of the Dense layer before the head (the paper: 1000).
        bn_epsilon, bn_momentum: Keras' BatchNormalization defaults (1e-3, 0.99; Flax
            convention, the weight of the old statistics).
        bn_axis_name: axis for synchronised BatchNorm under ``pmap``; None otherwise.
        dtype, param_dtype, precision: as in the other backbones.

    ``__call__(x, *, train=False)`` takes ``x`` of shape ``[N, H, W, 3]`` with ``H, W >=``
    :data:`MIN_INPUT_SIZE` (200 in the paper) and returns ``(logits, features)``;
    ``features`` holds ``"stem"``, ``"stage1"``..``"stage5"`` (NHWC, the rows marked in the
    module docstring's table), ``"pooled"`` (the Flatten, ``[N, 64]`` at 200 px) and
    ``"pre_logits"`` (``[N, hidden]``, after Dense + ReLU: what the head sees).

    Example:
        >>> model = ElAzhariCNN(num_classes=2)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 200, 200, 3)))
        >>> logits, feats = model.apply(variables, jnp.zeros((2, 200, 200, 3)))
        >>> logits.shape, feats["stage5"].shape, feats["pre_logits"].shape
        ((2, 2), (2, 1, 1, 64), (2, 1000))
    """

    num_classes: int | None = 2
    dropout: float = 0.2
    hidden: int = 1000
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.99
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_backbone_input("ElAzhariCNN", x, self.num_classes)
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"ElAzhariCNN needs inputs of at least {MIN_INPUT_SIZE} x {MIN_INPUT_SIZE} "
                f"(the paper's is 200 x 200), got shape {x.shape}")
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

        def sep(i, h):
            filters, padding = _CONVS[i - 1]
            return nn.relu(SeparableConv2D(filters, 3, padding, name=f"sepconv{i}",
                                           **common)(h))

        def pool(h):
            return layers.max_pool(h, 2, stride=2)

        def bn(i, h):
            return layers.batch_norm(
                train=train, epsilon=self.bn_epsilon, momentum=self.bn_momentum,
                name=f"bn{i}", dtype=self.dtype, param_dtype=self.param_dtype,
                axis_name=self.bn_axis_name)(h)

        features = {}
        x = pool(sep(1, x))
        features["stem"] = x
        x = bn(1, pool(sep(2, x)))
        features["stage1"] = x
        x = bn(2, pool(sep(3, x)))
        features["stage2"] = x
        x = bn(3, pool(sep(4, x)))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        features["stage3"] = x
        x = pool(sep(6, sep(5, x)))
        features["stage4"] = x
        x = bn(4, pool(sep(7, x)))
        features["stage5"] = x
        x = x.reshape(x.shape[0], -1)  # Keras' channels-last Flatten: (H, W, C) order
        features["pooled"] = x
        dense = dict(kernel_init=_glorot, bias_init=nn.initializers.zeros, **common)
        x = nn.relu(nn.Dense(self.hidden, name="fc", **dense)(x))
        features["pre_logits"] = x
        if not self.num_classes:
            return None, features
        return nn.Dense(self.num_classes, name="logits", **dense)(x), features


register_backbone("elazhari_cnn", preprocessing=ELAZHARI_PREPROCESSING)(ElAzhariCNN)
