"""Loading a fine-tuned backbone from the trainer's output (a :class:`~featsim.rundir.RunDir`)."""

from __future__ import annotations

from pathlib import Path

from featsim.backbones.registry import Backbone
from featsim.backbones.weights import load_variables
from featsim.rundir import MODEL_FILENAME, load_model

__all__ = ["MODEL_FILENAME", "checkpoint_metadata", "load_finetuned"]

# The fine-tuned backbone of a run folder or ``.msgpack`` file (:func:`featsim.rundir.load_model`).
load_finetuned = load_model


def checkpoint_metadata(backbone: Backbone) -> dict:
    """The metadata of a backbone's featsim ``.msgpack`` weights file ({} for any other)."""
    file = backbone.weights_file
    if file is None or Path(file).suffix.lower() != ".msgpack":
        return {}
    try:
        return load_variables(file, with_metadata=True)[1]
    except (OSError, ValueError):
        return {}
