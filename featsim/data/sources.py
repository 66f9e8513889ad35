"""Open a data source from a spec string: a folder tree, one image file, a MedMNIST ``.npz``,
a TFDS data set or an embedded sample set.

Spec forms (see :func:`open_source`)::

    ../shared/data/chest_xray_kermany_224/chest_xray:test   # folder, subfolder "test"
    ../shared/data/imagenette_val_500                       # folder with labels.csv
    scan.dcm                                                # one image
    ../shared/data/medmnist/breastmnist.npz:test            # .npz, split "test"
    tfds:imagenette/320px-v2:validation                     # TFDS name, split
    embedded:natural                                        # images inside installed wheels

Sources only *list* images (sorted, deterministic); nothing is decoded here.
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from featsim.data import subsets
from featsim.data.items import Item, Source

__all__ = ["IMAGE_EXTENSIONS", "NPZ_SPLITS", "open_source"]

#: File name suffixes (lower case) that count as images; the check ignores case.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm"}
)
#: MedMNIST split names, in the order a split-less ``.npz`` spec concatenates them.
NPZ_SPLITS = ("train", "val", "test")

_LABEL_COLUMNS = ("label", "class_index", "class")
_NAME_COLUMNS = ("name", "class_name")
_GROUP_COLUMNS = ("group", "patient_id", "patient")
_SHOW = 5  # how many names an error or warning lists
# The spec a subset records (featsim.data.subsets): "BASE [stratified subset: n of N, seed S]".
# open_source reopens it, so a run's recorded training split names the same images again.
_SUBSET_SPEC = re.compile(r"(?P<base>.+) \[(?P<kind>stratified|quick) subset: (?P<n>\d+) of "
                          r"(?P<total>\d+)(?:, seed (?P<seed>\d+))?\]")


def open_source(
    spec: str | os.PathLike | Source,
    *,
    data_dir: str | os.PathLike | None = None,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    target_column: str | Sequence[str] | None = None,
) -> Source:
    """Lists the images a spec names.

    A string spec that is an existing path is that path (names may contain ``:`` or ``%``).
    Otherwise ``tfds:NAME[:SPLIT]`` and ``embedded:NAME`` select those sources, and any other
    spec is split at its *last* ``:`` into a path and a subfolder (for a folder) or a split
    (for a ``.npz``). A :class:`os.PathLike` spec is always a plain path.

    Folders: with a ``labels.csv`` in the folder, its rows give the items (columns ``file``,
    one of ``label``/``class_index``/``class``, optional ``name``/``class_name`` and
    ``group``/``patient_id``/``patient``; with ``target_column``, the named numeric
    column(s) as :attr:`Item.targets`). Otherwise images in class subfolders take their
    immediate parent folder's name as class (class names sorted), and images directly in the
    folder are unlabelled; a folder with both is an error. Hidden files and folders are
    skipped, symlinked folders are not followed (with a warning), items are sorted by path.

    Args:
        spec: a spec string, a path, or a :class:`Source` (returned unchanged).
        data_dir: where TFDS keeps its data (``tfds:`` specs only).
        extensions: file suffixes that count as images (case-insensitive, e.g. ``".png"``).
        target_column: a ``labels.csv`` column name (or a sequence of them) whose values,
            finite numbers, become each item's ``targets`` (regression targets such as age),
            in the order given. Only folders with a ``labels.csv`` have them.

    Returns:
        The :class:`Source`; ``Item.id`` is the POSIX path relative to the selected folder,
        ``"SPLIT/INDEX"`` for ``.npz`` arrays, or the file name for a single image.

    Raises:
        FileNotFoundError: the path, subfolder, or a file listed in ``labels.csv`` is missing.
        ValueError: no images, an ambiguous folder layout, a malformed ``labels.csv`` or
            ``.npz``, an unknown ``.npz`` split; a ``target_column`` that is absent, or a
            missing or non-numeric target (the file, line and column are named), or
            requested from a source without a ``labels.csv``.
        KeyError: an unknown ``embedded:`` name.

    Example:
        >>> src = open_source("../shared/data/chest_xray_kermany_224/chest_xray:test")
        >>> src.class_names, len(src)
        (('NORMAL', 'PNEUMONIA'), 624)
    """
    targets = ((target_column,) if isinstance(target_column, str)
               else tuple(target_column or ()))
    if isinstance(spec, Source):
        if targets:
            raise ValueError(f"target_column={target_column!r} needs a spec, not an opened "
                             f"Source ({spec.spec!r})")
        return spec
    if not os.fspath(spec):
        raise ValueError("empty source spec")
    if targets and not isinstance(spec, os.PathLike) and not Path(spec).exists() and (
            spec.startswith("tfds:") or spec.startswith("embedded:")):
        raise ValueError(f"{spec!r}: target columns come from a folder's labels.csv; "
                         f"{spec.split(':', 1)[0]}: sources have none")
    exts = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if isinstance(spec, os.PathLike):
        path, sub = Path(spec), None
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
    elif Path(spec).exists():
        path, sub = Path(spec), None
    elif spec.startswith("tfds:"):
        return _tfds(spec, data_dir)
    elif spec.startswith("embedded:"):
        from featsim.data.embedded import embedded_source

        return embedded_source(spec.removeprefix("embedded:"))
    elif (recorded := _SUBSET_SPEC.fullmatch(spec)) is not None:
        return _recorded_subset(spec, recorded, data_dir, extensions, target_column)
    else:
        path, sub = _split_spec(spec)
    spec = os.fspath(spec)

    if path.is_dir():
        return _folder_source(spec, _select_subfolder(path, sub), exts, targets)
    if targets:
        raise ValueError(f"{spec!r}: target columns {list(targets)} come from a folder's "
                         f"labels.csv; {path} is not a folder")
    if path.suffix.lower() == ".npz":
        return _npz_source(spec, path, sub)
    if path.suffix.lower() in exts:
        if sub is not None:
            raise ValueError(f"{spec!r}: {path} is a single image; it has no split {sub!r}")
        item = Item(id=path.name, path=path.absolute())
        return Source(spec, "files", (item,), description=f"one image: {path}")
    raise ValueError(
        f"{spec!r}: {path} is not a folder, a .npz file or an image "
        f"(image extensions: {' '.join(sorted(exts))})"
    )


def _recorded_subset(spec: str, recorded, data_dir, extensions, target_column) -> Source:
    """Reopens a subset from the spec it recorded; checks the base still has N items."""
    base = open_source(recorded["base"], data_dir=data_dir, extensions=extensions,
                       target_column=target_column)
    n, total, seed = int(recorded["n"]), int(recorded["total"]), recorded["seed"]
    if len(base) != total:
        raise ValueError(f"{spec!r}: the subset was drawn from {total} items, but "
                         f"{recorded['base']!r} now has {len(base)}; it cannot be reopened")
    if seed is None:
        raise ValueError(f"{spec!r}: the spec records no seed, so the subset cannot be "
                         "reopened; pass the source and draw the subset again")
    pick = (subsets.proportional_subset if recorded["kind"] == "stratified"
            else subsets.balanced_subset)
    return pick(base, n, seed=int(seed))


def _split_spec(spec: str) -> tuple[Path, str]:
    """``"PATH:SUB"`` -> ``(Path(PATH), SUB)`` for a spec that is not itself a path."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or not Path(head).exists():
        raise FileNotFoundError(
            f"no such file or folder: {spec!r}"
            + (f" (nor {head!r} with subfolder/split {tail!r})" if sep and head else "")
        )
    if not tail:
        raise ValueError(f"{spec!r}: empty subfolder/split after ':'")
    return Path(head), tail


def _select_subfolder(root: Path, sub: str | None) -> Path:
    if sub is None:
        return root
    if (root / sub).is_dir():
        return root / sub
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    raise FileNotFoundError(
        f"no subfolder {sub!r} in {root}; available: {', '.join(subdirs) or '(none)'}"
    )


def _tfds(spec: str, data_dir) -> Source:
    # ':' only separates: NAME may contain '/', SPLIT may contain ':' ("train[:10%]").
    name, _, split = spec.removeprefix("tfds:").partition(":")
    if not name:
        raise ValueError(f"{spec!r}: expected tfds:NAME or tfds:NAME:SPLIT")
    from featsim.data.tfds_source import load_tfds_source

    return load_tfds_source(name, split or None, data_dir=data_dir)


def _walk(root: Path) -> list[str]:
    """Relative POSIX paths of all non-hidden files under ``root``, sorted."""
    files, skipped_links = [], []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: no loops
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        skipped_links += [(here / d) for d in dirnames if (here / d).is_symlink()]
        files += [(here / f).relative_to(root).as_posix() for f in filenames if f[0] != "."]
    if skipped_links:
        warnings.warn(
            f"{len(skipped_links)} symlinked folder(s) under {root} not followed: "
            + _some(p.relative_to(root).as_posix() for p in skipped_links),
            stacklevel=4,
        )
    return sorted(files)


def _some(names: Iterable[str], n: int = _SHOW) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _folder_source(spec: str, root: Path, exts: frozenset[str],
                   targets: tuple[str, ...] = ()) -> Source:
    root = root.absolute()
    files = _walk(root)
    images = [f for f in files if PurePosixPath(f).suffix.lower() in exts]
    # Not images, so not used: listed on the Source (and in reports), never dropped unseen.
    others = tuple(f for f in files if PurePosixPath(f).suffix.lower() not in exts
                   and f != "labels.csv")
    if (root / "labels.csv").is_file():
        return _csv_source(spec, root, images, exts, targets, others)
    if targets:
        raise ValueError(f"{spec!r}: target columns {list(targets)} are read from a "
                         f"labels.csv, and {root} has none")
    if not images:
        found = (
            f"found {len(files)} files, none with an image extension: {_some(files)}"
            if files
            else "the folder is empty"
        )
        raise ValueError(f"no images in {root}: looked for {' '.join(sorted(exts))}; {found}")
    top = [f for f in images if "/" not in f]
    if top and len(top) < len(images):
        subs = sorted({f.split("/", 1)[0] for f in images if "/" in f})
        raise ValueError(
            f"ambiguous layout in {root}: {len(top)} images directly in the folder and "
            f"{len(images) - len(top)} in subfolders ({_some(subs)}); move all of them into "
            "class subfolders, select one subfolder with PATH:SUBFOLDER, or add a labels.csv"
        )
    if top:
        items = tuple(Item(id=f, path=root / f) for f in images)
        description = f"{len(items)} unlabelled images in {root}"
        return Source(spec, "folder", items, description=description, ignored=others)
    classes = [PurePosixPath(f).parent.name for f in images]
    class_names = tuple(sorted(set(classes)))
    index = {c: i for i, c in enumerate(class_names)}
    items = tuple(
        Item(id=f, path=root / f, label=index[c]) for f, c in zip(images, classes, strict=True)
    )
    return Source(
        spec,
        "folder",
        items,
        class_names=class_names,
        description=f"{len(items)} images in {len(class_names)} class folders under {root}",
        ignored=others,
    )


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _target_values(csv_path, line: int, row: dict, targets: tuple[str, ...]):
    """The row's target columns as floats; ValueError naming file, line and column."""
    values = []
    for column in targets:
        raw = row[column].strip()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            what = "empty" if not raw else f"{raw!r}, not a finite number"
            raise ValueError(f"{csv_path}, line {line} ({row['file']!r}): target column "
                             f"{column!r} is {what}")
        values.append(value)
    return tuple(values)


def _csv_source(spec: str, root: Path, images: list[str], exts: frozenset[str],
                targets: tuple[str, ...] = (), others: tuple[str, ...] = ()) -> Source:
    """Items from ``root/labels.csv``, sorted by file."""
    csv_path = root / "labels.csv"
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{k.strip(): (v or "") for k, v in row.items() if k} for row in reader]
    label_col = _pick(columns, _LABEL_COLUMNS)
    if "file" not in columns or label_col is None:
        raise ValueError(
            f"{csv_path}: needs a 'file' column and one of {', '.join(_LABEL_COLUMNS)}; "
            f"found columns {columns}"
        )
    name_col, group_col = _pick(columns, _NAME_COLUMNS), _pick(columns, _GROUP_COLUMNS)
    absent = [c for c in targets if c not in columns]
    if absent:
        raise ValueError(f"{csv_path}: no target column {', '.join(map(repr, absent))}; "
                         f"found columns {columns}")

    by_file: dict[str, dict[str, str]] = {}
    target_values: dict[str, tuple[float, ...]] = {}
    for line, row in enumerate(rows, start=2):
        raw = row["file"]
        file = PurePosixPath(raw).as_posix()
        if PurePosixPath(raw).is_absolute() or ".." in PurePosixPath(raw).parts:
            raise ValueError(f"{csv_path}, line {line}: file {raw!r} is not inside {root}")
        if PurePosixPath(file).suffix.lower() not in exts:
            raise ValueError(f"{csv_path}, line {line}: {raw!r} has no image extension")
        if file in by_file:
            raise ValueError(f"{csv_path}, line {line}: {raw!r} is listed twice")
        if not row[label_col].strip():
            raise ValueError(f"{csv_path}, line {line}: empty {label_col!r} for {raw!r}")
        if targets:
            target_values[file] = _target_values(csv_path, line, row, targets)
        by_file[file] = row
    if not by_file:
        raise ValueError(f"{csv_path} lists no files")
    missing = [f for f in by_file if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) listed in {csv_path} not found: {_some(missing)}"
        )

    files = sorted(by_file)
    values = [by_file[f][label_col].strip() for f in files]
    if all(v.isascii() and v.lstrip("-").isdigit() for v in values):
        labels = [int(v) for v in values]
        if min(labels) < 0:
            raise ValueError(f"{csv_path}: negative {label_col!r} {min(labels)}")
        class_names = _index_names(csv_path, files, labels, by_file, name_col)
    else:  # class names: map to their sorted order
        class_names = tuple(sorted(set(values)))
        index = {c: i for i, c in enumerate(class_names)}
        labels = [index[v] for v in values]
    unlisted = [f for f in images if f not in by_file]
    if unlisted:
        warnings.warn(
            f"{len(unlisted)} image file(s) under {root} are not listed in labels.csv and are "
            f"left out: {_some(unlisted)}",
            stacklevel=4,
        )
    items = tuple(
        Item(
            id=f,
            path=root / f,
            label=label,
            group=(by_file[f][group_col].strip() or None) if group_col else None,
            targets=target_values[f] if targets else None,
        )
        for f, label in zip(files, labels, strict=True)
    )
    return Source(
        spec,
        "folder",
        items,
        class_names=class_names,
        description=f"{len(items)} images listed in {csv_path} ({len(set(labels))} classes)",
        ignored=tuple(sorted(others + tuple(unlisted))),
    )


def _index_names(csv_path, files, labels, by_file, name_col) -> tuple[str, ...]:
    """Class names for integer labels: ``str(i)``, or the csv's name column where given."""
    names = [str(i) for i in range(max(labels) + 1)]
    if name_col is None:
        return tuple(names)
    seen: dict[int, str] = {}
    for f, label in zip(files, labels, strict=True):
        name = by_file[f][name_col].strip()
        if seen.setdefault(label, name) != name:
            raise ValueError(
                f"{csv_path}: class {label} is called both {seen[label]!r} and {name!r}"
            )
    for label, name in seen.items():
        names[label] = name or names[label]
    return tuple(names)


def _npz_source(spec: str, path: Path, split: str | None) -> Source:
    """MedMNIST layout: ``{split}_images`` ``[N, H, W(, C)]``, ``{split}_labels`` ``[N(, 1)]``."""
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.files)
        present = [s for s in NPZ_SPLITS if f"{s}_images" in keys]
        if not present:
            raise ValueError(
                f"{path}: no MedMNIST arrays (expected keys like train_images, train_labels); "
                f"found keys {keys}"
            )
        if split is not None and split not in present:
            raise ValueError(f"{path}: no split {split!r}; available: {', '.join(present)}")
        arrays = {
            s: (z[f"{s}_images"], z[f"{s}_labels"] if f"{s}_labels" in keys else None)
            for s in ([split] if split else present)
        }
        names = tuple(str(n) for n in z["class_names"]) if "class_names" in keys else None

    items = []
    for s, (images, labels) in arrays.items():
        if images.ndim not in (3, 4):
            raise ValueError(
                f"{path}: {s}_images has shape {images.shape}; expected [N, H, W] or [N, H, W, C]"
            )
        if labels is not None:
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or len(labels) != len(images):
                raise ValueError(
                    f"{path}: {s}_labels has shape {labels.shape} for {s}_images of shape "
                    f"{images.shape}; expected ({len(images)},) or ({len(images)}, 1)"
                )
            if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
                raise ValueError(
                    f"{path}: {s}_labels must be non-negative integers (dtype {labels.dtype})"
                )
        items += [
            Item(id=f"{s}/{i}", array=images[i], label=None if labels is None else int(labels[i]))
            for i in range(len(images))
        ]
    labels_seen = [it.label for it in items if it.label is not None]
    if names is None:
        names = tuple(str(i) for i in range(max(labels_seen) + 1)) if labels_seen else ()
    elif labels_seen and max(labels_seen) >= len(names):
        raise ValueError(f"{path}: label {max(labels_seen)} but only {len(names)} class_names")
    return Source(
        spec,
        "npz",
        tuple(items),
        class_names=names,
        description=f"{len(items)} arrays from {path} ({'+'.join(arrays)})",
    )
