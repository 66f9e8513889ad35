"""tensorflow-datasets builder ``chest_xray_kermany``: the Kermany et al. (2018) pneumonia X-rays.

The paediatric chest X-rays (NORMAL / PNEUMONIA) of Kermany, Goldbaum et al., "Identifying
Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning", Cell 172(5), 2018, as
distributed on Kaggle (``paultimothymooney/chest-xray-pneumonia``) and Mendeley Data
(``rscbjbr9sj``, v2), CC BY 4.0. This is the data set Gu & Lee (2024) use.

Importing this module registers the builder with tfds (subclassing ``GeneratorBasedBuilder`` is
the registration), so plain tfds calls work::

    import featsim.data.kermany_tfds  # noqa: F401
    import tensorflow_datasets as tfds

    builder = tfds.builder("chest_xray_kermany", data_dir="~/tfds", file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="~/Downloads/kermany"))

or, the same in one call, :func:`prepare_kermany`. ``tfds.load("chest_xray_kermany", ...)`` also
works, but writes (and reads) TFRecord files, which needs TensorFlow; the ``array_record`` format
that :func:`prepare_kermany` writes is prepared and read without TensorFlow
(:func:`featsim.data.tfds_source.load_tfds_source`).

Storage rule (version 1.0.0): every image is stored as one grayscale channel,
``Image(shape=(None, None, 1))``, at its native size. A file that is already 8-bit grayscale
(PIL mode ``L``: nearly all Kaggle originals) is stored byte for byte, so PIL decodes it to
exactly the pixels of the original file (TensorFlow's faster JPEG decoder, used by
``tfds.load``, differs by up to ~15 grey levels on native-size X-rays); any other file (the
few RGB originals, or re-encoded RGB copies such as 224 px mirrors) is converted with PIL's
``convert("L")`` (ITU-R 601-2 luma; exact for R = G = B) and stored as lossless PNG.
High-bit-depth files are refused rather than clipped.

Examples are written in a fixed order, not shuffled (``disable_shuffling=True``): sorted by
class, then by file name, so example ``i`` of ``test`` is the ``i``-th file of
``test/NORMAL`` + ``test/PNEUMONIA`` in sorted order.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image

__all__ = [
    "CLASS_NAMES",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "ChestXrayKermany",
    "encode_grayscale",
    "find_kermany_root",
    "list_kermany_files",
    "prepare_kermany",
]

_log = logging.getLogger(__name__)

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
"""Label index -> class folder name."""

SPLITS = ("train", "val", "test")
"""The split folders recognised; ``train`` and ``test`` are required, ``val`` is optional."""

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
"""File suffixes read as images, compared case-insensitively; other files are skipped (logged)."""

_CITATION = """\
@article{kermany2018identifying,
  title     = {Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning},
  author    = {Kermany, Daniel S. and Goldbaum, Michael and others},
  journal   = {Cell},
  volume    = {172},
  number    = {5},
  pages     = {1122--1131.e9},
  year      = {2018},
  doi       = {10.1016/j.cell.2018.02.010},
}"""

_DESCRIPTION = """\
Paediatric chest X-rays (anterior-posterior) labelled NORMAL or PNEUMONIA, from Kermany et al.
(2018), in the Kaggle "Chest X-Ray Images (Pneumonia)" split: train 1341/3875, test 234/390,
val 8/8. Images are grayscale at native resolution; files that are not 8-bit grayscale are
converted to grayscale and stored as PNG, the others are stored byte for byte. Examples are in
sorted (class, file name) order. `file_name` is the path relative to the `chest_xray` folder.
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download "Chest X-Ray Images (Pneumonia)" from Kaggle
(https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia, archive.zip) or the
chest X-ray part of Mendeley Data rscbjbr9sj v2 (ChestXRay2017.zip), unzip it, and place its
`chest_xray/` folder into the manual_dir, so that these folders exist:

    <manual_dir>/chest_xray/train/NORMAL/      <manual_dir>/chest_xray/train/PNEUMONIA/
    <manual_dir>/chest_xray/test/NORMAL/       <manual_dir>/chest_xray/test/PNEUMONIA/
    <manual_dir>/chest_xray/val/NORMAL/ ...    (optional)

(`train/` and `test/` directly in <manual_dir> work too.) Anything else in the archive (the
nested duplicate `chest_xray/chest_xray/`, `__MACOSX/`, `.DS_Store`) is ignored. The default
manual_dir is <data_dir>/downloads/manual; choose another with
`tfds.download.DownloadConfig(manual_dir=...)`, `tfds build --manual_dir ...` or
`featsim.data.kermany_tfds.prepare_kermany(manual_dir, data_dir)`.
"""


class ChestXrayKermany(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for the Kermany et al. (2018) pneumonia chest X-rays (manual download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {  # noqa: RUF012 - tfds' own class attribute, read-only by convention
        "1.0.0": "Grayscale images at native size, unshuffled (class, file name) order.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly rather than dataset_info_from_configs(), which would scan this
        # module's folder for README/CITATIONS files.
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 1)),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://data.mendeley.com/datasets/rscbjbr9sj/2",
            citation=_CITATION,
            license="CC BY 4.0",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = find_kermany_root(dl_manager.manual_dir)
        return {s: self._generate_examples(root, s) for s in SPLITS if (root / s).is_dir()}

    def _generate_examples(self, root: Path, split: str):
        for rel, label in list_kermany_files(root, split):
            yield (
                rel,
                {
                    "image": encode_grayscale(root / rel),
                    "label": label,
                    "file_name": rel,
                },
            )


def find_kermany_root(manual_dir: str | os.PathLike) -> Path:
    """The folder holding ``train/`` and ``test/``: ``manual_dir/chest_xray`` or ``manual_dir``.

    Raises:
        FileNotFoundError: neither holds both ``train/`` and ``test/``; the message repeats the
            manual download instructions.
    """
    manual_dir = Path(os.fspath(manual_dir)).expanduser()
    for root in (manual_dir / "chest_xray", manual_dir):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    raise FileNotFoundError(
        f"no Kermany chest_xray/train/ and chest_xray/test/ folders in manual_dir {manual_dir} "
        f"(nor train/ and test/ directly in it).\n{_MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )


def list_kermany_files(root: Path, split: str) -> list[tuple[str, int]]:
    """``(path relative to root, label)`` of one split's images, sorted by class then name.

    Files whose suffix is not in :data:`IMAGE_SUFFIXES` (e.g. ``.DS_Store``) and subfolders
    other than the class folders are skipped and counted in a logged warning.

    Raises:
        FileNotFoundError: a class folder is missing.
    """
    split_dir = root / split
    skipped = sorted(p.name for p in split_dir.iterdir() if p.name not in CLASS_NAMES)
    out = []
    for label, name in enumerate(CLASS_NAMES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            found = sorted(p.name for p in split_dir.iterdir())
            raise FileNotFoundError(
                f"missing class folder {class_dir} (expected {list(CLASS_NAMES)} in "
                f"{split_dir}, found {found})"
            )
        for p in sorted(class_dir.iterdir(), key=lambda p: p.name):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                out.append((f"{split}/{name}/{p.name}", label))
            else:
                skipped.append(f"{name}/{p.name}")
    if skipped:
        _log.warning(
            "chest_xray_kermany %s: skipped %d entries that are not %s images in a class "
            "folder: %s",
            split,
            len(skipped),
            "/".join(IMAGE_SUFFIXES),
            skipped[:10],
        )
    return out


def encode_grayscale(path: str | os.PathLike) -> bytes:
    """The bytes stored for one image under the storage rule of the module docstring.

    Returns the file's own bytes if it is an 8-bit grayscale JPEG or PNG, else the image
    converted with PIL ``convert("L")`` and encoded as PNG.

    Raises:
        ValueError: the file is not a readable image, or has more than 8 bits per sample.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode == "L" and im.format in ("JPEG", "PNG"):
                return path.read_bytes()
            if im.mode.startswith(("I", "F")):
                raise ValueError(
                    f"{path}: mode {im.mode!r} (more than 8 bits per sample) would be clipped "
                    "by the 8-bit grayscale storage rule"
                )
            gray = im.convert("L")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    return buf.getvalue()


def prepare_kermany(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    file_format: str = "array_record",
) -> ChestXrayKermany:
    """Prepares ``chest_xray_kermany`` from a local copy of the Kaggle folder; no download.

    Args:
        manual_dir: folder holding the Kaggle ``chest_xray/`` folder (see
            ``ChestXrayKermany.MANUAL_DOWNLOAD_INSTRUCTIONS``).
        data_dir: tfds data folder to write ``chest_xray_kermany/1.0.0/`` into.
        file_format: ``"array_record"`` (default: written and read without TensorFlow) or
            ``"tfrecord"`` (needs TensorFlow; what ``tfds.load`` reads).

    Returns:
        The prepared builder. Preparing an already prepared ``data_dir`` does nothing.

    Raises:
        FileNotFoundError: ``manual_dir`` lacks the ``train/`` and ``test/`` folders.
        ValueError: an image cannot be read.

    Example::

        builder = prepare_kermany("~/Downloads/kermany", "~/tensorflow_datasets")
        test = builder.as_data_source("test")
    """
    manual_dir = Path(os.fspath(manual_dir)).expanduser()
    find_kermany_root(manual_dir)  # fail here, before tfds creates any folder
    builder = ChestXrayKermany(
        data_dir=os.fspath(Path(data_dir).expanduser()), file_format=file_format
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return builder
