"""How a backbone expects its input pixels: a frozen value recorded with each registry entry.

The value only describes the recipe (resize, crop, pixel scaling); decoding and resizing
images is ``featsim.data.transforms``' job. The pixel scaling is simple enough to apply here,
so :meth:`Preprocessing.normalize` maps ``[0, 255]`` pixels to the network's input range.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "CROP_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "SCALING_MODES",
    "TORCHVISION_IMAGENET",
    "Preprocessing",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# "center": resize the shorter side to resize_size, then take the central input_size square
# (torchvision's Resize + CenterCrop). "none": resize the whole image to input_size.
CROP_MODES = ("center", "none")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# Pixel scaling, written for pixels p in [0, 255]:
#   "imagenet": (p / 255 - IMAGENET_MEAN) / IMAGENET_STD      (torchvision, timm)
#   "mean_std": (p / 255 - mean) / std with the entry's own mean and std
#   "[0,1]":    p / 255
#   "[-1,1]":   p / 127.5 - 1                                  (Keras "tf" mode, Inception)
#   "tf_lite":  (p - 127) / 128                                (TF-Lite/EfficientNet-Lite)
SCALING_MODES = ("imagenet", "mean_std", "[0,1]", "[-1,1]", "tf_lite")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The input recipe a backbone was trained with.

    Attributes:
        input_size: side of the square image the network sees (the crop size).
        resize_size: side the shorter image edge is resized to before a centre crop; equal
            to ``input_size`` when ``crop == "none"``.
        crop: one of :data:`CROP_MODES`.
        interpolation: resampling filter, one of :data:`INTERPOLATIONS`.
        antialias: whether downscaling is antialiased (PIL always is; torchvision's
            tensor path is when ``antialias=True``).
        scaling: one of :data:`SCALING_MODES`.
        mean: per-channel mean on ``[0, 1]`` pixels; only with ``scaling="mean_std"``.
        std: per-channel std on ``[0, 1]`` pixels; only with ``scaling="mean_std"``.

    Example:
        >>> p = Preprocessing(input_size=224, resize_size=256)
        >>> p.normalize(np.full((1, 224, 224, 3), 255, np.uint8)).shape
        (1, 224, 224, 3)
    """

    input_size: int
    resize_size: int
    crop: str = "center"
    interpolation: str = "bilinear"
    antialias: bool = True
    scaling: str = "imagenet"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.input_size <= 0 or self.resize_size <= 0:
            raise ValueError(
                f"input_size and resize_size must be positive, got input_size="
                f"{self.input_size}, resize_size={self.resize_size}"
            )
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.crop == "center" and self.resize_size < self.input_size:
            raise ValueError(
                f"a centre crop of {self.input_size} needs resize_size >= input_size, "
                f"got resize_size={self.resize_size}"
            )
        if self.crop == "none" and self.resize_size != self.input_size:
            raise ValueError(
                f'crop="none" resizes straight to input_size, so resize_size must equal '
                f"input_size={self.input_size}, got {self.resize_size}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if self.scaling not in SCALING_MODES:
            raise ValueError(f"scaling must be one of {SCALING_MODES}, got {self.scaling!r}")
        has_stats = self.mean is not None or self.std is not None
        if self.scaling == "mean_std":
            if self.mean is None or self.std is None:
                raise ValueError('scaling="mean_std" needs both mean and std')
            for field in ("mean", "std"):
                value = getattr(self, field)
                if len(value) != 3:
                    raise ValueError(f"{field} needs 3 channel values, got {value!r}")
                # Store tuples whatever sequence was given, so the value stays hashable.
                object.__setattr__(self, field, tuple(float(v) for v in value))
            if min(self.std) <= 0:
                raise ValueError(f"std must be positive, got {self.std!r}")
        elif has_stats:
            raise ValueError(
                f'mean/std are only used with scaling="mean_std", got scaling={self.scaling!r} '
                f"with mean={self.mean!r}, std={self.std!r}"
            )

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(scale, offset)`` with ``normalized = pixels * scale + offset``.

        Returns:
            Two float64 arrays of shape ``[3]`` for pixels in ``[0, 255]``.
        """
        if self.scaling in ("imagenet", "mean_std"):
            mean = np.asarray(IMAGENET_MEAN if self.scaling == "imagenet" else self.mean)
            std = np.asarray(IMAGENET_STD if self.scaling == "imagenet" else self.std)
            return 1.0 / (255.0 * std), -mean / std
        scale, offset = {
            "[0,1]": (1.0 / 255.0, 0.0),
            "[-1,1]": (1.0 / 127.5, -1.0),
            "tf_lite": (1.0 / 128.0, -127.0 / 128.0),
        }[self.scaling]
        return np.full(3, scale), np.full(3, offset)

    def normalize(self, pixels) -> np.ndarray:
        """Scales ``[0, 255]`` pixels to the network's input range.

        Args:
            pixels: uint8 or float array of shape ``[..., 3]`` (NHWC), values in ``[0, 255]``.

        Returns:
            float32 array of the same shape.

        Raises:
            ValueError: if the last axis is not 3 channels.
        """
        pixels = np.asarray(pixels)
        if pixels.ndim == 0 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels must have 3 channels last, got shape {pixels.shape}")
        scale, offset = self.affine()
        return (pixels.astype(np.float64) * scale + offset).astype(np.float32)


# torchvision's IMAGENET1K_V1 classification weights: Resize(256, bilinear, antialias),
# CenterCrop(224), ImageNet mean/std.
TORCHVISION_IMAGENET = Preprocessing(input_size=224, resize_size=256)
