"""Plain ``torch.nn`` DenseNet for the equivalence tests (torchvision cannot be imported).

Written from torchvision's ``torchvision/models/densenet.py``: same module names, so the same
state-dict keys (``features.conv0``, ``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``features.norm5``, ``classifier``), the same channel order
of the concatenations and the same conv init (``kaiming_normal_`` with its defaults).
``memory_efficient`` (checkpointing) is left out: it does not change the result.
``tapped`` returns the activations featsim exposes as features. Import only after
``pytest.importorskip("torch")``.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .torch_reference import randomize_batchnorm, state_dict_numpy, to_nhwc

__all__ = [
    "ARCHS",
    "DenseNet",
    "randomize_batchnorm",
    "state_dict_numpy",
    "to_legacy_keys",
    "to_nhwc",
]


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(
            num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False
        )
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.drop_rate = float(drop_rate)

    def forward(self, inputs):
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features):
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(
            num_input_features, num_output_features, kernel_size=1, stride=1, bias=False
        )
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(
        self,
        growth_rate=32,
        block_config=(6, 12, 24, 16),
        num_init_features=64,
        bn_size=4,
        drop_rate=0,
        num_classes=1000,
    ):
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def tapped(self, x):
        """Logits and the activations featsim calls stem, stage1..4, pre_logits (NCHW)."""
        taps = {}
        stage = 0
        for name, module in self.features.named_children():
            x = module(x)
            if name == "pool0":
                taps["stem"] = x
            elif name.startswith("denseblock"):
                stage += 1
                taps[f"stage{stage}"] = x
        out = torch.flatten(F.adaptive_avg_pool2d(F.relu(x), (1, 1)), 1)
        taps["pre_logits"] = out
        return self.classifier(out), taps

    def forward(self, x):
        return self.tapped(x)[0]


ARCHS = {
    "densenet121": lambda **kw: DenseNet(32, (6, 12, 24, 16), 64, **kw),
    "densenet161": lambda **kw: DenseNet(48, (6, 12, 36, 24), 96, **kw),
}

# New layer names -> the names in torchvision's published checkpoints (`norm1` -> `norm.1`),
# the inverse of torchvision's `_load_state_dict` regex.
_NEW_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$"
)


def to_legacy_keys(state_dict: dict) -> dict:
    """The state dict with dense-layer keys spelt as in torchvision's ``.pth`` files.

    The published files predate ``num_batches_tracked``, so dense layers' counters are
    dropped as well.
    """
    out = {}
    for key, value in state_dict.items():
        if re.search(r"denselayer\d+\.norm[12]\.num_batches_tracked$", key):
            continue
        out[_NEW_LAYER_KEY.sub(r"\1.\2.\3", key)] = value
    return out
