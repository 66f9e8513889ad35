"""On-device training augmentation: the pipeline of Gu & Lee (2024), section 5.7.

The paper (Bioengineering 11(4):406, section 5.7 "Data Augmentation") says, in full:

    "We applied a series of random transformations, including resizing and cropping, color
    jittering, horizontal flipping, and rotation. In addition, we transformed the images to
    grayscale, as the original X-ray images are grayscale, and normalized them to have a mean
    of 0.5 and a standard deviation of 0.5."

Section 5.6 adds "an epoch size of 20 and a batch size of 64"; no other augmentation number is
given. The paper names the transforms and their order but none of their parameters except the
normalisation, so each default of :class:`AugmentConfig` comes from one of three sources:

==========================  ========================  ======================================
parameter                   default                   source
==========================  ========================  ======================================
order                       crop, jitter, flip,       paper 5.7 (order of the sentence)
                            rotation, grayscale
crop_scale, crop_ratio      (0.08, 1.0), (3/4, 4/3)   torchvision ``RandomResizedCrop``
crop_attempts               10                        torchvision ``RandomResizedCrop``
brightness/contrast/        0.2 each                  featsim choice: paper silent, and
saturation                                            torchvision's default (0) is a no-op
                                                      although the paper did jitter colour
hue                         0.0                       torchvision ``ColorJitter`` (paper
                                                      silent; no effect on gray X-rays)
jitter_random_order         True                      torchvision ``ColorJitter`` (randperm)
hflip_prob                  0.5                       torchvision ``RandomHorizontalFlip``
rotation_degrees            (-10, 10)                 featsim choice: paper silent and
                                                      torchvision ``RandomRotation`` has no
                                                      default
fill                        0 (black)                 torchvision ``RandomRotation``
grayscale_prob              1.0                       paper 5.7 ("transformed the images to
                                                      grayscale": every image, i.e.
                                                      ``Grayscale(3)``; torchvision's
                                                      ``RandomGrayscale`` default is 0.1)
normalisation               mean 0.5, std 0.5         paper 5.7 (:data:`PAPER_NORMALIZATION`)
==========================  ========================  ======================================

On gray X-rays (r = g = b) saturation and hue do nothing, and with ``grayscale_prob = 1``
saturation only acts through clipping (gray is linear): brightness and contrast are what the
paper's colour jitter can have done to its data.

Semantics follow torchvision: ``RandomResizedCrop.get_params`` (area fraction uniform in
``crop_scale``, aspect ratio log-uniform in ``crop_ratio``, ``crop_attempts`` tries, then the
centre-crop fallback; drawn here all at once and the first valid one kept), ``ColorJitter``
(factors uniform in ``[max(0, 1 - b), 1 + b]``, hue in ``[-h, h]``, the enabled ops applied in a
random order per example, clipping after each), ITU-R 601 luma ``(0.299, 0.587, 0.114)`` for
grayscale (PIL's ``convert("L")``; torchvision's tensor path rounds 0.299 to 0.2989).

Deliberate differences from a sequential torchvision pipeline, for speed on device:

* Geometry is one resampling: crop-and-resize, flip and rotation are composed into one affine
  map per example and the source image is sampled once, bilinearly (torchvision resamples
  twice: bilinear for the resize, nearest for ``RandomRotation``'s default). Samples are
  clamped to the crop window, as torchvision's resize of the cropped image is, and output
  pixels whose pre-rotation position falls outside the crop (the corners a rotation uncovers)
  get ``fill``: they are black, never image content from outside the crop.
* Colour jitter and grayscale run on the source pixels before the single resampling (the
  paper's order puts jitter between the crop and the flip/rotation, so fill pixels stay
  ``fill`` as in torchvision). The contrast mean is the mean gray level of the crop window's
  source pixels rather than of its resized copy. All other colour ops are per-pixel, so the
  result differs from jitter-after-resize only where clipping meets interpolation.
  (Jittering after the resampling is also about 3x slower on CPU: XLA fuses the gather into
  the cross-channel gray computations and recomputes it per channel.)
* ``hue > 0`` is costly: each jitter slot computes the HSV round trip for every example (the
  per-example random order makes the op a select under ``vmap``).
* No antialiasing: the input is already at the network size, so the crop is always upsampled
  (torchvision's antialias does nothing then). Inputs much larger than ``output_size`` alias.

Everything is jit-compatible with static shapes: the config is static (hashable, frozen),
each example draws its own parameters from ``jax.random.split(key, n)``, and the caller folds
the step into the key (``jax.random.fold_in(base_key, step)``).

Example:
    >>> config = AugmentConfig()
    >>> key = jax.random.fold_in(jax.random.key(0), 0)
    >>> images = jnp.zeros((2, 32, 32, 3), jnp.float32)
    >>> out = augment_batch(key, images, config, output_size=32)
    >>> scale, offset = PAPER_NORMALIZATION
    >>> normalize(out, scale, offset).shape
    (2, 32, 32, 3)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from featsim.train.config import AugmentConfig

__all__ = [
    "LUMA_WEIGHTS",
    "PAPER_NORMALIZATION",
    "AugmentConfig",
    "AugmentParams",
    "apply_params",
    "augment_batch",
    "normalization_from_mean_std",
    "normalize",
    "sample_params",
]

# ITU-R BT.601 luma, as PIL's convert("L") and torchvision's Grayscale.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_MAX = 255.0


def normalization_from_mean_std(
    mean: float | Sequence[float], std: float | Sequence[float], *, max_value: float = 255.0
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(scale, offset)`` with ``pixels * scale + offset == (pixels / max_value - mean) / std``.

    Args:
        mean: per-channel mean on ``[0, 1]`` pixels, a float or 3 floats.
        std: per-channel std on ``[0, 1]`` pixels, a float or 3 floats, all positive.
        max_value: the pixel value that maps to 1 (255 for ``[0, 255]`` pixels).

    Returns:
        ``(scale, offset)``, each a tuple of 3 floats (one per channel).

    Raises:
        ValueError: if a std is not positive or mean/std do not have 1 or 3 values.
    """
    mean, std = (np.asarray(v, np.float64) for v in (mean, std))
    mean, std = (np.full(3, v) if v.ndim == 0 else v for v in (mean, std))
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"mean and std need 1 or 3 values, got mean={mean!r}, std={std!r}")
    if np.any(std <= 0):
        raise ValueError(f"std must be positive, got {std!r}")
    scale = 1.0 / (max_value * std)
    offset = -mean / std
    return tuple(float(s) for s in scale), tuple(float(o) for o in offset)


# Section 5.7: "normalized them to have a mean of 0.5 and a standard deviation of 0.5", i.e.
# p * 2 / 255 - 1 for [0, 255] pixels.
PAPER_NORMALIZATION = normalization_from_mean_std(0.5, 0.5)


def normalize(images, scale, offset):
    """``images * scale + offset`` in float32: maps ``[0, 255]`` pixels to the network range.

    Args:
        images: float array ``[..., 3]`` on ``[0, 255]``.
        scale: a float or per-channel ``[3]`` values (e.g. ``PAPER_NORMALIZATION[0]`` or
            :meth:`featsim.backbones.preprocessing.Preprocessing.affine`'s first value).
        offset: a float or per-channel ``[3]`` values.

    Returns:
        float32 array of the same shape.
    """
    x = jnp.asarray(images, jnp.float32)
    return x * jnp.asarray(scale, jnp.float32) + jnp.asarray(offset, jnp.float32)


class AugmentParams(NamedTuple):
    """Random parameters of one example (a batch of them under ``jax.vmap``).

    ``top, left, height, width``: int32 crop window in input pixels. ``flip``: bool.
    ``angle``: float32 degrees, counter-clockwise. ``brightness, contrast, saturation``:
    float32 blend factors (1 = unchanged). ``hue``: float32 shift in turns (0 = unchanged).
    ``order``: int32 ``[len(config.colour_ops())]``, indices into ``config.colour_ops()`` in
    the order applied. ``grayscale``: bool.
    """

    top: jax.Array
    left: jax.Array
    height: jax.Array
    width: jax.Array
    flip: jax.Array
    angle: jax.Array
    brightness: jax.Array
    contrast: jax.Array
    saturation: jax.Array
    hue: jax.Array
    order: jax.Array
    grayscale: jax.Array


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]):
    # torchvision's central crop after all attempts fail; depends only on static values.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _lerp(u, lo, hi):
    return lo + u * (hi - lo)


def _randint(u, n):
    # Uniform integer in [0, n) from u in [0, 1); the clamp guards float rounding of u * n.
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _sample_crop(u, config: AugmentConfig, height: int, width: int):
    """torchvision's ``RandomResizedCrop.get_params`` with all attempts drawn at once.

    ``u``: ``[2 * attempts + 2]`` uniforms. Returns int32 ``(top, left, h, w)``.
    """
    n = config.crop_attempts
    area = height * width * _lerp(u[:n], *config.crop_scale)
    aspect = jnp.exp(
        _lerp(u[n : 2 * n], math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    )
    # jnp.round rounds half to even, like Python's round() in torchvision.
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(valid)  # the first valid attempt, as torchvision's loop returns it
    found = valid[first]
    fb_top, fb_left, fb_h, fb_w = _fallback_crop(height, width, config.crop_ratio)
    h = jnp.where(found, h[first], fb_h)
    w = jnp.where(found, w[first], fb_w)
    # torch.randint(0, height - h + 1): top uniform over every position that fits.
    top = jnp.where(found, _randint(u[2 * n], height - h + 1), fb_top)
    left = jnp.where(found, _randint(u[2 * n + 1], width - w + 1), fb_left)
    return top, left, h, w


def sample_params(key, config: AugmentConfig, *, image_size: tuple[int, int]) -> AugmentParams:
    """Draws the random parameters of one example (vmap it for a batch).

    All the example's randomness comes from one ``jax.random.uniform`` vector: compiling one
    threefry call instead of a dozen keeps the jit compile time of the batch to a few seconds.

    Args:
        key: a PRNG key for this example.
        config: the pipeline parameters.
        image_size: static ``(height, width)`` of the input image.

    Returns:
        An :class:`AugmentParams` of scalars (``order`` is ``[len(config.colour_ops())]``).
    """
    height, width = image_size
    n_crop = 2 * config.crop_attempts + 2
    n_ops = len(config.colour_ops())
    u = jax.random.uniform(key, (n_crop + 7 + n_ops,), jnp.float32)
    top, left, h, w = _sample_crop(u[:n_crop], config, height, width)
    flip, angle, ub, uc, us, uh, gray = (u[n_crop + i] for i in range(7))

    def factor(v, amount):
        if amount <= 0:
            return jnp.float32(1.0)
        return _lerp(v, max(0.0, 1.0 - amount), 1.0 + amount)

    # argsort of i.i.d. uniforms is a uniformly random permutation (torch.randperm).
    order = jnp.argsort(u[n_crop + 7 :]) if config.jitter_random_order else jnp.arange(n_ops)
    return AugmentParams(
        top=top,
        left=left,
        height=h,
        width=w,
        flip=flip < config.hflip_prob,
        angle=_lerp(angle, *config.rotation_degrees),
        brightness=factor(ub, config.brightness),
        contrast=factor(uc, config.contrast),
        saturation=factor(us, config.saturation),
        hue=_lerp(uh, -config.hue, config.hue) if config.hue > 0 else jnp.float32(0.0),
        order=order.astype(jnp.int32),
        grayscale=gray < config.grayscale_prob,
    )


def _geometry(params: AugmentParams, output_size: int):
    """Source coordinates ``(ys, xs)`` ``[S, S]`` and the non-fill mask of one example."""
    s = output_size
    c = (s - 1) / 2.0
    theta = jnp.deg2rad(params.angle)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Inverse maps, output pixel -> source, as 3x3 matrices on (x, y, 1). Rotation by
    # +angle is counter-clockwise on screen (y down), about the pixel-centre midpoint.
    rot = jnp.array(
        [[cos, -sin, c - cos * c + sin * c], [sin, cos, c - sin * c - cos * c], [0.0, 0.0, 1.0]]
    )
    sign = jnp.where(params.flip, -1.0, 1.0)
    flip = jnp.array(
        [[sign, 0.0, jnp.where(params.flip, s - 1.0, 0.0)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    )
    # torchvision's resize of the crop: half-pixel centres (align_corners=False).
    sx = params.width.astype(jnp.float32) / s
    sy = params.height.astype(jnp.float32) / s
    crop = jnp.array(
        [
            [sx, 0.0, params.left + 0.5 * sx - 0.5],
            [0.0, sy, params.top + 0.5 * sy - 0.5],
            [0.0, 0.0, 1.0],
        ]
    )
    # HIGHEST: a default-precision f32 matmul may run in TF32/bf16 on accelerators, which
    # would move sample positions by a fraction of a pixel.
    full = jnp.matmul(jnp.matmul(crop, flip, precision="highest"), rot, precision="highest")
    grid = jnp.arange(s, dtype=jnp.float32)
    xx, yy = grid[None, :], grid[:, None]
    # Fill where the rotation's source lies outside the S x S crop (nearest-pixel rule, as
    # RandomRotation's default NEAREST interpolation decides it).
    qx = rot[0, 0] * xx + rot[0, 1] * yy + rot[0, 2]
    qy = rot[1, 0] * xx + rot[1, 1] * yy + rot[1, 2]
    inside = (qx >= -0.5) & (qx < s - 0.5) & (qy >= -0.5) & (qy < s - 0.5)
    xs = full[0, 0] * xx + full[0, 1] * yy + full[0, 2]
    ys = full[1, 0] * xx + full[1, 1] * yy + full[1, 2]
    # Torch's bilinear resize clamps source positions to the (cropped) image.
    xs = jnp.clip(xs, params.left, params.left + params.width - 1)
    ys = jnp.clip(ys, params.top, params.top + params.height - 1)
    return ys, xs, inside


def _bilinear(image, ys, xs):
    """Samples ``image [H, W, C]`` at in-bounds float positions ``[S, S]`` (gather based)."""
    height, width, channels = image.shape
    y0 = jnp.floor(ys)
    x0 = jnp.floor(xs)
    wy = (ys - y0)[..., None]
    wx = (xs - x0)[..., None]
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)
    y1 = jnp.minimum(y0 + 1, height - 1)
    x1 = jnp.minimum(x0 + 1, width - 1)
    flat = image.reshape(height * width, channels)

    def at(y, x):
        return jnp.take(flat, y * width + x, axis=0, mode="clip")

    top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx
    return top * (1.0 - wy) + bottom * wy


def _gray(x):
    r, g, b = LUMA_WEIGHTS
    return x[..., 0] * r + x[..., 1] * g + x[..., 2] * b


def _jitter_step(x, op, params: AugmentParams, ops: tuple[str, ...], mask):
    """Applies colour op ``ops[op]`` (``op`` traced) to one image.

    Brightness, contrast and saturation are all torchvision's ``_blend``,
    ``clip(f * x + (1 - f) * target)``, with target 0, the mean gray level and the gray
    image, so one fused blend with a per-example target replaces a ``lax.switch`` (which
    under ``vmap`` computes every branch). ``mask``: ``[H, W]`` 1 inside the crop window,
    where contrast takes its mean.
    """
    factors = [getattr(params, n) for n in ops]
    factor = jnp.select([op == k for k, _ in enumerate(ops)], factors)
    target = jnp.float32(0.0)
    if "contrast" in ops or "saturation" in ops:
        gray = _gray(x)
    if "contrast" in ops:
        mean = jnp.sum(gray * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        target = target + jnp.where(op == ops.index("contrast"), mean, 0.0)
    if "saturation" in ops:
        target = target + jnp.where(op == ops.index("saturation"), gray, 0.0)[..., None]
    out = jnp.clip(factor * x + (1.0 - factor) * target, 0.0, _MAX)
    if "hue" in ops:
        out = jnp.where(op == ops.index("hue"), _adjust_hue(x, params.hue), out)
    return out


def _rgb_to_hsv(rgb):
    # torchvision.transforms._functional_tensor._rgb2hsv, channels last, on [0, 1].
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = jnp.max(rgb, axis=-1)
    minc = jnp.min(rgb, axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    cr_div = jnp.where(eqc, 1.0, cr)
    rc = (maxc - r) / cr_div
    gc = (maxc - g) / cr_div
    bc = (maxc - b) / cr_div
    hr = jnp.where(maxc == r, bc - gc, 0.0)
    hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
    hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
    h = jnp.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    # torchvision.transforms._functional_tensor._hsv2rgb, channels last.
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    sector = [i == k for k in range(6)]
    r = jnp.select(sector, [v, q, p, p, t, v])
    g = jnp.select(sector, [t, v, v, q, p, p])
    b = jnp.select(sector, [p, p, t, v, v, q])
    return jnp.stack([r, g, b], axis=-1)


def _adjust_hue(x, shift):
    h, s, v = _rgb_to_hsv(x / _MAX)
    h = jnp.mod(h + shift, 1.0)
    return jnp.clip(_hsv_to_rgb(h, s, v) * _MAX, 0.0, _MAX)


def apply_params(image, params: AugmentParams, config: AugmentConfig, *, output_size: int):
    """Applies one example's parameters: colour, grayscale, one bilinear resampling, fill.

    Args:
        image: float32 ``[H, W, 3]`` on ``[0, 255]``.
        params: this example's :class:`AugmentParams` (from :func:`sample_params`).
        config: the config ``params`` were drawn with (which colour ops exist).
        output_size: static side ``S`` of the square output.

    Returns:
        float32 ``[S, S, 3]`` on ``[0, 255]``.
    """
    height, width, _ = image.shape
    # Colour first, on the source pixels, as in the paper's order (jitter before flip and
    # rotation): fill pixels stay fill, and each output pixel is one bilinear read of the
    # final colours (jitter after sampling makes XLA recompute the sample per channel).
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    window = (
        (rows >= params.top)
        & (rows < params.top + params.height)
        & (cols >= params.left)
        & (cols < params.left + params.width)
    )
    x = image
    ops = config.colour_ops()
    for slot in range(len(ops)):
        x = _jitter_step(x, params.order[slot], params, ops, window.astype(jnp.float32))
    if config.grayscale_prob > 0:
        gray = jnp.clip(_gray(x), 0.0, _MAX)[..., None]
        x = jnp.where(params.grayscale, jnp.broadcast_to(gray, x.shape), x)
    ys, xs, inside = _geometry(params, output_size)
    x = _bilinear(x, ys, xs)
    return jnp.where(inside[..., None], x, jnp.float32(config.fill))


def _check_images(images, output_size):
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {tuple(images.shape)}")
    if not isinstance(output_size, (int, np.integer)) or output_size <= 0:
        raise ValueError(f"output_size must be a positive int, got {output_size!r}")


def augment_batch(key, images, config: AugmentConfig, *, output_size: int):
    """Augments a batch on device, each example with its own key.

    Args:
        key: PRNG key for this batch; the caller folds in the step
            (``jax.random.fold_in(base_key, step)``). Split into one key per example.
        images: float ``[N, H, W, 3]`` on ``[0, 255]`` (already at the network size).
        config: the pipeline parameters (static: hashable, closed over or ``static_argnames``).
        output_size: static side ``S`` of the square output.

    Returns:
        float32 ``[N, S, S, 3]`` on ``[0, 255]``; normalise with :func:`normalize`. With
        ``config.enabled=False`` the input itself (cast to float32) when it is already
        ``S x S``, else its plain bilinear resize to ``S x S``; ``key`` is unused then.

    Raises:
        ValueError: if ``images`` is not ``[N, H, W, 3]`` or ``output_size`` not a positive int.

    Example:
        >>> aug = jax.jit(augment_batch, static_argnames=("config", "output_size"))
        >>> out = aug(jax.random.key(0), jnp.zeros((4, 64, 64, 3)), AugmentConfig(), output_size=64)
    """
    images = jnp.asarray(images, jnp.float32)
    _check_images(images, output_size)
    n, height, width, _ = images.shape
    if not config.enabled:
        if (height, width) == (output_size, output_size):
            return images
        return jax.image.resize(images, (n, output_size, output_size, 3), "linear", antialias=False)
    keys = jax.random.split(key, n)
    params = jax.vmap(functools.partial(sample_params, config=config, image_size=(height, width)))(
        keys
    )
    apply = functools.partial(apply_params, config=config, output_size=output_size)
    return jax.vmap(apply)(images, params)
