"""Loading a fine-tuned backbone from the trainer's output (``DIR/model.msgpack``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from featsim.backbones.convert import check_variables
from featsim.backbones.registry import Backbone, get_backbone, list_backbones
from featsim.backbones.weights import load_variables

__all__ = ["MODEL_FILENAME", "checkpoint_metadata", "load_finetuned"]

MODEL_FILENAME = "model.msgpack"


def load_finetuned(path: str | os.PathLike, *, backbone: str | None = None) -> Backbone:
    """A fine-tuned backbone from the trainer's output.

    The trainer writes ``DIR/model.msgpack`` with
    ``save_variables(path, variables, metadata={"backbone": NAME, "num_classes": str(K), ...})``
    where ``variables`` are the full Flax variables of ``get_backbone(NAME, num_classes=K)``.

    Args:
        path: the run directory (its ``model.msgpack`` is read) or the ``.msgpack`` file.
        backbone: the registry name the caller expects (``featsim compare --backbone``); a
            checkpoint of another backbone is an error.

    Returns:
        A :class:`~featsim.backbones.Backbone` built with the checkpoint's ``num_classes``,
        with ``variables`` (numpy arrays) and ``weights_file`` set; ``weights.description``
        names the checkpoint and its training strategy (it enters feature manifests).

    Raises:
        FileNotFoundError: no such file, or a directory without ``model.msgpack``.
        ValueError: not a featsim variables file, metadata without ``backbone`` or
            ``num_classes``, an unregistered or unexpected backbone name, or variables that
            do not match the module (every message names the file).
    """
    path = Path(path)
    if path.is_dir():
        file = path / MODEL_FILENAME
        if not file.is_file():
            others = sorted(p.name for p in path.glob("*.msgpack"))
            raise FileNotFoundError(
                f"no {MODEL_FILENAME} in {path} (the trainer writes the final fine-tuned "
                f"variables there); .msgpack files found: {others or 'none'}. Pass the run "
                "directory or a .msgpack file"
            )
        path = file
    elif not path.is_file():
        raise FileNotFoundError(f"no fine-tuned run directory or checkpoint at {path}")
    variables, metadata = load_variables(path, with_metadata=True)
    missing = [k for k in ("backbone", "num_classes") if not metadata.get(k)]
    if missing:
        raise ValueError(
            f"{path}: metadata lacks {missing} (found keys {sorted(metadata)}); a fine-tuned "
            "checkpoint needs metadata={'backbone': NAME, 'num_classes': str(K), ...} "
            "(featsim.backbones.save_variables)"
        )
    name = metadata["backbone"]
    if backbone is not None and name != backbone:
        raise ValueError(
            f"{path} holds a fine-tuned {name!r}, but --backbone/backbone= is {backbone!r}"
        )
    if name not in list_backbones():
        raise ValueError(
            f"{path}: metadata names backbone {name!r}, which is not registered; registered "
            f"backbones: {', '.join(list_backbones())}"
        )
    num_classes = _parse_num_classes(metadata["num_classes"], path)
    built = get_backbone(name, num_classes=num_classes)
    try:
        check_variables(variables, built.abstract_variables())
    except ValueError as err:
        raise ValueError(
            f"{path}: {err}\n(checked against get_backbone({name!r}, "
            f"num_classes={num_classes}) from the file's metadata)"
        ) from None
    weights = built.weights
    if weights is not None:
        strategy = metadata.get("strategy", "unknown strategy")
        weights = dataclasses.replace(
            weights, description=f"fine-tuned {name} ({strategy}) from {path}")
    return dataclasses.replace(built, variables=variables, weights_file=path, weights=weights)


def _parse_num_classes(value: str, path: Path) -> int | None:
    if value.strip().lower() in ("none", "0"):
        return None
    try:
        k = int(value)
    except ValueError:
        raise ValueError(
            f"{path}: metadata num_classes must be an integer string, got {value!r}"
        ) from None
    if k < 0:
        raise ValueError(f"{path}: metadata num_classes must be >= 0, got {k}")
    return k


def checkpoint_metadata(backbone: Backbone) -> dict:
    """The metadata of a backbone's featsim ``.msgpack`` weights file ({} for any other)."""
    file = backbone.weights_file
    if file is None or Path(file).suffix.lower() != ".msgpack":
        return {}
    try:
        return load_variables(file, with_metadata=True)[1]
    except (OSError, ValueError):
        return {}

