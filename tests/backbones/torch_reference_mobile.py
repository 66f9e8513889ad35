"""Plain ``torch.nn`` references for MobileNetV2, ShuffleNetV2 and MobileNetV1.

MobileNetV2 and ShuffleNetV2 are written from torchvision's ``models/mobilenetv2.py`` and
``models/shufflenetv2.py`` (torchvision cannot be imported here) with the same module tree, so
the same state-dict keys (``features.0.0``, ``features.2.conv.1.0``, ``classifier.1``;
``conv1.0``, ``stage2.0.branch1.2``, ``conv5.1``, ``fc``). MobileNetV1 has no torchvision model:
it is written from TF-slim's ``nets/mobilenet_v1.py`` with slim's scope names as attributes
(``Conv2d_3_depthwise.conv``, ``.bn``, ``Logits``) and TensorFlow's ``SAME`` padding emulated by
``F.pad`` before an unpadded conv. ``tapped`` returns the logits and the activations featsim
exposes as features, at hard-coded layers. Import only after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------ MobileNetV2 (torchvision)


def _make_divisible(v, divisor, min_value=None):
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation(norm=BatchNorm2d, activation=ReLU6)."""

    def __init__(self, inp, oup, kernel_size=3, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(inp, oup, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )


class InvertedResidualV2(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    SETTING = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )
    # featsim feature name -> index into `features` whose output it is.
    TAPS: ClassVar = {"stem": 0, "stage1": 1, "stage2": 3, "stage3": 6, "stage4": 13, "stage5": 18}

    def __init__(self, num_classes=1000, width_mult=1.0, dropout=0.2, setting=None):
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, 8)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), 8)
        features = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in setting or self.SETTING:
            output_channel = _make_divisible(c * width_mult, 8)
            for i in range(n):
                features.append(
                    InvertedResidualV2(input_channel, output_channel, s if i == 0 else 1, t)
                )
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes)
        )

    def tapped(self, x):
        taps, by_index = {}, {v: k for k, v in self.TAPS.items()}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in by_index:
                taps[by_index[i]] = x
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        taps["pre_logits"] = x
        return self.classifier(x), taps

    def forward(self, x):
        return self.tapped(x)[0]


# ---------------------------------------------------------------- ShuffleNetV2 (torchvision)


def channel_shuffle(x, groups):
    batchsize, num_channels, height, width = x.size()
    x = x.view(batchsize, groups, num_channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


def _depthwise(i, stride):
    return nn.Conv2d(i, i, 3, stride, 1, bias=False, groups=i)


class InvertedResidualShuffle(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(inp, stride),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, 1, 0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            _depthwise(branch_features, stride),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, stages_repeats, stages_out_channels, num_classes=1000):
        super().__init__()
        input_channels = 3
        output_channels = stages_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 3, 2, 1, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        input_channels = output_channels
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for name, repeats, output_channels in zip(
            ["stage2", "stage3", "stage4"], stages_repeats, stages_out_channels[1:], strict=False
        ):
            seq = [InvertedResidualShuffle(input_channels, output_channels, 2)]
            seq += [
                InvertedResidualShuffle(output_channels, output_channels, 1)
                for _ in range(repeats - 1)
            ]
            setattr(self, name, nn.Sequential(*seq))
            input_channels = output_channels
        output_channels = stages_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(output_channels, num_classes)

    def tapped(self, x):
        taps = {}
        x = self.maxpool(self.conv1(x))
        taps["stem"] = x
        for name in ("stage2", "stage3", "stage4"):
            x = getattr(self, name)(x)
            taps[name] = x
        x = self.conv5(x)
        taps["conv5"] = x
        x = x.mean([2, 3])
        taps["pre_logits"] = x
        return self.fc(x), taps

    def forward(self, x):
        return self.tapped(x)[0]


# --------------------------------------------------------------------- MobileNetV1 (TF-slim)


def tf_same_pad(x, kernel_size, stride):
    """F.pad arguments that make an unpadded conv compute TensorFlow's ``padding="SAME"``."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad lists the last axis (width) first
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class SlimConv(nn.Module):
    """slim.conv2d / separable_conv2d(depthwise only) + batch_norm (eps 1e-3) + ReLU6."""

    def __init__(self, inp, oup, kernel_size, stride=1, groups=1, tf_padding=True):
        super().__init__()
        self.kernel_size, self.stride, self.tf_padding = kernel_size, stride, tf_padding
        padding = 0 if tf_padding else kernel_size // 2
        self.conv = nn.Conv2d(inp, oup, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(oup, eps=1e-3)

    def forward(self, x):
        if self.tf_padding:
            x = tf_same_pad(x, self.kernel_size, self.stride)
        return F.relu6(self.bn(self.conv(x)))


class MobileNetV1(nn.Module):
    # (stride, depth) of Conv2d_0 and the 13 depthwise-separable blocks, from slim's _CONV_DEFS.
    STEM = (2, 32)
    BLOCKS = ((1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512))
    BLOCKS += ((1, 512),) * 5 + ((2, 1024), (1, 1024))
    TAPS: ClassVar = {
        "Conv2d_0": "stem",
        "Conv2d_1_pointwise": "stage1",
        "Conv2d_3_pointwise": "stage2",
        "Conv2d_5_pointwise": "stage3",
        "Conv2d_11_pointwise": "stage4",
        "Conv2d_13_pointwise": "stage5",
    }

    def __init__(self, num_classes=1001, depth_multiplier=1.0, min_depth=8, tf_padding=True):
        super().__init__()

        def depth(d):
            return max(int(d * depth_multiplier), min_depth)

        self.names = ["Conv2d_0"]
        channels = depth(self.STEM[1])
        self.Conv2d_0 = SlimConv(3, channels, 3, self.STEM[0], tf_padding=tf_padding)
        for i, (stride, d) in enumerate(self.BLOCKS, start=1):
            dw = SlimConv(channels, channels, 3, stride, groups=channels, tf_padding=tf_padding)
            setattr(self, f"Conv2d_{i}_depthwise", dw)
            setattr(self, f"Conv2d_{i}_pointwise", SlimConv(channels, depth(d), 1))
            self.names += [f"Conv2d_{i}_depthwise", f"Conv2d_{i}_pointwise"]
            channels = depth(d)
        self.Logits = nn.Linear(channels, num_classes)

    def tapped(self, x):
        taps = {}
        for name in self.names:
            x = getattr(self, name)(x)
            if name in self.TAPS:
                taps[self.TAPS[name]] = x
        x = x.mean([2, 3])
        taps["pre_logits"] = x
        return self.Logits(x), taps

    def forward(self, x):
        return self.tapped(x)[0]


ARCHS = {
    "mobilenet_v2": lambda **kw: MobileNetV2(**kw),
    "shufflenet_v2_x1_0": lambda **kw: ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], **kw),
    "mobilenet_v1": lambda **kw: MobileNetV1(depth_multiplier=1.0, **kw),
    "mobilenet_v1_025": lambda **kw: MobileNetV1(depth_multiplier=0.25, **kw),
}


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial BN: random affine params and running statistics (as after training)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                m.num_batches_tracked.fill_(1000)
    return model


def calibrate_batchnorm(model: nn.Module, x, generator: torch.Generator) -> nn.Module:
    """Random BN affine params; running statistics measured on ``x``, variances x1.25.

    Random BatchNorm networks are chaotic (Yang et al., "A Mean Field Theory of Batch
    Normalization", ICLR 2019): with random running statistics ReLU6 stacks saturate or die,
    and with exactly measured ones float32 rounding grows ~1.3x per layer, to 1e-4 of the
    largest activation after 27 to 52 layers (torch float32 against float64 alike). Variances
    1.25x the measured ones make each layer slightly contractive: rounding stays ~1e-6 while
    the last stage still changes by ~0.8 of its std between two inputs, and ~0.2% of ReLU6
    inputs exceed 6, so the clip is exercised.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
            m.momentum = 1.0  # running statistics := this batch's
    model.train()
    with torch.no_grad():
        model(x)
        for m in bns:
            m.momentum = 0.1
            m.running_var.mul_(1.25)
            m.num_batches_tracked.fill_(1000)
    return model.eval()


def state_dict_numpy(model: nn.Module) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def to_nhwc(t):
    t = t.detach().cpu().numpy()
    return t.transpose(0, 2, 3, 1) if t.ndim == 4 else t
