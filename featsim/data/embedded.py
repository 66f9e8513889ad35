"""Sample images that ship inside installed wheels, so a fresh machine needs no download.

``embedded:natural`` lists real photographs bundled with scikit-image, scikit-learn and
matplotlib; ``embedded:medical`` lists real medical images bundled with pydicom (DICOM),
scikit-image (fundus, histology, microscopy) and matplotlib (an MRI slice). The lists are fixed:
a missing package or file is an error, never a smaller set. Synthetic test patterns
(chessboards, logos, text, phantoms, colour wheels), re-encodings of an image already listed,
multi-frame DICOMs and DICOMs that need extra codecs (JPEG 2000, JPEG-LS, lossless JPEG) are
left out on purpose.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np

from featsim.data.items import Item, Source

__all__ = ["EMBEDDED_SOURCES", "EmbeddedImage", "embedded_source"]


class EmbeddedImage(NamedTuple):
    """One bundled image: ``package`` (import name), ``path`` inside it, ``description``."""

    package: str
    path: str
    description: str


_SK, _SKL, _MPL, _DCM = "skimage", "sklearn", "matplotlib", "pydicom"

_E = EmbeddedImage
_NATURAL = (
    _E(_SK, "data/astronaut.png", "NASA portrait of astronaut Eileen Collins, 512x512 RGB"),
    _E(_SK, "data/brick.png", "photograph of a brick wall (texture), 512x512 grey"),
    _E(_SK, "data/camera.png", "man with a camera on a tripod, 512x512 grey"),
    _E(_SK, "data/chelsea.png", "Chelsea the cat, 300x451 RGB"),
    _E(_SK, "data/coffee.png", "cup of coffee on a saucer, 400x600 RGB"),
    _E(_SK, "data/grass.png", "photograph of grass (texture), 512x512 grey"),
    _E(_SK, "data/gravel.png", "photograph of gravel (texture), 512x512 grey"),
    _E(
        _SK,
        "data/motorcycle_left.png",
        "motorcycle in a workshop, 500x741 RGB (left view of a Middlebury stereo pair; "
        "the right view is left out)",
    ),
    _E(_SK, "data/rocket.jpg", "SpaceX Falcon 9 on the launch pad at dusk, 427x640 RGB"),
    _E(_SKL, "datasets/images/china.jpg", "Summer Palace pagoda in Beijing, 427x640 RGB"),
    _E(_SKL, "datasets/images/flower.jpg", "dahlia flower, 427x640 RGB"),
    _E(_MPL, "mpl-data/sample_data/grace_hopper.jpg", "Grace Hopper in uniform, 600x512 RGB"),
)
_MEDICAL = (
    _E(
        _DCM,
        "data/test_files/CT_small.dcm",
        "DICOM CT, axial slice through a vertebra, 128x128 int16, GE, uncompressed",
    ),
    _E(
        _DCM,
        "data/test_files/MR_small.dcm",
        "DICOM MR slice, 64x64 int16, Toshiba, uncompressed (the MR_small_* files re-encode "
        "this image and are left out)",
    ),
    _E(
        _DCM,
        "data/test_files/examples_overlay.dcm",
        "DICOM MR of the abdomen (liver lesion), 300x484 uint16 (12 bits), Siemens, "
        "uncompressed; its overlay plane is not part of the pixels",
    ),
    _E(
        _DCM,
        "data/test_files/examples_rgb_color.dcm",
        "DICOM ultrasound of a lymph node (power Doppler), 240x320 RGB, GE, uncompressed "
        "(examples_jpeg2k.dcm is the same image, left out)",
    ),
    _E(
        _SK,
        "data/retina.jpg",
        "colour fundus photograph of a normal human retina, 1411x1411 RGB (Mikael Haggstrom)",
    ),
    _E(
        _SK,
        "data/microaneurysms.png",
        "detail of a retinal fundus image (green channel) with microaneurysms, 102x102 grey "
        "(DIARETDB1)",
    ),
    _E(
        _SK,
        "data/ihc.png",
        "histology: colonic glands, immunohistochemistry (DAB) with hematoxylin counterstain, "
        "512x512 RGB (Human Protein Atlas)",
    ),
    _E(
        _SK,
        "data/cell.png",
        "quantitative phase microscopy of a cell in saline, 660x550 grey (biomedical "
        "research imaging, not clinical)",
    ),
    _E(
        _MPL,
        "mpl-data/sample_data/s1045.ima.gz",
        "sagittal MRI of a human head, 256x256 uint16, gzipped raw pixels read as '<u2' like "
        "matplotlib's image_demo (values 0..55040 in steps of 256)",
    ),
)

#: name -> the fixed list of images of ``embedded:NAME`` (package import name, path inside
#: the package, description; sizes are H x W).
EMBEDDED_SOURCES: dict[str, tuple[EmbeddedImage, ...]] = {
    "natural": _NATURAL,
    "medical": _MEDICAL,
}

_PIP_NAMES = {_SK: "scikit-image", _SKL: "scikit-learn", _MPL: "matplotlib", _DCM: "pydicom"}


def _read_raw_mri(path: Path) -> np.ndarray:
    """matplotlib's ``s1045.ima.gz``: 256x256 headerless uint16 pixels, gzipped.

    matplotlib's demos read it with ``np.frombuffer(data, np.uint16)``, i.e. little-endian on
    every common machine; we fix ``"<u2"`` so the result does not depend on the host.
    """
    raw = gzip.decompress(path.read_bytes())
    if len(raw) != 256 * 256 * 2:
        raise ValueError(f"{path}: {len(raw)} bytes after gunzip; expected 256*256*2")
    return np.frombuffer(raw, "<u2").reshape(256, 256)


# Files that are not image files any decoder reads: listed as arrays, read here.
_ARRAY_READERS = {(_MPL, "mpl-data/sample_data/s1045.ima.gz"): _read_raw_mri}


def _package_dir(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"embedded:{name} needs the package {_PIP_NAMES[package]} (import {package}), which "
            "is not installed: pip install scikit-image pydicom (featsim's own dependencies "
            "bring scikit-learn and matplotlib)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_source(name: str) -> Source:
    """The images of ``embedded:NAME`` that ship inside installed packages.

    Args:
        name: ``"natural"`` or ``"medical"`` (the keys of :data:`EMBEDDED_SOURCES`).

    Returns:
        A :class:`Source` of kind ``"embedded"``, unlabelled, in the fixed order of
        :data:`EMBEDDED_SOURCES`. Items point at the installed files (``Item.path``), with ids
        like ``"skimage/astronaut.png"``; a raw file no decoder reads is an ``Item.array``.

    Raises:
        KeyError: an unknown name (the message lists the valid ones).
        ImportError: a package that holds some of the images is not installed.
        FileNotFoundError: an installed package lacks one of the files.

    Example:
        >>> [it.id for it in embedded_source("natural").items][:2]
        ['skimage/astronaut.png', 'skimage/brick.png']
    """
    if name not in EMBEDDED_SOURCES:
        raise KeyError(f"unknown embedded source {name!r}; valid: {', '.join(EMBEDDED_SOURCES)}")
    entries = EMBEDDED_SOURCES[name]
    dirs = {e.package: _package_dir(e.package, name) for e in entries}
    items = []
    for e in entries:
        path = dirs[e.package] / e.path
        if not path.is_file():
            raise FileNotFoundError(
                f"embedded:{name}: {path} is missing from the installed {_PIP_NAMES[e.package]}; "
                f"reinstall it (pip install --force-reinstall {_PIP_NAMES[e.package]})"
            )
        item_id = f"{e.package}/{Path(e.path).name}"
        reader = _ARRAY_READERS.get((e.package, e.path))
        if reader is not None:
            items.append(Item(id=item_id, array=reader(path)))
        else:
            items.append(Item(id=item_id, path=path))
    packages = ", ".join(dict.fromkeys(_PIP_NAMES[e.package] for e in entries))
    return Source(
        spec=f"embedded:{name}",
        kind="embedded",
        items=tuple(items),
        description=f"{len(items)} {name} sample images bundled with {packages}",
    )
