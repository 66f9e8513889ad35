"""One process of the multi-process training test (tests/test_distributed.py).

``python _distributed_train_worker.py COUNT INDEX PORT OUT [--resume]``: COUNT 1 runs alone
(the test gives it two CPU devices); COUNT > 1 joins a jax.distributed run (one device per
process). It trains a small registered CNN from scratch with augmentation and a validation split on
brightness-separable images for 2 epochs, then pretrains it as an autoencoder for 2 epochs,
and writes OUT/done{INDEX}.json with the results.
FEATSIM_TEST_DIE="I:E" makes process I exit abruptly after epoch E's checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

count, index, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
resume = "--resume" in sys.argv

from featsim import parallel  # noqa: E402 - before any JAX call

if count > 1:
    parallel.initialize(f"127.0.0.1:{port}", count, index, heartbeat_timeout_s=10)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from featsim.backbones import Preprocessing, register_backbone  # noqa: E402
from featsim.backbones import layers as backbone_layers  # noqa: E402
from featsim.rundir import RunDir  # noqa: E402
from featsim.train import (  # noqa: E402
    PretrainConfig,
    TrainConfig,
    pretrain,
    train_and_evaluate,
)
from featsim.train.datasets import Dataset  # noqa: E402


class TinyNet(nn.Module):
    """A backbone in the registry's shape, small enough to compile in seconds."""

    num_classes: int | None = 2
    bn_axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=2, dtype=self.dtype, name="conv")(x)
        x = backbone_layers.batch_norm(train=train, epsilon=1e-5, momentum=0.9, name="bn",
                              dtype=self.dtype, param_dtype=jnp.float32,
                              axis_name=self.bn_axis_name)(x)
        stem = nn.relu(x)
        features = {"stem": stem, "pre_logits": stem.mean(axis=(1, 2))}
        if not self.num_classes:
            return None, features
        return nn.Dense(self.num_classes, name="logits")(features["pre_logits"]), features


register_backbone("tiny_test", preprocessing=Preprocessing(
    input_size=32, resize_size=32, crop="none", scaling="[0,1]"))(TinyNet)


def dataset(n, seed):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int32)
    images = rng.integers(0, 120, (n, 32, 32, 3)).astype(np.uint8)
    images[labels == 1] += 100
    return Dataset(images=images, labels=labels, groups=None,
                   ids=tuple(str(i) for i in range(n)), class_names=("a", "b"), source="tiny")


die = os.environ.get("FEATSIM_TEST_DIE")
if die:
    who, after = (int(v) for v in die.split(":"))
    real_save = RunDir.save_checkpoint

    def save_then_die(self, state, epoch, *args, **kwargs):
        real_save(self, state, epoch, *args, **kwargs)
        if index == who and epoch == after:
            os._exit(17)

    RunDir.save_checkpoint = save_then_die

config = TrainConfig("tiny_test", strategy="scratch", epochs=2, batch_size=6,
                     learning_rate=1e-3, val_fraction=0.25, seed=0)
result = train_and_evaluate(config, out, train=dataset(16, 0), test=dataset(10, 1),
                            progress=False, resume=resume)
# Autoencoder pretraining on the same images, 2 epochs (Park et al.'s first stage).
ae = pretrain(PretrainConfig("tiny_test", image_size=32, epochs=2, batch_size=4, seed=0),
              out / "ae", dataset(16, 0), progress=False)
result["ae_train_loss"] = ae["train_loss"]
(out / f"done{index}.json").write_text(json.dumps(result, default=float))
print(f"process {index} of {count}: trained")
