"""The BN-adapted control: pretrained weights, BatchNorm statistics recomputed on another domain.

Fine-tuning changes two things at once: the weights, and the BatchNorm population statistics
that every normalisation layer uses at inference. Recomputing only the statistics on the target
domain, with the weights left as they were, is AdaBN (Li, Wang, Shi, Liu & Hou 2016, "Revisiting
Batch Normalization For Practical Domain Adaptation", arXiv:1603.04779). The pretrained network
with AdaBN statistics is the control that separates the two parts of a change::

    total         = fine-tuned  - pretrained
    normalisation = BN-adapted  - pretrained
    weights       = fine-tuned  - BN-adapted

:func:`adapt_batch_stats` builds that control: the source's images (a capped, seeded random
subset) go through the backbone's own inference preprocessing, then
:func:`featsim.train.batchnorm.recompute_batch_stats` replaces every running mean and variance
by its population value over those batches (training-mode forward, no gradient step).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from featsim.backbones.registry import Backbone
from featsim.data.decode import load_rgb
from featsim.data.items import Source
from featsim.data.sources import open_source
from featsim.data.transforms import Transform

__all__ = ["BNControl", "adapt_batch_stats", "has_batchnorm"]

NO_BATCHNORM = "no BatchNorm: control = pretrained"


def has_batchnorm(backbone: Backbone) -> bool:
    """Whether ``backbone.variables`` hold BatchNorm running statistics."""
    stats = (backbone.variables or {}).get("batch_stats")
    return bool(stats)


@dataclasses.dataclass(frozen=True, eq=False)
class BNControl:
    """:func:`adapt_batch_stats`' result: the control backbone and how it was made.

    Attributes:
        backbone: the pretrained backbone with recomputed ``batch_stats`` (the pretrained one
            itself when it has no BatchNorm).
        source: spec of the images the statistics came from.
        n_images: images that entered the statistics.
        n_available: images the source lists.
        max_images: the cap asked for (None: all).
        seed: seed of the random subset and its order.
        batch_size: rows per training-mode batch (the statistics average within-batch moments).
        normalization: pixel scaling, as ``extract_features``.
        batchnorm: False when the backbone has no BatchNorm (nothing was recomputed).
        skipped: ``"file: reason"`` of images that could not be read (``skip_bad=True``).
    """

    backbone: Backbone
    source: str
    n_images: int
    n_available: int
    max_images: int | None
    seed: int
    batch_size: int
    normalization: str
    batchnorm: bool = True
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for tables and verdicts."""
        if not self.batchnorm:
            return f"{NO_BATCHNORM} (nothing to recompute on {self.source})"
        cap = "" if self.max_images is None else f", cap {self.max_images}"
        skipped = f", {len(self.skipped)} unreadable skipped" if self.skipped else ""
        return (f"pretrained weights, BatchNorm statistics recomputed on {self.source} "
                f"({self.n_images} of {self.n_available} images{cap}, seed {self.seed}, "
                f"batches of {self.batch_size}{skipped})")

    def to_dict(self) -> dict:
        return {"kind": "AdaBN: pretrained weights, BatchNorm population statistics "
                        "recomputed" if self.batchnorm else NO_BATCHNORM,
                "source": self.source, "n_images": self.n_images,
                "n_available": self.n_available, "max_images": self.max_images,
                "seed": self.seed, "batch_size": self.batch_size,
                "normalization": self.normalization, "batchnorm": self.batchnorm,
                "skipped": list(self.skipped), "description": self.describe()}


def adapt_batch_stats(
    backbone: Backbone,
    source: Source | str | os.PathLike,
    *,
    max_images: int | None = 512,
    batch_size: int = 32,
    normalization: str = "backbone",
    seed: int = 0,
    skip_bad: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> BNControl:
    """``backbone`` with its BatchNorm population statistics recomputed on ``source`` (AdaBN).

    Args:
        backbone: a backbone with ``variables`` (usually the pretrained one).
        source: a :class:`~featsim.data.Source` or spec (e.g. ``"chest_xray:train"``).
        max_images: use a random subset of at most this many images (None: all).
        batch_size: images per training-mode batch; the last batch may be smaller (a last
            batch of one image joins the one before it).
        normalization: ``"backbone"`` or ``"paper"``, as ``extract_features``: the control
            must see pixels scaled as its features will be extracted.
        seed: seed of the subset and its order (the source lists images sorted by class, so
            taking the first ``max_images`` would adapt to one class).
        skip_bad: leave unreadable images out (listed in ``BNControl.skipped``); default
            False raises naming the file.
        data_dir: tensorflow-datasets folder for ``tfds:`` specs.

    Returns:
        A :class:`BNControl`. Only ``batch_stats`` change; ``params`` are the same objects.
        Without BatchNorm, the backbone itself with ``batchnorm=False``.

    Raises:
        ValueError: no variables, ``max_images``/``batch_size`` below 1, an empty source, an
            unreadable image (without ``skip_bad``; the message names the file), or fewer than
            2 readable images.

    Example:
        >>> control = adapt_batch_stats(bb, "chest_xray:train", max_images=256)  # doctest: +SKIP
        >>> features = extract_features(control.backbone, "chest_xray:test")    # doctest: +SKIP
    """
    from featsim.train.batchnorm import recompute_batch_stats

    if backbone.variables is None:
        raise ValueError(f"backbone {backbone.name!r} has no variables to adapt")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(source, Source):
        source = open_source(source, data_dir=data_dir)
    if not source.items:
        raise ValueError(f"source {source.spec!r} has no images to adapt BatchNorm on")
    n_available = len(source.items)
    common = dict(source=str(source.spec), n_available=n_available, max_images=max_images,
                  seed=int(seed), batch_size=int(batch_size), normalization=normalization)
    if not has_batchnorm(backbone):
        return BNControl(backbone=backbone, n_images=0, batchnorm=False, **common)
    order = np.random.default_rng(seed).permutation(n_available)
    if max_images is not None:
        order = order[:max_images]
    transform = Transform.for_backbone(backbone.preprocessing, normalization=normalization)
    skipped: list[str] = []
    used = [0]

    def batches() -> Iterator[np.ndarray]:
        # A final batch of one row would have no within-batch variance (BatchNorm in training
        # mode rejects it): it joins the batch before it.
        held, rows = None, []
        for i in order:
            item = source.items[int(i)]
            try:
                rows.append(transform(load_rgb(item)))
            except (ValueError, OSError) as err:
                reason = str(err) if item.name in str(err) else f"{item.name}: {err}"
                if not skip_bad:
                    raise ValueError(f"{reason} (adapting BatchNorm on {source.spec}; pass "
                                     "skip_bad=True to leave it out)") from None
                skipped.append(reason)
                continue
            if len(rows) == batch_size:
                if held is not None:
                    used[0] += len(held)
                    yield np.stack(held)
                held, rows = rows, []
        if len(rows) == 1 and held is not None:
            held, rows = held + rows, []
        for last in (held, rows):
            if last and len(last) < 2:
                raise ValueError(f"adapting BatchNorm needs at least 2 readable images of "
                                 f"{source.spec!r}, got {len(last)}")
            if last:
                used[0] += len(last)
                yield np.stack(last)

    try:
        variables = recompute_batch_stats(backbone.module.apply, backbone.variables, batches())
    except ValueError:
        if used[0] == 0 and skipped and len(skipped) == len(order):
            raise ValueError(f"no readable image in {source.spec!r} to adapt BatchNorm on "
                             f"({len(skipped)} skipped; first: "
                             f"{skipped[0] if skipped else 'none'})") from None
        raise
    weights = backbone.weights
    if weights is not None:
        weights = dataclasses.replace(
            weights, description=f"{weights.description} + BatchNorm statistics recomputed "
                                 f"on {source.spec} ({used[0]} images, seed {seed})")
    adapted = dataclasses.replace(backbone, variables=variables, weights=weights)
    return BNControl(backbone=adapted, n_images=used[0], skipped=tuple(skipped), **common)
