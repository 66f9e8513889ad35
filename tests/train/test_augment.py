"""On-device augmentation (Gu & Lee 2024, section 5.7) against float64 numpy references."""

import colorsys
import dataclasses
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featsim.backbones import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from featsim.train.augment import (
    LUMA_WEIGHTS,
    PAPER_NORMALIZATION,
    AugmentConfig,
    AugmentParams,
    apply_params,
    augment_batch,
    normalization_from_mean_std,
    normalize,
    sample_params,
)

AUG = jax.jit(augment_batch, static_argnames=("config", "output_size"))
APPLY = jax.jit(apply_params, static_argnames=("config", "output_size"))

# Every random transform off: full-image crop, no flip, no rotation, no colour, no grayscale.
OFF = AugmentConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    hflip_prob=0.0,
    rotation_degrees=(0.0, 0.0),
    grayscale_prob=0.0,
)


def _images(n=3, h=16, w=16, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, h, w, 3)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _batch_params(key, config, n, image_size):
    # augment_batch's contract: one key per example from jax.random.split(key, n).
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: sample_params(k, config, image_size=image_size))(keys)


def _params(
    h,
    w,
    *,
    top=0,
    left=0,
    height=None,
    width=None,
    flip=False,
    angle=0.0,
    brightness=1.0,
    contrast=1.0,
    saturation=1.0,
    hue=0.0,
    order=(),
    grayscale=False,
):
    return AugmentParams(
        top=jnp.int32(top),
        left=jnp.int32(left),
        height=jnp.int32(height or h),
        width=jnp.int32(width or w),
        flip=jnp.bool_(flip),
        angle=jnp.float32(angle),
        brightness=jnp.float32(brightness),
        contrast=jnp.float32(contrast),
        saturation=jnp.float32(saturation),
        hue=jnp.float32(hue),
        order=jnp.asarray(order, jnp.int32),
        grayscale=jnp.bool_(grayscale),
    )


def _gray64(x):
    return x[..., 0] * LUMA_WEIGHTS[0] + x[..., 1] * LUMA_WEIGHTS[1] + x[..., 2] * LUMA_WEIGHTS[2]


# --- config ----------------------------------------------------------------------------------


def test_config_defaults_follow_paper_and_torchvision():
    c = AugmentConfig()
    assert c.enabled
    assert c.crop_scale == (0.08, 1.0) and c.crop_ratio == (3 / 4, 4 / 3)  # torchvision
    assert c.crop_attempts == 10 and c.hflip_prob == 0.5 and c.fill == 0.0  # torchvision
    assert c.grayscale_prob == 1.0  # paper 5.7: "transformed the images to grayscale"
    assert c.colour_ops() == ("brightness", "contrast", "saturation")
    assert PAPER_NORMALIZATION == ((2 / 255,) * 3, (-1.0,) * 3)


def test_config_json_round_trip_and_hashable():
    c = AugmentConfig(brightness=0.3, rotation_degrees=(-5, 15), hue=0.1)
    back = AugmentConfig(**json.loads(json.dumps(dataclasses.asdict(c))))
    assert back == c and hash(back) == hash(c)
    assert isinstance(back.crop_scale, tuple) and isinstance(back.rotation_degrees, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hue = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop_scale": (0.9, 0.1)}, "crop_scale"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"crop_ratio": 1.0}, "crop_ratio"),
        ({"crop_attempts": 0}, "crop_attempts"),
        ({"brightness": -0.1}, "brightness"),
        ({"hue": 0.6}, "hue"),
        ({"hflip_prob": 1.5}, "hflip_prob"),
        ({"grayscale_prob": -0.1}, "grayscale_prob"),
        ({"rotation_degrees": (10, -10)}, "rotation_degrees"),
        ({"fill": 300}, "fill"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)


@pytest.mark.parametrize(
    ("shape", "size", "match"),
    [
        ((16, 16, 3), 16, r"\[N, H, W, 3\]"),
        ((2, 16, 16, 1), 16, r"\[N, H, W, 3\]"),
        ((2, 16, 16, 3), 0, "output_size"),
        ((2, 16, 16, 3), 16.0, "output_size"),
    ],
)
def test_augment_batch_rejects_bad_input(shape, size, match):
    with pytest.raises(ValueError, match=match):
        augment_batch(
            jax.random.key(0), np.zeros(shape, np.float32), AugmentConfig(), output_size=size
        )


# --- whole pipeline --------------------------------------------------------------------------


@pytest.mark.parametrize(("in_size", "out_size", "hue"), [(20, 12, 0.2), (12, 24, 0.0)])
def test_shape_dtype_range_under_jit(in_size, out_size, hue):
    x = _images(4, in_size, in_size)
    x[0] = 255.0  # saturated and black images stay in range after brightness > 1 etc.
    x[1] = 0.0
    out = AUG(jax.random.key(1), x, AugmentConfig(hue=hue), output_size=out_size)
    assert out.shape == (4, out_size, out_size, 3) and out.dtype == jnp.float32
    out = np.asarray(out)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 255.0


def test_accepts_rectangular_input_and_uint8():
    x = _images(2, 12, 20).astype(np.uint8)
    out = AUG(jax.random.key(0), x, AugmentConfig(), output_size=16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32


def test_deterministic_for_a_key_and_different_across_keys_and_examples():
    x = np.repeat(_images(1), 4, axis=0)  # four copies of one image
    config = AugmentConfig()
    a = np.asarray(AUG(jax.random.key(3), x, config, output_size=16))
    b = np.asarray(AUG(jax.random.key(3), x, config, output_size=16))
    c = np.asarray(AUG(jax.random.fold_in(jax.random.key(3), 1), x, config, output_size=16))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Per-example keys: identical inputs get different augmentations.
    for i in range(1, 4):
        assert not np.allclose(a[0], a[i])


def test_disabled_is_identity_under_jit():
    x = _images()
    config = AugmentConfig(enabled=False)
    out = AUG(jax.random.key(0), x, config, output_size=16)
    np.testing.assert_array_equal(out, x)
    # Another size: a plain resize, no randomness.
    small = AUG(jax.random.key(0), x, config, output_size=8)
    assert small.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(small, AUG(jax.random.key(9), x, config, output_size=8))


def test_everything_off_is_exact_identity():
    x = _images()
    np.testing.assert_array_equal(AUG(jax.random.key(0), x, OFF, output_size=16), x)


def test_flip_only_equals_np_flip():
    x = _images()
    out = AUG(jax.random.key(0), x, dataclasses.replace(OFF, hflip_prob=1.0), output_size=16)
    np.testing.assert_array_equal(out, np.flip(x, axis=2))


def test_flip_probability():
    # Columns 0..7 left to right; a 2:1 full crop keeps them: out[0, 0] tells a flip apart.
    x = np.broadcast_to(np.arange(8, dtype=np.float32)[None, None, :, None], (256, 4, 8, 3))
    out = np.asarray(
        AUG(
            jax.random.key(0),
            x,
            dataclasses.replace(OFF, crop_ratio=(2.0, 2.0), hflip_prob=0.5),
            output_size=8,
        )
    )
    first = out[:, 0, 0, 0]
    assert set(np.unique(first)) == {0.0, 7.0}
    assert 0.35 < (first == 7.0).mean() < 0.65


@pytest.mark.parametrize(("angle", "k"), [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_right_angle_rotation_equals_np_rot90(angle, k):
    x = _images(2, 17, 17)
    config = dataclasses.replace(OFF, rotation_degrees=(angle, angle))
    out = np.asarray(AUG(jax.random.key(0), x, config, output_size=17))
    ref = np.rot90(x, k=k, axes=(1, 2))  # counter-clockwise for k > 0, as torchvision
    # float32 cos(pi/2) is 4e-8, not 0: bilinear weights of ~1e-6 on neighbouring pixels.
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=2e-3)
    np.testing.assert_allclose(out, ref, atol=2e-3)


def test_flip_comes_before_rotation():
    x = _images(2, 17, 17)
    config = dataclasses.replace(OFF, hflip_prob=1.0, rotation_degrees=(90.0, 90.0))
    out = np.asarray(AUG(jax.random.key(0), x, config, output_size=17))
    ref = np.rot90(np.flip(x, axis=2), k=1, axes=(1, 2))  # RandomRotation(RandomHorizontalFlip)
    np.testing.assert_allclose(out, ref, atol=2e-3)


def test_rotation_uncovers_fill_corners_even_inside_the_image():
    x = np.full((1, 32, 32, 3), 200.0, np.float32)
    # A centred crop of half the side: the image around it is 200 too, but torchvision
    # rotates the resized crop, so the uncovered corners are fill, not image content.
    p = _params(32, 32, top=8, left=8, height=16, width=16, angle=45.0)
    for fill in (0.0, 7.0):
        config = dataclasses.replace(OFF, fill=fill)
        out = np.asarray(APPLY(x[0], p, config, output_size=32))
        for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
            np.testing.assert_array_equal(corner, fill)
        np.testing.assert_allclose(out[16, 16], 200.0)
        # A square and its 45 degree turn overlap in a regular octagon of inradius 1/2:
        # area 8 * (1/2)**2 * tan(22.5 deg) = 0.828 of the square (pixel grid: +-0.02).
        covered = (out[..., 0] == 200.0).mean()
        assert abs(covered - 2 * math.tan(math.pi / 8)) < 0.02


def _np_resize_bilinear(img, size):
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False), float64."""
    h, w, _ = img.shape

    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(h, size)
    x0, x1, wx = axis(w, size)
    img = img.astype(np.float64)
    top = img[y0][:, x0] * (1 - wx)[None, :, None] + img[y0][:, x1] * wx[None, :, None]
    bot = img[y1][:, x0] * (1 - wx)[None, :, None] + img[y1][:, x1] * wx[None, :, None]
    return top * (1 - wy)[:, None, None] + bot * wy[:, None, None]


@pytest.mark.parametrize(
    ("top", "left", "height", "width", "size"),
    [(3, 5, 10, 14, 24), (0, 0, 24, 24, 24), (7, 2, 17, 9, 24), (4, 4, 8, 8, 32)],
)
def test_crop_resize_matches_torch_bilinear(top, left, height, width, size):
    x = _images(1, 24, 24)[0]
    p = _params(24, 24, top=top, left=left, height=height, width=width)
    out = np.asarray(APPLY(x, p, OFF, output_size=size))
    crop = x[top : top + height, left : left + width]
    np.testing.assert_allclose(out, _np_resize_bilinear(crop, size), atol=2e-3)
    torch = pytest.importorskip("torch")
    t = (
        torch.nn.functional.interpolate(
            torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))[None],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )[0]
        .numpy()
        .transpose(1, 2, 0)
    )
    np.testing.assert_allclose(out, t, atol=2e-3)


# --- random resized crop parameters ----------------------------------------------------------


def _torchvision_get_params(rng, height, width, scale, ratio):
    """RandomResizedCrop.get_params (torchvision), with numpy's RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(("height", "width"), [(224, 224), (96, 160)])
def test_crop_params_match_torchvision_distribution(height, width):
    config = AugmentConfig()
    n = 4000
    p = _batch_params(jax.random.key(0), config, n, (height, width))
    top, left, h, w = (np.asarray(v) for v in (p.top, p.left, p.height, p.width))
    assert (h > 0).all() and (w > 0).all()
    assert (top >= 0).all() and (top + h <= height).all()
    assert (left >= 0).all() and (left + w <= width).all()
    frac = h * w / (height * width)
    aspect = w / h
    # Bounds up to the rounding of h and w to whole pixels.
    assert frac.min() >= 0.08 * 0.9 and frac.max() <= 1.0
    assert (aspect >= 3 / 4 * (1 - 1.0 / h)).all() and (aspect <= 4 / 3 * (1 + 1.0 / h)).all()

    rng = np.random.default_rng(0)
    ref = np.array(
        [_torchvision_get_params(rng, height, width, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    )
    ref_frac = ref[:, 2] * ref[:, 3] / (height * width)
    ref_aspect = ref[:, 3] / ref[:, 2]
    # Sampling error of a mean over 4000 draws is ~0.005 for frac (std ~0.27).
    for ours, theirs, tol in [
        (frac, ref_frac, 0.02),
        (np.log(aspect), np.log(ref_aspect), 0.02),
        (top + h / 2, ref[:, 0] + ref[:, 2] / 2, 0.03 * height),
        (left + w / 2, ref[:, 1] + ref[:, 3] / 2, 0.03 * width),
    ]:
        assert abs(ours.mean() - theirs.mean()) < tol
        np.testing.assert_allclose(
            np.quantile(ours, [0.1, 0.5, 0.9]), np.quantile(theirs, [0.1, 0.5, 0.9]), atol=2.5 * tol
        )
    # Large crops of a non-square image fail more often: the first valid attempt is kept, so
    # the area distribution is skewed the same way as torchvision's.
    assert abs((frac > 0.8).mean() - (ref_frac > 0.8).mean()) < 0.03


def test_crop_falls_back_to_centre_crop():
    # No attempt fits an 8 x 100 strip with these scales: torchvision's centre crop of the
    # widest allowed aspect ratio, h = 8, w = round(8 * 4 / 3) = 11, left = (100 - 11) // 2.
    config = AugmentConfig(crop_scale=(0.5, 1.0))
    p = _batch_params(jax.random.key(0), config, 16, (8, 100))
    for name, value in [("top", 0), ("left", 44), ("height", 8), ("width", 11)]:
        np.testing.assert_array_equal(getattr(p, name), value)
    p = _batch_params(jax.random.key(0), config, 4, (100, 8))  # tall: w = 8, h = round(8 * 4/3)
    for name, value in [("top", 44), ("left", 0), ("height", 11), ("width", 8)]:
        np.testing.assert_array_equal(getattr(p, name), value)


def test_angle_and_factor_ranges():
    config = AugmentConfig(
        rotation_degrees=(-10, 30), brightness=0.4, contrast=1.5, hue=0.1, saturation=0.0
    )
    p = _batch_params(jax.random.key(0), config, 2000, (16, 16))
    angle = np.asarray(p.angle)
    assert angle.min() >= -10 and angle.max() <= 30 and abs(angle.mean() - 10) < 1
    b = np.asarray(p.brightness)
    assert b.min() >= 0.6 and b.max() <= 1.4
    c = np.asarray(p.contrast)
    assert c.min() >= 0.0 and c.max() <= 2.5  # max(0, 1 - 1.5) = 0
    hue = np.asarray(p.hue)
    assert hue.min() >= -0.1 and hue.max() <= 0.1
    np.testing.assert_array_equal(p.saturation, 1.0)  # op off: factor 1 (unchanged)
    assert np.asarray(p.grayscale).all()  # grayscale_prob = 1


def test_colour_order_is_a_random_permutation():
    config = AugmentConfig(hue=0.1)
    order = np.asarray(_batch_params(jax.random.key(0), config, 500, (16, 16)).order)
    assert order.shape == (500, 4)
    np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (500, 1)))
    assert len({tuple(o) for o in order}) == 24  # all 4! orders occur
    fixed = _batch_params(
        jax.random.key(0), dataclasses.replace(config, jitter_random_order=False), 8, (16, 16)
    )
    np.testing.assert_array_equal(fixed.order, np.tile(np.arange(4), (8, 1)))


# --- colour ----------------------------------------------------------------------------------


def test_brightness_only_equals_torchvision_formula():
    x = _images(8)
    config = dataclasses.replace(OFF, brightness=0.5)
    key = jax.random.key(5)
    out = np.asarray(AUG(key, x, config, output_size=16))
    f = np.asarray(_batch_params(key, config, 8, (16, 16)).brightness, np.float64)
    assert f.min() >= 0.5 and f.max() <= 1.5 and f.std() > 0.05
    # F.adjust_brightness: _blend(img, zeros, f) = clamp(f * img, 0, bound).
    ref = np.clip(x.astype(np.float64) * f[:, None, None, None], 0, 255)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-4)


def test_contrast_and_saturation_only_equal_torchvision_formulas():
    x = _images(6)
    key = jax.random.key(2)
    x64 = x.astype(np.float64)
    gray = _gray64(x64)
    config = dataclasses.replace(OFF, contrast=0.8)
    f = np.asarray(_batch_params(key, config, 6, (16, 16)).contrast, np.float64)
    f = f[:, None, None, None]
    mean = gray.mean(axis=(1, 2))[:, None, None, None]  # full-image crop: mean over all pixels
    ref = np.clip(f * x64 + (1 - f) * mean, 0, 255)
    np.testing.assert_allclose(AUG(key, x, config, output_size=16), ref, atol=2e-3)

    config = dataclasses.replace(OFF, saturation=0.8)
    f = np.asarray(_batch_params(key, config, 6, (16, 16)).saturation, np.float64)
    f = f[:, None, None, None]
    ref = np.clip(f * x64 + (1 - f) * gray[..., None], 0, 255)
    np.testing.assert_allclose(AUG(key, x, config, output_size=16), ref, atol=2e-3)


def test_contrast_mean_is_over_the_crop_window():
    x = np.zeros((16, 16, 3), np.float32)
    x[4:12, 4:12] = 100.0  # the crop: mean gray 100; the whole image: mean 25
    p = _params(16, 16, top=4, left=4, height=8, width=8, contrast=0.5, order=(0,))
    out = np.asarray(APPLY(x, p, dataclasses.replace(OFF, contrast=0.5), output_size=8))
    np.testing.assert_allclose(out, 100.0, atol=1e-3)


def test_hue_only_equals_hsv_reference():
    x = _images(2, 6, 6)
    config = dataclasses.replace(OFF, hue=0.3)
    key = jax.random.key(4)
    out = np.asarray(AUG(key, x, config, output_size=6))
    shifts = np.asarray(_batch_params(key, config, 2, (6, 6)).hue, np.float64)
    assert np.abs(shifts).max() <= 0.3
    ref = np.empty(x.shape)
    for n in range(2):
        for i, j in np.ndindex(6, 6):
            h, s, v = colorsys.rgb_to_hsv(*(x[n, i, j].astype(np.float64) / 255))
            ref[n, i, j] = colorsys.hsv_to_rgb((h + shifts[n]) % 1.0, s, v)
    np.testing.assert_allclose(out, np.clip(ref * 255, 0, 255), atol=2e-2)


def test_hue_leaves_gray_pixels_alone():
    x = np.repeat(_images(1, 8, 8)[..., :1], 3, axis=-1)
    out = AUG(jax.random.key(0), x, dataclasses.replace(OFF, hue=0.5), output_size=8)
    np.testing.assert_allclose(out, x, atol=1e-3)


def test_grayscale_equals_luma_formula():
    x = _images()
    out = np.asarray(
        AUG(jax.random.key(0), x, dataclasses.replace(OFF, grayscale_prob=1.0), output_size=16)
    )
    ref = _gray64(x.astype(np.float64))
    for c in range(3):
        np.testing.assert_allclose(out[..., c], ref, rtol=1e-6, atol=1e-4)


def test_grayscale_probability():
    x = _images(400, 2, 2)
    out = np.asarray(
        AUG(
            jax.random.key(0),
            x,
            dataclasses.replace(OFF, crop_scale=(1.0, 1.0), grayscale_prob=0.3),
            output_size=2,
        )
    )
    gray = np.all(out[..., 0] == out[..., 1], axis=(1, 2))
    assert 0.22 < gray.mean() < 0.38


def test_jitter_follows_the_sampled_order():
    x = _images(1)[0]
    x64 = x.astype(np.float64)
    config = dataclasses.replace(OFF, brightness=0.5, contrast=0.5, saturation=0.5)

    def bright(y, f):
        return np.clip(y * f, 0, 255)

    def contrast(y, f):
        return np.clip(f * y + (1 - f) * _gray64(y).mean(), 0, 255)

    def sat(y, f):
        return np.clip(f * y + (1 - f) * _gray64(y)[..., None], 0, 255)

    fns = [(bright, 1.4), (contrast, 0.6), (sat, 1.3)]
    for order in [(0, 1, 2), (1, 0, 2), (2, 1, 0)]:
        p = _params(16, 16, brightness=1.4, contrast=0.6, saturation=1.3, order=order)
        ref = x64
        for k in order:
            fn, f = fns[k]
            ref = fn(ref, f)
        np.testing.assert_allclose(APPLY(x, p, config, output_size=16), ref, atol=2e-3)


# --- normalisation ---------------------------------------------------------------------------


def test_paper_normalization_maps_to_minus_one_one():
    scale, offset = PAPER_NORMALIZATION
    out = np.asarray(normalize(np.array([[0.0, 127.5, 255.0]] * 3).T, scale, offset))
    np.testing.assert_allclose(out, np.array([[-1.0, 0.0, 1.0]] * 3).T, atol=1e-6)
    assert normalize(np.zeros((2, 4, 4, 3)), scale, offset).dtype == jnp.float32


def test_normalization_from_mean_std_agrees_with_backbone_preprocessing():
    scale, offset = normalization_from_mean_std(IMAGENET_MEAN, IMAGENET_STD)
    ref_scale, ref_offset = Preprocessing(input_size=8, resize_size=8).affine()
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-12)
    np.testing.assert_allclose(offset, ref_offset, rtol=1e-12)
    with pytest.raises(ValueError, match="std must be positive"):
        normalization_from_mean_std(0.5, 0.0)
    with pytest.raises(ValueError, match="1 or 3 values"):
        normalization_from_mean_std((0.5, 0.5), 0.5)


# --- speed -----------------------------------------------------------------------------------


def test_batch_of_64_at_224_under_jit_in_reasonable_time():
    x = jnp.asarray(_images(64, 224, 224))
    config = AugmentConfig()
    out = AUG(jax.random.key(0), x, config, output_size=224).block_until_ready()
    assert out.shape == (64, 224, 224, 3)
    times = []
    for step in range(3):
        key = jax.random.fold_in(jax.random.key(0), step)
        start = time.perf_counter()
        AUG(key, x, config, output_size=224).block_until_ready()
        times.append(time.perf_counter() - start)
    # ~0.2 s on a 2-core CPU; the bound only catches a pathological slow-down.
    assert min(times) < 5.0, times
