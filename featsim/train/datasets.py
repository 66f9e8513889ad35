"""Training data: decoded images in memory, a validation split carved from train, batches.

Images are decoded once (thread pool) with the same mode rule, resize and crop as feature
extraction, and held as ``[n, S, S, 3]`` on [0, 255]; augmentation and normalisation happen
on the device. Batches are shuffled per epoch with a key derived from the seed and the epoch,
so a resumed run sees exactly the batches an uninterrupted run would. The last batch of an
epoch is never dropped: it is padded to a multiple of the device count by repeating its own
examples with mask 0 (masked out of the loss and metrics).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import jax
import numpy as np

from featsim.data.decode import load_rgb
from featsim.data.items import Source
from featsim.data.sources import open_source
from featsim.data.transforms import Transform

__all__ = ["Dataset", "batches", "load_dataset", "split_validation"]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Decoded, labelled images.

    Attributes:
        images: ``[n, S, S, 3]`` uint8 or float32 on [0, 255] (resized and cropped).
        labels: int32 ``[n]``.
        groups: ``[n]`` group keys (e.g. patient ids) or None.
        ids: item ids.
        class_names: label index -> name.
        source: the spec it came from.
        targets: float32 ``[n, T]`` regression targets (an auxiliary head's, e.g. age), or
            None.
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None
    ids: tuple[str, ...]
    class_names: tuple[str, ...]
    source: str
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> Dataset:
        index = np.asarray(index)
        return dataclasses.replace(
            self, images=self.images[index], labels=self.labels[index],
            groups=None if self.groups is None else self.groups[index],
            ids=tuple(self.ids[i] for i in index),
            targets=None if self.targets is None else self.targets[index])

    @property
    def num_classes(self) -> int:
        return max(len(self.class_names), int(self.labels.max()) + 1)


def load_dataset(source: Source | str | os.PathLike, transform: Transform, *,
                 dtype: str = "uint8", num_workers: int | None = None,
                 data_dir=None, target_columns=None) -> Dataset:
    """Decodes every image of a labelled source at the network's input size.

    Args:
        target_columns: ``labels.csv`` column name(s) whose numbers become
            :attr:`Dataset.targets` (see :func:`~featsim.data.sources.open_source`); None
            or empty: the items' own targets, if any.

    Raises:
        ValueError: an unlabelled item (named), an item without targets when others have
            them, or an image that cannot be decoded (named).
    """
    if not isinstance(source, Source):
        source = open_source(source, data_dir=data_dir, target_column=target_columns or None)
    elif target_columns:
        raise ValueError(f"target_columns={target_columns!r} needs a spec (labels.csv), not "
                         f"an opened Source ({source.spec!r}); open it with target_column=")
    unlabelled = [it.id for it in source.items if it.label is None]
    if unlabelled:
        raise ValueError(f"training needs labels; {len(unlabelled)} items of {source.spec!r} "
                         f"have none, e.g. {unlabelled[:3]}")
    size = transform.preprocessing.input_size
    images = np.empty((len(source), size, size, 3), np.dtype(dtype))

    def load(i):
        pixels = transform.resize_and_crop(load_rgb(source.items[i]))
        images[i] = np.round(pixels) if dtype == "uint8" else pixels

    workers = num_workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(load, range(len(source))))
    groups = [it.group for it in source.items]
    targets = None
    with_targets = [it.targets is not None for it in source.items]
    if any(with_targets):
        if not all(with_targets):
            missing = [it.id for it in source.items if it.targets is None]
            raise ValueError(f"{len(missing)} items of {source.spec!r} have no regression "
                             f"targets while others do, e.g. {missing[:3]}")
        targets = np.array([it.targets for it in source.items], np.float32)
    return Dataset(
        images=images,
        labels=np.array([it.label for it in source.items], np.int32),
        groups=None if all(g is None for g in groups) else np.array(groups, dtype=object),
        ids=tuple(it.id for it in source.items),
        class_names=tuple(source.class_names),
        source=str(source.spec),
        targets=targets,
    )


def split_validation(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, validation)``: stratified by label; by group when the dataset has groups
    (no group on both sides)."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit

    index = np.arange(len(dataset))
    if dataset.groups is not None:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        train, val = next(splitter.split(index, dataset.labels, dataset.groups))
    else:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        train, val = next(splitter.split(index, dataset.labels))
    return dataset.subset(np.sort(train)), dataset.subset(np.sort(val))


def batches(n: int, batch_size: int, *, n_devices: int = 1, shuffle_key=None):
    """Yields ``(index, mask)`` per batch covering all ``n`` examples once.

    Full batches have ``batch_size`` rows; the last one has its real rows plus repeats of
    them up to a multiple of ``n_devices``, with ``mask`` 0 on the repeats.

    Args:
        shuffle_key: a PRNG key for this epoch's order; None keeps the order (evaluation).
    """
    if batch_size % n_devices:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {n_devices} "
                         "devices")
    order = (np.asarray(jax.random.permutation(shuffle_key, n)) if shuffle_key is not None
             else np.arange(n))
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        real = len(index)
        pad = -real % n_devices
        if pad:
            index = np.concatenate([index, index[np.arange(pad) % real]])
        mask = np.zeros(len(index), np.float32)
        mask[:real] = 1.0
        yield index, mask
