"""Sources from tensorflow-datasets (``tfds:NAME[:SPLIT]``), read offline from prepared data.

:func:`load_tfds_source` never downloads or prepares anything: the data set must already be
prepared under ``data_dir`` (``tfds build``, ``builder.download_and_prepare()``, or
:func:`featsim.data.kermany_tfds.prepare_kermany`); otherwise it raises ``FileNotFoundError``
saying how. Data prepared in the ``array_record`` format is read without TensorFlow
(``builder.as_data_source``); the ``tfrecord`` format (the tfds default) can only be read
through ``tf.data``, so reading it needs TensorFlow (the ``featsim[tfds]`` extra).

Importing this module does not import tensorflow_datasets (slow); the first call does.

Memory: an :class:`~featsim.data.items.Item` holds its pixels, so a source is materialised:
every image of the requested split(s) is decoded into memory, at native size. That is about
50 MB for 1000 images of 224x224x1, 1.6 GB for Imagenette's 3925 validation images at
320 px, and 10-15 GB for all 5856 native-size Kermany X-rays; ask for a slice
(``"test[:500]"``) when that is too much.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import importlib.util
import io
import os
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image

from featsim.data.items import Item, Source

__all__ = ["load_tfds_source"]

_CHUNK = 256  # records read (and decoded in parallel) at a time
_MAX_THREADS = 8  # PIL releases the GIL while decoding
_MODE_FOR_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_NATIVE_MODE = {"1": "L", "L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA"}


def load_tfds_source(
    name: str,
    split: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str | None = "label",
) -> Source:
    """Lists a prepared tfds data set as a :class:`Source` of in-memory images.

    Items are ``Item(id=f"{split}/{index}", array=image, label=label)`` in the stored order
    of each split (tfds' own deterministic order; for ``chest_xray_kermany`` sorted by class
    and file name). Images are decoded with PIL to the channel count the ``Image`` feature
    declares (``[H, W, C]`` uint8, e.g. ``[H, W, 1]`` for ``chest_xray_kermany``, like
    ``tf.image.decode_image(channels=C)``; PIL's grayscale conversion is used where a file's
    channels differ). PIL, not TensorFlow, decodes, so pixels equal those of the same files
    read with PIL (``tfds.load``'s JPEG decoder differs by a few grey levels). Non-``Image``
    features and non-uint8 images are decoded by tfds.

    Args:
        name: tfds name, optionally with config and version: ``"imagenette/320px-v2"``,
            ``"mnist:3.0.1"``, ``"chest_xray_kermany"`` (registered by importing
            :mod:`featsim.data.kermany_tfds`, which this function does).
        split: a tfds split: ``"test"``, a slice ``"train[:100]"`` or ``"train[10%:]"``, a
            union ``"train+test"``. None: every split, concatenated in sorted name order
            (``test``, ``train``, ``val`` for Kermany). The split string as given, or each
            split name for None, prefixes the item ids.
        data_dir: the tfds data folder; None: tfds' default (``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).
        image_key: the top-level feature holding the image.
        label_key: the top-level feature holding an integer label, class names taken from it
            when it is a ``ClassLabel``; None for no labels. A missing ``"label"`` feature
            (the default key) means an unlabelled source; any other missing key is an error.
            Negative labels (tfds' "unknown") become ``label=None``.

    Returns:
        ``Source(kind="tfds", spec="tfds:NAME[:SPLIT]")`` with ``class_names`` from the
        label's ``ClassLabel``.

    Raises:
        KeyError: unknown data set, split, or feature key; the message lists what exists.
        FileNotFoundError: the data set is not prepared in ``data_dir``; the message names the
            folder looked in and the command that prepares it (and the manual_dir, for data
            sets that need a manual download).
        ImportError: the data is in a format only TensorFlow reads, and TensorFlow is absent.
        ValueError: an image cannot be decoded (the message names the item), or the label
            feature is not a scalar integer.

    Example::

        prepare_kermany("~/Downloads/kermany", "/data/tfds")  # once
        src = load_tfds_source("chest_xray_kermany", "test", data_dir="/data/tfds")
        src.items[0].array.shape  # (H, W, 1)
    """
    import tensorflow_datasets as tfds

    from featsim.data import kermany_tfds  # noqa: F401 - registers chest_xray_kermany

    data_dir = None if data_dir is None else os.fspath(os.path.expanduser(data_dir))
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        base = name.split("/")[0].split(":")[0]
        names = tfds.list_builders(with_community_datasets=False)  # no network
        close = difflib.get_close_matches(base, names, n=5)
        raise KeyError(
            f"unknown tfds data set {name!r}: not registered with tfds, and no prepared copy in "
            f"{_looked_in(tfds, data_dir)}; close names: {close}; tfds.list_builders() lists "
            "all (a data set defined outside tfds needs its module imported first)"
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(_not_prepared_message(tfds, builder, name, data_dir))

    info = builder.info
    features = info.features
    if image_key not in features:
        raise KeyError(
            f"tfds data set {name!r} has no image feature {image_key!r}; its features are "
            f"{_describe_features(features)} (pass image_key=...)"
        )
    image_feature = features[image_key]
    class_names: tuple[str, ...] = ()
    if label_key is not None and label_key not in features:
        if label_key != "label":
            raise KeyError(
                f"tfds data set {name!r} has no label feature {label_key!r}; its features are "
                f"{_describe_features(features)}"
            )
        label_key = None
    if label_key is not None and isinstance(features[label_key], tfds.features.ClassLabel):
        class_names = tuple(features[label_key].names)

    available = list(info.splits)
    splits = sorted(available) if split is None else [split]
    for s in splits:
        _check_split(s, available, name)

    decode_here = (
        isinstance(image_feature, tfds.features.Image)
        and image_feature.np_dtype == np.uint8
        and len(image_feature.shape) == 3
    )
    decoders = {image_key: tfds.decode.SkipDecoding()} if decode_here else None
    channels = image_feature.shape[-1] if decode_here else None

    items = []
    for s in splits:
        records = _read_split(tfds, builder, s, decoders, name)
        for i, (image, label) in enumerate(
            _decode_records(records, image_key, label_key, decode_here, channels, name, s)
        ):
            items.append(Item(id=f"{s}/{i}", array=image, label=label))

    which = f"split {split}" if split is not None else f"splits {'+'.join(splits)}"
    return Source(
        spec=f"tfds:{name}" + (f":{split}" if split is not None else ""),
        kind="tfds",
        items=tuple(items),
        class_names=class_names,
        description=(
            f"tensorflow-datasets {info.full_name}, {which}: {len(items)} images "
            f"from {builder.data_dir}"
        ),
    )


def _describe_features(features) -> str:
    return "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in features.items()) + "}"


def _check_split(split: str, available: list[str], name: str) -> None:
    """Raises KeyError unless every part of a tfds split expression names a stored split."""
    for part in split.split("+"):
        m = re.match(r"\s*([^\[\s]+)", part)
        base = m.group(1) if m else part
        if base not in available:
            raise KeyError(
                f"tfds data set {name!r} has no split {base!r} (asked for {split!r}); its "
                f"splits are {sorted(available)} (slices like 'train[:100]' and unions like "
                "'train+test' work too)"
            )


def _looked_in(tfds, data_dir: str | None) -> str:
    if data_dir is not None:
        return data_dir
    return ", ".join(os.fspath(d) for d in tfds.core.utils.file_utils.list_data_dirs())


def _not_prepared_message(tfds, builder, name: str, data_dir: str | None) -> str:
    root = os.fspath(builder.data_dir_root)
    base = name.split("/")[0].split(":")[0]
    kermany = base == "chest_xray_kermany"
    msg = (
        f"tfds data set {name!r} is not prepared: no {builder.info.full_name} in "
        f"{_looked_in(tfds, data_dir)} (expected {builder.data_dir}). featsim reads prepared "
        "data only and never downloads. Prepare it once, in Python:\n"
    )
    if kermany:
        msg += (
            "    from featsim.data.kermany_tfds import prepare_kermany\n"
            f"    prepare_kermany(manual_dir, {root!r})\n"
        )
    else:
        msg += (
            "    import tensorflow_datasets as tfds\n"
            f"    tfds.builder({name!r}, data_dir={root!r}, file_format='array_record')"
            ".download_and_prepare()\n"
        )
    imports = " --imports featsim.data.kermany_tfds" if kermany else ""
    msg += (
        "or with the tfds command line (which imports TensorFlow):\n"
        f"    tfds build {name.split(':')[0]}{imports} --data_dir {root} "
        "--file_format array_record\n"
        "featsim reads the array_record format without TensorFlow (tfds' default format, "
        "tfrecord, needs it). Preparing needs TensorFlow only where the data set's own builder "
        "uses it (imagenette's does; chest_xray_kermany's does not)."
    )
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = os.path.join(root, "downloads", "manual")
        msg += (
            f"\nThis data set needs a manual download first, into the manual_dir (default "
            f"{manual}; choose one with --manual_dir or "
            "tfds.download.DownloadConfig(manual_dir=...)):\n"
            f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    return msg


def _read_split(tfds, builder, split: str, decoders, name: str) -> Iterator[dict]:
    """The split's records in stored order, images left encoded where ``decoders`` says."""
    formats = set(builder.info.available_file_formats())
    if formats & set(tfds.core.file_adapters.FileFormat.with_random_access()):
        source = builder.as_data_source(split=split, decoders=decoders)
        n = len(source)
        for start in range(0, n, _CHUNK):
            yield from source.__getitems__(list(range(start, min(start + _CHUNK, n))))
        return
    if importlib.util.find_spec("tensorflow") is None:
        stored = ", ".join(sorted(f.value for f in formats)) or "unknown"
        raise ImportError(
            f"tfds data set {name!r} in {builder.data_dir} is stored as {stored}, which only "
            "TensorFlow can read: install it (pip install 'featsim[tfds]', i.e. "
            "tensorflow-cpu), or prepare the data again in the array_record format, which "
            "featsim reads without TensorFlow (builder = tfds.builder(name, data_dir=..., "
            "file_format='array_record'); builder.download_and_prepare())"
        )
    dataset = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    yield from tfds.as_numpy(dataset)


def _decode_records(
    records: Iterator[dict],
    image_key: str,
    label_key: str | None,
    decode_here: bool,
    channels: int | None,
    name: str,
    split: str,
) -> Iterator[tuple[np.ndarray, int | None]]:
    """``(image, label)`` per record; encoded images are decoded on a thread pool."""
    workers = min(_MAX_THREADS, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        chunk: list[dict] = []
        index = 0

        def flush():
            images = [r[image_key] for r in chunk]
            wheres = [f"tfds {name!r} item {split}/{index + k}" for k in range(len(chunk))]
            if decode_here:
                images = pool.map(_decode_image, images, [channels] * len(chunk), wheres)
            return [
                (np.asarray(im), _label(r, label_key, w))
                for im, r, w in zip(images, chunk, wheres, strict=True)
            ]

        for record in records:
            chunk.append(record)
            if len(chunk) == _CHUNK:
                yield from flush()
                index += len(chunk)
                chunk = []
        if chunk:
            yield from flush()


def _label(record: dict, label_key: str | None, where: str) -> int | None:
    if label_key is None:
        return None
    value = np.asarray(record[label_key])
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(
            f"{where}: label feature {label_key!r} is not a scalar integer "
            f"(dtype {value.dtype}, shape {value.shape}); pass label_key=None or another key"
        )
    return int(value) if value >= 0 else None


def _decode_image(data: bytes, channels: int | None, where: str) -> np.ndarray:
    """PIL decode to ``[H, W, channels]`` uint8 (native channels when ``channels`` is None)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = _MODE_FOR_CHANNELS.get(channels) or _NATIVE_MODE.get(im.mode, "RGB")
            array = np.asarray(im if im.mode == mode else im.convert(mode))
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: cannot decode image: {e}") from e
    return array[..., None] if array.ndim == 2 else array
