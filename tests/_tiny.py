"""A registered backbone small enough to compile in about a second, for tests of training
mechanics (resume, pmap, run folders, the CLI) that do not depend on the architecture.

``TINY`` is registered on import (once per process) with a 32 px preprocessing and ResNet's
key mapping, so its classifier is ``fc`` and ``skip_head`` replaces it. It taps two spatial
maps (``stem`` at 1/2, ``stage1`` at 1/4 of the input side) and ``pre_logits``.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn

from featsim.backbones import get_backbone, list_backbones, register_backbone
from featsim.backbones.preprocessing import Preprocessing

TINY = "_test_tiny_cnn"


class TinyCNN(nn.Module):
    num_classes: int | None = None
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        feats = {}
        feats["stem"] = x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="stem_conv")(x))
        x = nn.Conv(8, (3, 3), strides=2, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name,
                         name="bn1")(x)
        feats["stage1"] = x = nn.relu(x)
        feats["pre_logits"] = x = x.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="fc")(x) if self.num_classes else None
        return logits, feats


if TINY not in list_backbones():
    # ResNet's key mapping names the head "fc", which skip_head replaces with a new one.
    _weights = dataclasses.replace(get_backbone("resnet18").weights, filename="tiny.msgpack",
                                   url="file:///nonexistent/tiny.msgpack", sha256=None,
                                   description="random weights (test)")
    register_backbone(TINY, preprocessing=Preprocessing(input_size=32, resize_size=32),
                      weights=_weights)(functools.partial(TinyCNN))
