"""Predictions of a trained binary classifier saved by the trainer (``RunDir.model_file``)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from featsim.backbones.registry import get_backbone
from featsim.data.transforms import Transform
from featsim.rundir import RunDir
from featsim.train import heads
from featsim.train.datasets import load_dataset

__all__ = ["predict_binary"]


def predict_binary(config, workdir: str | os.PathLike, source, *, dtype: str | None = None):
    """``(labels, P(positive), mean |pre_logits|)`` of the saved final model on ``source``.

    Inference mode, images decoded and scaled as the training run's were.

    Args:
      config: the run's :class:`~featsim.train.TrainConfig` (backbone, head, normalization,
        batch size, image dtype).
      workdir: the run directory holding ``model.msgpack`` (a one-output sigmoid head).
      source: a :class:`~featsim.data.Source` or spec.
      dtype: how the decoded pixels are held (default ``config.image_dtype``); the
        cached-feature training path trained on float pixels.

    Returns:
      ``labels`` (int ``[n]``), ``p`` (float64 ``[n]``: sigmoid of the single logit), and
      the mean absolute ``pre_logits`` feature, which shows a body whose output vanished.

    Raises:
      FileNotFoundError: no ``model.msgpack`` in ``workdir``.
    """
    variables = RunDir(workdir).load_variables()
    module = heads.model_for(config, 1).module
    probe = get_backbone(config.backbone, num_classes=None)
    transform = Transform.for_backbone(probe.preprocessing, config.normalization)
    data = load_dataset(source, transform, dtype=dtype or config.image_dtype)
    scale, offset = transform.affine()

    @jax.jit
    def probs(x):
        logits, feats = module.apply(variables, x.astype(jnp.float32) * scale + offset,
                                     train=False)
        return jax.nn.sigmoid(logits[:, 0]), jnp.abs(feats["pre_logits"]).mean(axis=1)

    size = config.batch_size
    out = [probs(data.images[i:i + size]) for i in range(0, len(data), size)]
    p = np.concatenate([np.asarray(o[0]) for o in out]).astype(np.float64)
    magnitude = float(np.concatenate([np.asarray(o[1]) for o in out]).mean())
    return data.labels, p, magnitude
