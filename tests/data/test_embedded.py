"""embedded_source: fixed lists of real images inside installed wheels."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from featsim.data import embedded
from featsim.data.embedded import EMBEDDED_SOURCES, embedded_source
from featsim.data.sources import IMAGE_EXTENSIONS, open_source

_MISSING = [p for p in ("skimage", "pydicom") if importlib.util.find_spec(p) is None]
needs_packages = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"embedded sources need {', '.join(_MISSING)}: pip install scikit-image pydicom",
)


def test_lists_are_fixed_and_distinct():
    assert set(EMBEDDED_SOURCES) == {"natural", "medical"}
    assert len(EMBEDDED_SOURCES["natural"]) == 12
    assert len(EMBEDDED_SOURCES["medical"]) == 9
    paths = [(e.package, e.path) for entries in EMBEDDED_SOURCES.values() for e in entries]
    assert len(set(paths)) == len(paths)
    assert all(e.description for entries in EMBEDDED_SOURCES.values() for e in entries)


@needs_packages
@pytest.mark.parametrize("name", ["natural", "medical"])
def test_embedded_source(name):
    src = open_source(f"embedded:{name}")
    assert src.kind == "embedded" and src.spec == f"embedded:{name}"
    assert len(src) == len(EMBEDDED_SOURCES[name])
    assert src.labels is None and src.class_names == ()
    ids = [it.id for it in src.items]
    assert ids == [f"{e.package}/{e.path.rsplit('/', 1)[1]}" for e in EMBEDDED_SOURCES[name]]
    for it in src.items:
        if it.path is not None:
            assert it.path.is_file() and it.path.suffix.lower() in IMAGE_EXTENSIONS
    # distinct content: no image is a re-encoding listed twice
    assert len({it.content_hash() for it in src.items}) == len(src)
    assert [it.id for it in embedded_source(name).items] == ids  # deterministic


@needs_packages
def test_natural_images_open_with_pillow():
    from PIL import Image

    for it in embedded_source("natural").items:
        with Image.open(it.path) as im:
            assert min(im.size) >= 256, it.id


@needs_packages
def test_medical_dicoms_are_uncompressed_single_frame_and_medical():
    import pydicom

    modalities = []
    for it in embedded_source("medical").items:
        if it.path is None or it.path.suffix != ".dcm":
            continue
        ds = pydicom.dcmread(it.path)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed, it.id
        assert int(ds.get("NumberOfFrames", 1)) == 1, it.id
        assert ds.pixel_array.ndim in (2, 3), it.id
        modalities.append(ds.Modality)
    assert modalities == ["CT", "MR", "MR", "US"]


@needs_packages
def test_matplotlib_mri_array():
    (mri,) = [it for it in embedded_source("medical").items if it.path is None]
    assert mri.id == "matplotlib/s1045.ima.gz"
    assert mri.array.shape == (256, 256) and mri.array.dtype == np.dtype("<u2")
    # matplotlib's demo reads native uint16; the pixels are 8-bit values in the high byte
    assert mri.array.max() == 55040 and np.all(mri.array % 256 == 0)
    assert (mri.array > 0).mean() > 0.3  # a head, not an empty frame


def test_unknown_name():
    with pytest.raises(KeyError, match="valid: natural, medical"):
        embedded_source("xray")


def test_missing_package_is_an_import_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pydicom" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"needs the package pydicom.*pip install scikit-image"):
        embedded_source("medical")
