"""featsim.data.decode: every mode of the mode rule, error paths, DICOM and the real data."""

import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from featsim.data.decode import (
    MODE_RULE,
    MODE_RULES,
    ImageDecodeError,
    decode_bytes,
    decode_file,
    load_rgb,
    to_rgb,
)
from featsim.data.items import Item

try:  # a core dependency; only the DICOM tests need it
    import pydicom
    from pydicom.data import get_testdata_file
except ImportError:
    pydicom = None
needs_pydicom = pytest.mark.skipif(pydicom is None, reason="pydicom is not installed")

RNG = np.random.default_rng(0)


def _save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _check_rgb(x, shape=None):
    assert x.dtype == np.float32
    assert x.ndim == 3 and x.shape[2] == 3
    assert x.flags.c_contiguous
    assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 255.0
    if shape is not None:
        assert x.shape == (*shape, 3)


def test_mode_rule_is_named_and_recordable():
    assert MODE_RULE == "featsim-rgb-v1"
    table = dict(MODE_RULES)
    assert json.loads(json.dumps(table)) == table
    for key in ("L", "P", "LA PA RGBA", "DICOM gray", "array dtype"):
        assert key in table


# --------------------------------------------------------------------------- Pillow modes


def test_gray_l_is_replicated(tmp_path):
    gray = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    out = decode_file(_save(tmp_path, "g.png", Image.fromarray(gray)))
    _check_rgb(out, (5, 7))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1).astype(np.float32))


def test_bilevel_is_0_or_255(tmp_path):
    bits = RNG.integers(0, 2, (4, 9)).astype(bool)
    out = decode_file(_save(tmp_path, "b.png", Image.fromarray(bits)))
    np.testing.assert_array_equal(out[..., 0], np.where(bits, 255.0, 0.0))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize(
    ("fmt", "dtype"), [("png", "<u2"), ("tiff", "<u2"), ("tiff", ">u2"), ("png", ">u2")]
)
def test_16_bit_gray_keeps_full_precision(tmp_path, fmt, dtype):
    values = np.array([[0, 1000, 65535], [3, 40000, 257]], dtype)
    path = _save(tmp_path, f"x.{fmt}", Image.fromarray(values))
    with Image.open(path) as image:  # what Pillow 13 gives: a 16-bit mode, not 8-bit L
        assert image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I")
    out = decode_file(path)
    _check_rgb(out, (2, 3))
    expected = values.astype(np.float64) * 255.0 / 65535.0
    np.testing.assert_allclose(out[..., 0], expected, rtol=1e-6)
    assert out[0, 1, 0] == pytest.approx(1000 * 255 / 65535, rel=1e-6)  # not 3 (>> 8), not 255
    np.testing.assert_array_equal(out[..., 0], out[..., 1])


def test_32_bit_int_within_16_bit_range_is_16_bit(tmp_path):
    values = np.array([[0, 1000], [65535, 7]], np.int32)
    out = decode_file(_save(tmp_path, "i.tiff", Image.fromarray(values)))
    np.testing.assert_allclose(out[..., 0], values * 255.0 / 65535.0, rtol=1e-6)


def test_32_bit_int_beyond_16_bit_is_min_max(tmp_path):
    values = np.array([[-5, 0], [100000, 49997]], np.int32)
    out = decode_file(_save(tmp_path, "i.tiff", Image.fromarray(values)))
    expected = (values + 5.0) / 100005.0 * 255.0
    np.testing.assert_allclose(out[..., 0], expected, rtol=1e-6, atol=1e-4)


def test_float_gray_is_min_max_and_constant_is_black(tmp_path):
    values = np.array([[0.25, 0.5], [1.25, 0.75]], np.float32)
    out = decode_file(_save(tmp_path, "f.tiff", Image.fromarray(values)))
    np.testing.assert_allclose(out[..., 0], [[0, 63.75], [255, 127.5]], atol=1e-4)
    flat = decode_file(_save(tmp_path, "c.tiff", Image.fromarray(np.full((2, 2), 3.0, np.float32))))
    np.testing.assert_array_equal(flat, 0.0)


def test_non_finite_float_image_names_the_file(tmp_path):
    path = _save(tmp_path, "nan.tiff", Image.fromarray(np.array([[1.0, np.nan]], np.float32)))
    with pytest.raises(ImageDecodeError, match=r"nan\.tiff.*non-finite"):
        decode_file(path)


def test_palette_without_transparency_goes_through_the_palette(tmp_path):
    rgb = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).quantize(colors=8)
    out = decode_file(_save(tmp_path, "p.png", image))
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB"), np.float32))


def test_palette_transparency_is_composited_onto_black(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([200, 100, 50, 10, 20, 30] + [0] * 762)
    image.putdata([0, 1, 0])
    out = decode_file(_save(tmp_path, "t.png", image, transparency=1))
    np.testing.assert_array_equal(out[0], [[200, 100, 50], [0, 0, 0], [200, 100, 50]])


def test_alpha_is_composited_onto_black(tmp_path):
    rgba = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    out = decode_file(_save(tmp_path, "a.png", Image.fromarray(rgba)))
    expected = rgba[..., :3].astype(np.float64) * rgba[..., 3:] / 255.0
    np.testing.assert_allclose(out, expected, rtol=1e-6)

    la = RNG.integers(0, 256, (4, 6, 2), dtype=np.uint8)
    out = decode_file(_save(tmp_path, "la.png", Image.fromarray(la, mode="LA")))
    np.testing.assert_allclose(out[..., 1], la[..., 0] * (la[..., 1] / 255.0), rtol=1e-6)


def test_fully_opaque_rgba_is_unchanged(tmp_path):
    rgba = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    out = decode_file(_save(tmp_path, "o.png", Image.fromarray(rgba)))
    np.testing.assert_array_equal(out, rgba[..., :3].astype(np.float32))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_png_colour_key_transparency_becomes_black(tmp_path, mode):
    image = Image.new(mode, (2, 1), 77 if mode == "L" else (77, 77, 77))
    image.putpixel((1, 0), 9 if mode == "L" else (9, 8, 7))
    key = 77 if mode == "L" else (77, 77, 77)
    out = decode_file(_save(tmp_path, "k.png", image, transparency=key))
    np.testing.assert_array_equal(out[0, 0], 0.0)
    assert out[0, 1, 0] == 9.0


def test_rgb_is_as_is(tmp_path):
    rgb = RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    out = decode_file(_save(tmp_path, "rgb.png", Image.fromarray(rgb)))
    np.testing.assert_array_equal(out, rgb.astype(np.float32))


def test_cmyk_and_ycbcr_use_pillow_convert(tmp_path):
    rgb = Image.fromarray(RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    cmyk = rgb.convert("CMYK")
    out = decode_file(_save(tmp_path, "c.tiff", cmyk))
    np.testing.assert_array_equal(out, np.asarray(cmyk.convert("RGB"), np.float32))
    ycbcr = rgb.convert("YCbCr")
    np.testing.assert_array_equal(to_rgb(ycbcr), np.asarray(ycbcr.convert("RGB"), np.float32))


def test_unsupported_mode_is_an_error():
    with pytest.raises(ImageDecodeError, match="unsupported image mode 'HSV'"):
        to_rgb(Image.new("HSV", (2, 2)), name="hsv.tif")


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("L", (4, 3), v) for v in (10, 200, 90)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as image:
        assert image.n_frames == 3
    out = decode_file(path)
    _check_rgb(out, (3, 4))
    np.testing.assert_array_equal(out, 10.0)


def test_multi_page_tiff_is_an_error_naming_file_and_frames(tmp_path):
    pages = [Image.new("L", (4, 3), v) for v in (10, 200)]
    path = tmp_path / "stack.tiff"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.raises(ImageDecodeError, match=r"stack\.tiff.*2 frames"):
        decode_file(path)


def test_exif_orientation_is_not_applied(tmp_path):
    image = Image.fromarray(RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, "rot.png", image, exif=exif)
    with Image.open(path) as reopened:
        assert reopened.getexif()[0x0112] == 6
    np.testing.assert_array_equal(decode_file(path), np.asarray(image, np.float32))


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_file_names_the_file(tmp_path, fmt):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # featsim never turns it on
    image = Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    path = tmp_path / f"cut 50%.{fmt}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match=r"cut 50%") as info:
        decode_file(path)
    assert info.value.name == str(path)


@pytest.mark.parametrize(
    "content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40]
)
def test_corrupt_or_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=r"bad\.png"):
        decode_file(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_file(tmp_path / "nope.png")


def test_content_is_sniffed_not_the_extension(tmp_path):
    rgb = RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    path = _save(tmp_path, "really_a_png.jpg", Image.fromarray(rgb), format="PNG")
    np.testing.assert_array_equal(decode_file(path), rgb.astype(np.float32))


def test_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageDecodeError("a/b.png", "truncated")))
    assert isinstance(error, ValueError)
    assert (error.name, error.cause) == ("a/b.png", "truncated")
    assert str(error) == "cannot decode a/b.png: truncated"


def test_zero_size_image_is_an_error():
    with pytest.raises(ImageDecodeError, match="empty image of size 0x3"):
        to_rgb(Image.new("L", (0, 3)), name="z.png")


# --------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 1)])
def test_gray_array_is_replicated(shape):
    gray = RNG.integers(0, 256, shape, dtype=np.uint8)
    out = to_rgb(gray)
    _check_rgb(out, (4, 5))
    np.testing.assert_array_equal(out, np.broadcast_to(gray.reshape(4, 5, 1), (4, 5, 3)))


def test_array_dtypes_and_alpha():
    rgb16 = RNG.integers(0, 65536, (3, 2, 3), dtype=np.uint16)
    np.testing.assert_allclose(to_rgb(rgb16), rgb16 * 255.0 / 65535.0, rtol=1e-6)
    unit = RNG.random((3, 2, 3))
    np.testing.assert_allclose(to_rgb(unit), unit * 255.0, rtol=1e-6)
    np.testing.assert_allclose(to_rgb(unit.astype(np.float32)), unit * 255.0, rtol=1e-6)
    rgba = RNG.integers(0, 256, (3, 2, 4), dtype=np.uint8)
    np.testing.assert_allclose(to_rgb(rgba), rgba[..., :3] * (rgba[..., 3:] / 255.0), rtol=1e-6)
    rgba16 = RNG.integers(0, 65536, (3, 2, 4), dtype=np.uint16)
    expected = rgba16[..., :3] * 255.0 / 65535.0 * (rgba16[..., 3:] / 65535.0)
    np.testing.assert_allclose(to_rgb(rgba16), expected, rtol=1e-5)
    gray_alpha = np.array([[[100, 255], [100, 0]]], np.uint8)
    np.testing.assert_array_equal(to_rgb(gray_alpha)[0, :, 0], [100.0, 0.0])


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((2, 2), np.int32), r"shape \(2, 2\), int32"),
        (np.zeros((2, 2), bool), "bool"),
        (np.full((2, 2), 1.5), r"\[0, 1\]"),
        (np.array([[0.5, np.nan]]), "finite"),
        (np.zeros((2, 2, 5), np.uint8), r"\(2, 2, 5\)"),
        (np.zeros((0, 3), np.uint8), r"shape \(0, 3\), uint8"),
        (np.zeros((1, 2, 2, 3), np.uint8), r"\(1, 2, 2, 3\)"),
    ],
)
def test_bad_arrays_name_the_item_and_shape(array, match):
    with pytest.raises(ImageDecodeError, match="array train/3.*" + match):
        load_rgb(Item("train/3", array=array))


def test_load_rgb_reads_files_and_arrays(tmp_path):
    gray = RNG.integers(0, 256, (3, 4), dtype=np.uint8)
    path = _save(tmp_path, "g.png", Image.fromarray(gray))
    np.testing.assert_array_equal(load_rgb(Item("g", path=path)), load_rgb(Item("g", array=gray)))


# --------------------------------------------------------------------------- DICOM


def _dicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@needs_pydicom
def test_dicom_without_window_is_min_max_of_the_modality_output():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (hu - hu.min()) / (hu.max() - hu.min()) * 255.0
    out = decode_file(path)
    _check_rgb(out, ds.pixel_array.shape)
    np.testing.assert_allclose(out[..., 0], expected, atol=1e-3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def _linear_window(x, center, width):
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR), mapped to [0, 1].
    c, w = center - 0.5, width - 1.0
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


@needs_pydicom
def test_dicom_window_follows_the_standard():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    expected = 255.0 * _linear_window(
        ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth)
    )
    np.testing.assert_allclose(decode_file(path)[..., 0], expected, atol=1e-3)


@needs_pydicom
def test_dicom_monochrome1_is_inverted():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    normal = decode_bytes(_dicom_bytes(ds), name="m2.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = decode_bytes(_dicom_bytes(ds), name="m1.dcm")
    np.testing.assert_allclose(inverted, 255.0 - normal, atol=1e-3)


@needs_pydicom
def test_dicom_voi_lut_is_preferred_to_the_window():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [2048, 0, 16])  # entries, first mapped value, bits
    lut.add_new("LUTData", "US", [32 * i for i in range(2048)])
    ds.VOILUTSequence = Sequence([lut])
    ds.WindowCenter, ds.WindowWidth = 40, 400  # ignored: the LUT wins
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    index = np.clip(np.rint(hu), 0, 2047).astype(int)
    expected = 32.0 * index / 65535.0 * 255.0
    out = decode_bytes(_dicom_bytes(ds), name="lut.dcm")
    np.testing.assert_allclose(out[..., 0], expected, atol=1e-3)


@needs_pydicom
def test_dicom_colour():
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_small_odd.dcm"))
    np.testing.assert_array_equal(
        decode_file(get_testdata_file("SC_rgb_small_odd.dcm")), ds.pixel_array.astype(np.float32)
    )
    # YBR_FULL_422 is converted to RGB by pydicom: the same picture as the RGB file.
    ybr = decode_file(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    rgb = decode_file(get_testdata_file("SC_rgb_rle.dcm"))
    assert np.abs(ybr - rgb).mean() < 3.0
    ds16 = pydicom.dcmread(get_testdata_file("SC_rgb_rle_16bit.dcm"))
    out16 = decode_file(get_testdata_file("SC_rgb_rle_16bit.dcm"))
    np.testing.assert_allclose(out16, ds16.pixel_array * 255.0 / 65535.0, rtol=1e-6)


@needs_pydicom
def test_dicom_palette_colour():
    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    rgb = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)
    expected = rgb * (255.0 / np.iinfo(rgb.dtype).max)
    out = decode_file(path)
    _check_rgb(out, ds.pixel_array.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@needs_pydicom
def test_multi_frame_dicom_names_the_file_and_frames():
    with pytest.raises(ImageDecodeError, match=r"rtdose\.dcm.*15 frames"):
        decode_file(get_testdata_file("rtdose.dcm"))


@needs_pydicom
@pytest.mark.parametrize(
    ("name", "match"),
    [("MR_truncated.dcm", "less than expected"), ("rtplan.dcm", "without pixel data")],
)
def test_bad_dicom_names_the_file(name, match):
    with pytest.raises(ImageDecodeError, match=name + ".*" + match):
        decode_file(get_testdata_file(name))


@needs_pydicom
def test_dicom_detected_by_preamble_or_suffix(tmp_path):
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    assert data[128:132] == b"DICM"
    reference = decode_bytes(data, name="x.dcm")
    # The preamble wins over a misleading extension.
    disguised = tmp_path / "scan.png"
    disguised.write_bytes(data)
    np.testing.assert_array_equal(decode_file(disguised), reference)
    # Without the preamble only the .dcm suffix says DICOM.
    bare = data[132:]
    np.testing.assert_array_equal(decode_bytes(bare, name="bare.DCM"), reference)
    with pytest.raises(ImageDecodeError, match=r"bare\.bin"):
        decode_bytes(bare, name="bare.bin")


@needs_pydicom
def test_missing_pydicom_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match="pip install pydicom"):
        decode_file(get_testdata_file("CT_small.dcm"))


# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "folder", ["covid_ct_ucsd_100", "chest_xray_kermany_native_20", "brain_mri_253"]
)
def test_real_medical_images_decode(shared_data, folder):
    files = [
        p
        for p in sorted((shared_data / folder).rglob("*"))
        if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg")
    ]
    assert len(files) >= 20
    modes = set()
    for path in files:
        out = decode_file(path)
        _check_rgb(out)
        with Image.open(path) as image:
            modes.add(image.mode)
            assert out.shape[:2] == (image.height, image.width)
            if image.mode == "L":
                np.testing.assert_array_equal(out, np.repeat(out[..., :1], 3, axis=-1))
    assert modes & {"L", "RGB"}


def test_brain_mri_png_named_jpg(shared_data):
    files = sorted((shared_data / "brain_mri_253").rglob("*.jpg"))
    disguised = [p for p in files if p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"]
    assert disguised
    for path in disguised:
        _check_rgb(decode_file(path))


@needs_pydicom
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicom_bundled_files_decode(name):
    _check_rgb(decode_file(get_testdata_file(name)))
