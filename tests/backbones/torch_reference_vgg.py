"""Plain ``torch.nn`` VGG for the equivalence tests (torchvision cannot be imported).

Written from torchvision's ``torchvision/models/vgg.py``: the same ``make_layers`` Sequential
(so the same state-dict keys ``features.0`` .. ``features.28``, ``classifier.0/3/6``), the
same ``AdaptiveAvgPool2d((7, 7))``, classifier and init. ``tapped`` returns the activations
featsim exposes as features. Import only after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

import torch
from torch import nn

from .torch_reference import state_dict_numpy, to_nhwc

__all__ = ["ARCHS", "CFGS", "VGG", "make_layers", "state_dict_numpy", "to_nhwc"]

CFGS = {
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_layers(cfg) -> nn.Sequential:
    layers = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, features, num_classes=1000, dropout=0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def tapped(self, x):
        """Logits and the activations featsim calls stem, stage1..5, pooled, pre_logits."""
        taps = {}
        stage = 0
        for module in self.features:
            x = module(x)
            if isinstance(module, nn.MaxPool2d):
                stage += 1
                taps[f"stage{stage}"] = x
        taps["stem"] = taps["stage1"]
        x = torch.flatten(self.avgpool(x), 1)
        taps["pooled"] = x
        x = self.classifier[:6](x)
        taps["pre_logits"] = x
        return self.classifier[6](x), taps

    def forward(self, x):
        return self.tapped(x)[0]


def randomize_biases(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-zero biases (torchvision initialises them to 0), so a bias mix-up shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
    return model


ARCHS = {"vgg16": lambda **kw: VGG(make_layers(CFGS["D"]), **kw)}
