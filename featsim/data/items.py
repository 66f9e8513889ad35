"""What a data source yields: a deterministic list of :class:`Item` (a file or an array).

Sources only *list* images; decoding is :mod:`featsim.data.decode`'s job and resizing
:mod:`featsim.data.transforms`'. An item's identity for caching is the SHA-256 of its
content (:meth:`Item.content_hash`), never its name.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

__all__ = ["Item", "Source"]


@dataclasses.dataclass(frozen=True, eq=False)
class Item:
    """One image of a source.

    Attributes:
        id: stable within its source, e.g. the POSIX path relative to the source root
            (``"test/NORMAL/IM-0001.jpeg"``) or ``"train/17"`` for the 18th array of a split.
        path: the image file, or None for an in-memory image.
        array: the decoded pixels (``[H, W]`` or ``[H, W, C]``, uint8/uint16/float) when
            ``path`` is None.
        label: integer class index into :attr:`Source.class_names`, or None (unlabelled).
        group: a grouping key such as a patient id (for group-aware splits), or None.
        targets: regression targets (e.g. age) read from ``labels.csv`` columns, one float
            per requested column in the order asked for, or None.
    """

    id: str
    path: Path | None = None
    array: np.ndarray | None = dataclasses.field(default=None, repr=False)
    label: int | None = None
    group: str | None = None
    targets: tuple[float, ...] | None = None

    def __post_init__(self):
        if (self.path is None) == (self.array is None):
            raise ValueError(f"item {self.id!r} needs exactly one of path= and array=")

    def read_bytes(self) -> bytes:
        """The raw content: the file's bytes, or the array's dtype, shape and bytes."""
        if self.path is not None:
            return Path(self.path).read_bytes()
        a = np.ascontiguousarray(self.array)
        return f"{a.dtype.str}{a.shape}".encode() + a.tobytes()

    def content_hash(self) -> str:
        """SHA-256 hex digest of :meth:`read_bytes` (names and paths do not enter it)."""
        return hashlib.sha256(self.read_bytes()).hexdigest()

    @property
    def name(self) -> str:
        """What error messages call the item: the file path, or ``array <id>``."""
        return str(self.path) if self.path is not None else f"array {self.id}"


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """A listed data source: items in a deterministic order.

    Attributes:
        spec: what the user asked for, e.g. ``"chest_xray:test"`` or ``"embedded:natural"``.
        kind: ``"folder"``, ``"npz"``, ``"tfds"``, ``"embedded"`` or ``"files"``.
        items: the images, in a deterministic order (sorted paths, array order).
        class_names: label index -> class name (empty when unlabelled).
        description: one line for reports (where the images come from).
        ignored: files in a folder source that are not images (``labels.csv`` aside), by
            relative path: listed so that nothing is left out without a word.
    """

    spec: str
    kind: str
    items: tuple[Item, ...]
    class_names: tuple[str, ...] = ()
    description: str = ""
    ignored: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray | None:
        """int64 labels ``[n]`` (-1 where an item has none), or None if no item has one."""
        if all(it.label is None for it in self.items):
            return None
        return np.array([-1 if it.label is None else it.label for it in self.items], np.int64)
