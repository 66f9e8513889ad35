"""featsim.data.transforms: torchvision geometry, antialiased float resampling, the cache key."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from featsim.backbones.preprocessing import TORCHVISION_IMAGENET, Preprocessing
from featsim.data.decode import MODE_RULE, decode_file
from featsim.data.transforms import (
    NORMALIZATIONS,
    RESIZE_RULE,
    Transform,
    center_crop_offsets,
    resized_shape,
)

RNG = np.random.default_rng(0)
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# Odd sizes, portrait, landscape, square, one-pixel-high and one-pixel-wide images.
SHAPES = [
    (300, 400),
    (400, 300),
    (257, 259),
    (333, 221),
    (1, 7),
    (7, 1),
    (1, 1),
    (2, 513),
    (31, 17),
]


def _transform(size=224, resize=256, crop="center", interpolation="bilinear", **kwargs):
    pre = Preprocessing(
        input_size=size,
        resize_size=resize if crop == "center" else size,
        crop=crop,
        interpolation=interpolation,
    )
    return Transform.for_backbone(pre, **kwargs)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        # Expected values follow torchvision's _compute_resized_output_size: the long side is
        # int(size * long / short), truncated.
        (300, 400, 256, (256, 341)),  # 341.33
        (400, 300, 256, (341, 256)),
        (480, 640, 224, (224, 298)),  # 298.67: truncated, not rounded
        (333, 221, 256, (385, 256)),  # 385.74
        (224, 224, 256, (256, 256)),
        (1, 7, 256, (256, 1792)),
        (7, 1, 256, (1792, 256)),
        (3, 1000, 256, (256, 85333)),
        (256, 256, 256, (256, 256)),
    ],
)
def test_resized_shape_matches_torchvision(height, width, size, expected):
    assert resized_shape(height, width, size) == expected


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        # torchvision's center_crop: int(round((h - th) / 2.0)), Python's round (halves to even).
        (341, 256, (58, 16)),  # 58.5 -> 58
        (259, 257, (18, 16)),  # 17.5 -> 18 (not floor), 16.5 -> 16 (not half-up)
        (256, 1792, (16, 784)),
        (224, 224, (0, 0)),
        (225, 226, (0, 1)),  # 0.5 -> 0, 1.0 -> 1
    ],
)
def test_center_crop_offsets_match_torchvision(height, width, expected):
    assert center_crop_offsets(height, width, 224) == expected


# --------------------------------------------------------------------------- resampling


def _filter(kind, x):
    x = np.abs(x)
    if kind == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Pillow's bicubic (Keys, a = -0.5)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


def _weights(n_in, n_out, kind):
    """float64 [n_out, n_in] antialiased resampling matrix (pixel centres at i + 0.5)."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)  # downscaling widens the kernel: antialiasing
    support = (1.0 if kind == "bilinear" else 2.0) * stretch
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        taps = _filter(kind, (np.arange(lo, hi) - center + 0.5) / stretch)
        w[i, lo:hi] = taps / taps.sum()
    return w


def _reference(rgb, size, resize, crop, kind):
    """Independent float64 resize + crop: separable convolution with explicit matrices."""
    h, w = rgb.shape[:2]
    if crop == "center":
        new_h, new_w = resized_shape(h, w, resize)
        top, left = center_crop_offsets(new_h, new_w, size)
    else:
        (new_h, new_w), (top, left) = (size, size), (0, 0)
    wy, wx = _weights(h, new_h, kind), _weights(w, new_w, kind)
    out = np.einsum("ij,jkc,lk->ilc", wy, rgb.astype(np.float64), wx)
    return np.clip(out[top : top + size, left : left + size], 0.0, 255.0)


@pytest.mark.parametrize("kind", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    ("shape", "size", "resize", "crop"),
    [
        ((300, 400), 32, 40, "center"),  # downscale
        ((23, 17), 32, 40, "center"),  # upscale
        ((57, 20), 16, 16, "none"),  # down in y, up in x
        ((1, 9), 8, 11, "center"),  # one pixel high
        ((40, 40), 32, 40, "center"),  # already at the resize size: not resampled
    ],
)
def test_float_resize_matches_float64_reference(kind, shape, size, resize, crop):
    rgb = RNG.uniform(0, 255, (*shape, 3)).astype(np.float32)
    got = _transform(size, resize, crop, kind).resize_and_crop(rgb)
    # float32 storage of the intermediate and output: ~1e-5 relative.
    np.testing.assert_allclose(got, _reference(rgb, size, resize, crop, kind), atol=2e-3)


def _pil_uint8_path(rgb_u8, size, resize, crop, kind):
    """torchvision's PIL path: Resize + CenterCrop on a uint8 PIL image."""
    image = Image.fromarray(rgb_u8)
    h, w = rgb_u8.shape[:2]
    if crop == "center":
        new_h, new_w = resized_shape(h, w, resize)
        top, left = center_crop_offsets(new_h, new_w, size)
    else:
        (new_h, new_w), (top, left) = (size, size), (0, 0)
    image = image.resize((new_w, new_h), RESAMPLE[kind])
    return np.asarray(image.crop((left, top, left + size, top + size)), np.float32)


# uint8 paths round the intermediate image and the result: <= 0.5 + 0.5 with convex weights
# (bilinear); bicubic's weights sum to at most 1.25 in absolute value, so 0.5 * 1.25 + 0.5.
UINT8_TOLERANCE = {"nearest": 0.0, "bilinear": 1.0 + 1e-3, "bicubic": 1.125 + 1e-3}


@pytest.mark.parametrize("kind", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("crop", ["center", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float_path_differs_from_uint8_pil_path_by_rounding_only(kind, crop, shape):
    # Bicubic on mid-range pixels: its overshoot then never reaches the uint8 clip (see the
    # module docstring for saturated edges).
    lo, hi = (64, 193) if kind == "bicubic" else (0, 256)
    rgb = RNG.integers(lo, hi, (*shape, 3), dtype=np.uint8)
    size, resize = (24, 28) if max(shape) < 100 else (224, 256)
    got = _transform(size, resize, crop, kind).resize_and_crop(rgb)
    expected = _pil_uint8_path(rgb, size, resize, crop, kind)
    assert got.shape == expected.shape == (size, size, 3)
    assert np.abs(got - expected).max() <= UINT8_TOLERANCE[kind]


def test_matches_torchvision_when_installed():
    try:
        from torchvision import transforms as T
    except Exception as exc:  # absent, or a build that does not match the installed torch
        pytest.skip(f"torchvision not usable: {exc}")
    for shape in SHAPES:
        rgb = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
        reference = T.Compose([T.Resize(256), T.CenterCrop(224)])(Image.fromarray(rgb))
        got = Transform.for_backbone(TORCHVISION_IMAGENET).resize_and_crop(rgb)
        assert np.abs(got - np.asarray(reference, np.float32)).max() <= 1.0 + 1e-3


def test_gray_shortcut_equals_the_per_channel_path():
    gray = RNG.uniform(0, 255, (61, 47)).astype(np.float32)
    colour = np.stack([gray, gray[::-1, ::-1], gray * 0.5], -1)
    t = _transform(32, 40, interpolation="bicubic")
    out_gray = t.resize_and_crop(np.repeat(gray[..., None], 3, axis=-1))
    out_colour = t.resize_and_crop(colour)
    np.testing.assert_array_equal(out_gray[..., 0], out_colour[..., 0])
    np.testing.assert_array_equal(out_gray[..., 0], out_gray[..., 2])


def test_image_at_resize_size_is_only_cropped():
    rgb = RNG.uniform(0, 255, (256, 259, 3)).astype(np.float32)  # short side already 256
    out = Transform.for_backbone(TORCHVISION_IMAGENET).resize_and_crop(rgb)
    np.testing.assert_array_equal(out, rgb[16:240, 18:242])  # 17.5 -> 18


def test_output_dtype_layout_and_input_untouched():
    rgb = RNG.uniform(0, 255, (300, 200, 3))  # float64 input is accepted
    before = rgb.copy()
    t = Transform.for_backbone(TORCHVISION_IMAGENET)
    for out in (t(rgb), t.resize_and_crop(rgb), t(rgb.astype(np.uint8))):
        assert out.dtype == np.float32 and out.shape == (224, 224, 3)
        assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(rgb, before)
    assert t.input_size == 224


# --------------------------------------------------------------------------- normalisation


def test_backbone_normalization_is_the_preprocessing_scaling():
    rgb = RNG.uniform(0, 255, (50, 70, 3)).astype(np.float32)
    for scaling in ("imagenet", "[0,1]", "[-1,1]", "tf_lite"):
        pre = dataclasses.replace(TORCHVISION_IMAGENET, scaling=scaling)
        t = Transform.for_backbone(pre)
        expected = pre.normalize(t.resize_and_crop(rgb))
        np.testing.assert_allclose(t(rgb), expected, rtol=1e-6, atol=1e-6)


def test_paper_normalization_is_mean_half_std_half():
    rgb = RNG.uniform(0, 255, (50, 70, 3)).astype(np.float32)
    t = Transform.for_backbone(TORCHVISION_IMAGENET, normalization="paper")
    pixels = t.resize_and_crop(rgb).astype(np.float64)
    np.testing.assert_allclose(t(rgb), (pixels / 255.0 - 0.5) / 0.5, atol=1e-6)


# --------------------------------------------------------------------------- the cache key


def test_to_dict_is_json_and_holds_every_field():
    t = Transform.for_backbone(
        Preprocessing(224, 256, scaling="mean_std", mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    )
    d = t.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["mode_rule"] == MODE_RULE and d["resize_rule"] == RESIZE_RULE
    assert d["normalization"] == "backbone"
    assert set(d) == {f.name for f in dataclasses.fields(Transform)}
    assert set(d["preprocessing"]) == {f.name for f in dataclasses.fields(Preprocessing)}
    assert d["preprocessing"]["mean"] == [0.5, 0.4, 0.3]


def test_fingerprint_is_sha256_of_canonical_json_and_tracks_every_field():
    t = Transform.for_backbone(TORCHVISION_IMAGENET)
    canonical = json.dumps(t.to_dict(), sort_keys=True, separators=(",", ":"))
    assert t.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    assert t.fingerprint() == Transform.for_backbone(Preprocessing(224, 256)).fingerprint()
    assert t == Transform.for_backbone(Preprocessing(224, 256)) and hash(t) == hash(
        Transform.for_backbone(Preprocessing(224, 256))
    )
    variants = [
        Transform.for_backbone(TORCHVISION_IMAGENET, normalization="paper"),
        Transform.for_backbone(dataclasses.replace(TORCHVISION_IMAGENET, interpolation="bicubic")),
        Transform.for_backbone(dataclasses.replace(TORCHVISION_IMAGENET, resize_size=232)),
        Transform.for_backbone(dataclasses.replace(TORCHVISION_IMAGENET, scaling="[0,1]")),
        Transform.for_backbone(Preprocessing(224, 224, crop="none")),
    ]
    prints = {v.fingerprint() for v in variants} | {t.fingerprint()}
    assert len(prints) == len(variants) + 1


# --------------------------------------------------------------------------- validation


def test_constructor_validation():
    with pytest.raises(ValueError, match="normalization must be one of"):
        Transform.for_backbone(TORCHVISION_IMAGENET, normalization="imagenet")
    assert NORMALIZATIONS == ("backbone", "paper")
    with pytest.raises(ValueError, match="mode_rule"):
        Transform(TORCHVISION_IMAGENET, mode_rule="featsim-rgb-v0")
    with pytest.raises(ValueError, match="resize_rule"):
        Transform(TORCHVISION_IMAGENET, resize_rule="other")
    with pytest.raises(ValueError, match="antialias=False"):
        Transform.for_backbone(dataclasses.replace(TORCHVISION_IMAGENET, antialias=False))
    with pytest.raises(TypeError, match="Preprocessing"):
        Transform.for_backbone({"input_size": 224})
    # nearest has no antialiasing to switch off
    Transform.for_backbone(
        dataclasses.replace(TORCHVISION_IMAGENET, interpolation="nearest", antialias=False)
    )


@pytest.mark.parametrize(
    ("rgb", "match"),
    [
        (np.zeros((5, 6)), r"\[H, W, 3\], got \(5, 6\)"),
        (np.zeros((5, 6, 4)), r"got \(5, 6, 4\)"),
        (np.zeros((0, 6, 3)), r"got \(0, 6, 3\)"),
        (np.zeros((5, 6, 3), np.int64), r"int64 \(shape \(5, 6, 3\)\)"),
        (np.full((5, 6, 3), 256.0), r"\[256.0, 256.0\] \(shape \(5, 6, 3\)\)"),
        (np.full((5, 6, 3), np.nan), r"finite.*\(shape \(5, 6, 3\)\)"),
    ],
)
def test_bad_input_names_the_shape(rgb, match):
    with pytest.raises(ValueError, match=match):
        Transform.for_backbone(TORCHVISION_IMAGENET)(rgb)


# --------------------------------------------------------------------------- real data


def test_kermany_images_through_decode_and_transform(shared_data):
    folder = shared_data / "chest_xray_kermany_224" / "chest_xray" / "test"
    files = sorted(folder.rglob("*.jpeg"))[:16]
    assert files
    t = Transform.for_backbone(TORCHVISION_IMAGENET)
    for path in files:
        x = t(decode_file(path))
        assert x.shape == (224, 224, 3) and x.dtype == np.float32
        assert np.isfinite(x).all()
        assert -2.2 < x.min() and x.max() < 2.7  # ImageNet-normalised range
