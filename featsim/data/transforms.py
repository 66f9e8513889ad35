"""The preprocessing policy, frozen and fingerprinted, and its application to RGB pixels.

A :class:`Transform` takes the float32 ``[H, W, 3]`` pixels on ``[0, 255]`` that
:func:`featsim.data.decode.load_rgb` returns to the ``[S, S, 3]`` network input. It is a frozen
value: :meth:`Transform.fingerprint` hashes every field, including the decoding rule
(:data:`featsim.data.decode.MODE_RULE`) and this module's resize rule (:data:`RESIZE_RULE`), so
features cached under one policy are never reused under another.

Resize and crop follow torchvision's ``Resize(resize_size)`` + ``CenterCrop(input_size)`` on a
PIL image, with its geometry exactly (``crop="center"``):

* the shorter side becomes ``resize_size`` and the longer ``int(resize_size * long / short)``
  (truncated, as torchvision's ``_compute_resized_output_size``); an image already at that size
  is not resampled;
* the crop starts at ``int(round((h - input_size) / 2.0))`` (Python's round: halves go to even)
  and likewise for the width, as torchvision's ``center_crop``.

``crop="none"`` resizes straight to ``input_size x input_size``. Resampling is Pillow's, run on
each float32 channel (mode ``"F"``) instead of on uint8: the same antialiased filters (for
downscaling the kernel widens with the scale; clean-fid, Parmar et al. 2022, "On Aliased
Resizing and Surprising Subtleties in GAN Evaluation", CVPR, showed that resizes without it
change FID), without rounding to 8 bits, so 16-bit and DICOM pixels keep their precision.
Against torchvision's PIL path (uint8 in, uint8 out) the result differs by that rounding only:
at most 1 grey level for bilinear, 0 for nearest, and at most 1.13 for bicubic (the rounded
intermediate image passes through the kernel's negative lobes: 0.5 x 1.25 + 0.5).

One exception, bicubic only: its overshoot is clipped to ``[0, 255]`` on the result here, while
Pillow's uint8 path also clips its intermediate image, after whichever pass it runs first (a
choice that depends on the sizes: Pillow 13 runs the vertical pass first for some of them,
python-pillow/Pillow#9549, where older Pillow always ran the horizontal one first). Near
saturated edges the two then differ by more (up to 14 levels measured on Imagenette
validation images, at a few pixels). The float path is the exact separable filter, whatever
the pass order.

Normalisation (:data:`NORMALIZATIONS`): ``"backbone"`` applies the backbone's own
:meth:`~featsim.backbones.preprocessing.Preprocessing.normalize`; ``"paper"`` applies Gu & Lee
(2024)'s mean 0.5 / std 0.5 on ``[0, 1]`` pixels, ``(p / 255 - 0.5) / 0.5``. Both are applied
in float32 (``normalize`` computes in float64; they differ by float32 rounding, ~1e-7 relative).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
from PIL import Image

from featsim.backbones.preprocessing import Preprocessing
from featsim.data.decode import MODE_RULE

__all__ = [
    "NORMALIZATIONS",
    "RESIZE_RULE",
    "Transform",
    "center_crop_offsets",
    "resized_shape",
]

NORMALIZATIONS = ("backbone", "paper")
# Bump whenever resize_and_crop's output changes for some input: it is part of cache keys.
RESIZE_RULE = "featsim-pillow-float32-v1"

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# Gu & Lee (2024): transforms.Normalize(mean=0.5, std=0.5) on [0, 1] pixels.
_PAPER_MEAN_STD = (0.5, 0.5, 0.5)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The ``(height, width)`` torchvision's ``Resize(size)`` gives: shorter side -> ``size``.

    Args:
        height: image height, positive.
        width: image width, positive.
        size: the new length of the shorter side.

    Returns:
        ``(new_height, new_width)``; the longer side is ``int(size * long / short)``.

    Example:
        >>> resized_shape(300, 400, 256)
        (256, 341)
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of torchvision's ``CenterCrop(size)`` on an image at least ``size``.

    Example:
        >>> center_crop_offsets(259, 257, 224)  # 17.5 -> 18, 16.5 -> 16 (halves to even)
        (18, 16)
    """
    # round() of a float returns an int; halves go to the even neighbour, as in torchvision.
    return round((height - size) / 2.0), round((width - size) / 2.0)


@dataclasses.dataclass(frozen=True)
class Transform:
    """A frozen preprocessing policy: resize, crop, pixel scaling and the decoding rule.

    Attributes:
        preprocessing: the backbone's recipe (sizes, crop, interpolation, scaling).
        normalization: one of :data:`NORMALIZATIONS`; ``"backbone"`` uses
            ``preprocessing.scaling``, ``"paper"`` uses ``(p / 255 - 0.5) / 0.5``.
        mode_rule: the decoding rule the input pixels follow; must be this featsim's
            :data:`~featsim.data.decode.MODE_RULE` (recorded so that changing it changes the
            fingerprint).
        resize_rule: must be :data:`RESIZE_RULE`, recorded for the same reason.

    Example:
        >>> from featsim.backbones.preprocessing import TORCHVISION_IMAGENET
        >>> t = Transform.for_backbone(TORCHVISION_IMAGENET)
        >>> t(np.zeros((300, 400, 3), np.float32)).shape
        (224, 224, 3)
    """

    preprocessing: Preprocessing
    normalization: str = "backbone"
    mode_rule: str = MODE_RULE
    resize_rule: str = RESIZE_RULE

    def __post_init__(self):
        if not isinstance(self.preprocessing, Preprocessing):
            raise TypeError(
                f"preprocessing must be a Preprocessing, got {type(self.preprocessing).__name__}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.mode_rule != MODE_RULE or self.resize_rule != RESIZE_RULE:
            raise ValueError(
                f"this featsim decodes with mode_rule={MODE_RULE!r} and resizes with "
                f"resize_rule={RESIZE_RULE!r}; got mode_rule={self.mode_rule!r}, "
                f"resize_rule={self.resize_rule!r}"
            )
        p = self.preprocessing
        if not p.antialias and p.interpolation != "nearest":
            raise ValueError(
                f"featsim resizes with Pillow, whose {p.interpolation} filter always antialiases "
                f"downscaling; a non-antialiased recipe (antialias=False) is not supported"
            )

    @classmethod
    def for_backbone(
        cls, preprocessing: Preprocessing, normalization: str = "backbone"
    ) -> Transform:
        """The transform for a backbone's :class:`Preprocessing` and a normalisation."""
        return cls(preprocessing=preprocessing, normalization=normalization)

    @property
    def input_size(self) -> int:
        """Side ``S`` of the square output."""
        return self.preprocessing.input_size

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Resizes, crops and normalises one image.

        Args:
            rgb: uint8 or float array of shape ``[H, W, 3]``, values on ``[0, 255]``.

        Returns:
            float32 array of shape ``[S, S, 3]`` (``S = preprocessing.input_size``),
            C-contiguous: the network input.

        Raises:
            ValueError: the input is not a finite ``[H, W, 3]`` image on ``[0, 255]``.
        """
        scale, offset = self._scaling().affine()
        return self._resize_crop(rgb, scale.astype(np.float32), offset.astype(np.float32))

    def resize_and_crop(self, rgb: np.ndarray) -> np.ndarray:
        """Resizes and crops one image, keeping pixels on ``[0, 255]``.

        Args:
            rgb: uint8 or float array of shape ``[H, W, 3]``, values on ``[0, 255]``.

        Returns:
            float32 array of shape ``[S, S, 3]``, C-contiguous, on ``[0, 255]``.

        Raises:
            ValueError: the input is not a finite ``[H, W, 3]`` image on ``[0, 255]``.
        """
        return self._resize_crop(rgb, None, None)

    def to_dict(self) -> dict:
        """Every field as JSON-able values (the preprocessing as a nested dict)."""
        pre = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self.preprocessing).items()
        }
        return {
            "preprocessing": pre,
            "normalization": self.normalization,
            "mode_rule": self.mode_rule,
            "resize_rule": self.resize_rule,
        }

    def fingerprint(self) -> str:
        """SHA-256 hex digest of :meth:`to_dict` as canonical JSON (sorted keys, no spaces)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _resize_crop(self, rgb, scale: np.ndarray | None, offset: np.ndarray | None):
        """Resize, crop and (with ``scale``/``offset``, float32 ``[3]``) the affine scaling.

        Applies Preprocessing.normalize's affine map in float32 while copying each channel out
        of the resized image (normalize computes in float64: they differ by float32 rounding,
        ~1e-7 relative).
        """
        rgb = _check_rgb(rgb)
        p = self.preprocessing
        size = p.input_size
        if p.crop == "center":
            new_h, new_w = resized_shape(*rgb.shape[:2], p.resize_size)
            top, left = center_crop_offsets(new_h, new_w, size)
        else:
            (new_h, new_w), (top, left) = (size, size), (0, 0)
        # Gray images (three equal channels, the medical case) need one resize, not three.
        gray = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        out = np.empty((size, size, 3), np.float32)
        for c in range(3):
            if c == 0 or not gray:
                resized = _resize(rgb[..., c], new_h, new_w, p.interpolation)
                window = resized[top : top + size, left : left + size]
            out[..., c] = window if scale is None else window * scale[c] + offset[c]
        return out

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(scale, offset)`` ``[3]``: network input = pixels * scale + offset."""
        scale, offset = self._scaling().affine()
        return scale.astype(np.float32), offset.astype(np.float32)

    def _scaling(self) -> Preprocessing:
        if self.normalization == "backbone":
            return self.preprocessing
        return dataclasses.replace(
            self.preprocessing, scaling="mean_std", mean=_PAPER_MEAN_STD, std=_PAPER_MEAN_STD
        )


def _check_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected a non-empty RGB image of shape [H, W, 3], got {rgb.shape}")
    if rgb.dtype != np.uint8 and not np.issubdtype(rgb.dtype, np.floating):
        raise ValueError(f"expected uint8 or float pixels, got {rgb.dtype} (shape {rgb.shape})")
    rgb = rgb.astype(np.float32, copy=False)
    lo, hi = rgb.min(), rgb.max()
    if not (lo >= 0.0 and hi <= 255.0):  # also false for NaN
        raise ValueError(
            f"expected finite pixels on [0, 255], got range [{lo}, {hi}] (shape {rgb.shape})"
        )
    return rgb


def _resize(channel: np.ndarray, new_h: int, new_w: int, interpolation: str) -> np.ndarray:
    """float32 ``[H, W]`` -> float32 ``[new_h, new_w]`` with Pillow (mode ``"F"``)."""
    if channel.shape == (new_h, new_w):
        return channel  # torchvision returns the image unchanged, and so does Pillow
    image = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))  # mode "F"
    resized = np.asarray(image.resize((new_w, new_h), resample=_RESAMPLE[interpolation]))
    if interpolation == "bicubic":
        # Bicubic overshoots near edges (bilinear and nearest cannot: their weights are convex).
        resized = np.clip(resized, 0.0, 255.0)
    return resized
