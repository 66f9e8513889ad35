"""Image files and arrays -> float32 RGB pixels ``[H, W, 3]`` on ``[0, 255]``, by one mode rule.

Every image featsim measures goes through :func:`load_rgb`, so natural and medical images of any
format, mode and bit depth reach the backbones the same way. Decoding sniffs the content, not
the file name (some ``.jpg`` files are PNGs); a file is DICOM when it carries ``DICM`` at byte
128 or its name ends in ``.dcm``, otherwise Pillow opens it. The rule is named by
:data:`MODE_RULE` (record it with results; it enters :class:`featsim.data.transforms.Transform`'s
cache key) and listed in :data:`MODE_RULES`:

=============================  ===================================================================
input                          rule
=============================  ===================================================================
``L`` (8-bit gray)             ``(g, g, g)``: Gu & Lee (2024)'s I_RGB = I_gray x [1, 1, 1]
``1`` (bilevel)                0 / 255, replicated
``I;16``, ``I;16B`` ...        16-bit gray: ``g * 255 / 65535`` as float (no rounding to 8 bits),
                               replicated
``I`` (32-bit int gray)        within [0, 65535] (older Pillow opened 16-bit PNGs as ``I``): as
                               16-bit; otherwise min-max to [0, 255] (a constant image -> 0)
``F`` (32-bit float gray)      min-max to [0, 255] (a file declares no float range; constant ->
                               0); NaN or inf -> :class:`ImageDecodeError`
``P`` (palette)                through the palette to RGB, or to RGBA when it has transparency
``LA``, ``PA``, ``RGBA``       alpha composited onto black: ``c * a / 255``. Medical images have
                               black backgrounds, and Pillow's ``convert("RGB")`` would expose the
                               colour stored under transparent pixels. Opaque pixels unchanged.
tRNS transparency              ``1``/``L``/``RGB`` with a transparent colour key: to RGBA, then
                               the alpha rule
``RGB``                        as is
``RGBX``, ``CMYK``, ``YCbCr``  Pillow's ``convert("RGB")``
other modes (HSV, LAB, ...)    :class:`ImageDecodeError`
16-bit colour PNG/TIFF         Pillow opens them as 8-bit ``RGB``/``RGBA`` (the high byte)
several frames                 first frame of animations and multi-picture files (GIF, APNG,
                               WebP, MPO); a multi-page TIFF (a stack) -> error
EXIF orientation, ICC profile  not applied (as torchvision's and timm's PIL loaders)
array shape                    ``[H, W]`` or ``[H, W, 1]`` gray, replicated; ``[H, W, 2]`` gray +
                               alpha; ``[H, W, 3]`` RGB; ``[H, W, 4]`` RGBA (alpha rule)
array dtype                    uint8 as is; uint16 ``* 255 / 65535``; float in [0, 1] ``* 255``;
                               anything else (or a float outside [0, 1]) -> error
DICOM gray                     ``pixel_array`` -> modality LUT (rescale slope/intercept) -> VOI
                               LUT, else the window (pydicom), mapped from the VOI output range
                               to [0, 255]; with neither, min-max; ``MONOCHROME1`` inverted
DICOM colour                   RGB (pydicom converts YBR) ``* 255 / (2**BitsStored - 1)``;
                               ``PALETTE COLOR`` through its LUT
DICOM with several frames      :class:`ImageDecodeError` naming the frame count
=============================  ===================================================================

Truncated or corrupt files raise :class:`ImageDecodeError` naming the file: Pillow's lazy
decoding is forced inside the error handling, and featsim never sets Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` (which fills missing data with grey instead of failing).
Nothing is rounded to 8 bits along the way, so 16-bit and DICOM images keep their precision.

Reference: Gu & Lee (2024), Bioengineering 11(4):406 (grayscale-to-RGB replication).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from featsim.data.items import Item

__all__ = [
    "MODE_RULE",
    "MODE_RULES",
    "ImageDecodeError",
    "decode_bytes",
    "decode_file",
    "load_rgb",
    "to_rgb",
]

# Bump the version whenever any entry of MODE_RULES changes meaning: it is part of cache keys.
MODE_RULE = "featsim-rgb-v1"

# (input, rule) pairs, the docstring's table in short; dict(MODE_RULES) is JSON for results.
MODE_RULES: tuple[tuple[str, str], ...] = (
    ("L", "(g, g, g): Gu & Lee 2024 replication I_RGB = I_gray x [1, 1, 1]"),
    ("1", "0 / 255, replicated"),
    ("I;16 I;16B I;16L I;16N", "16-bit gray: g * 255 / 65535 as float, no 8-bit rounding"),
    ("I", "32-bit int gray: within [0, 65535] as 16-bit, else min-max to [0, 255]"),
    ("F", "32-bit float gray: min-max to [0, 255]; non-finite -> error"),
    ("P", "palette -> RGB, or RGBA when the palette has transparency"),
    ("LA PA RGBA", "alpha composited onto black: c * a / 255 (opaque pixels unchanged)"),
    ("tRNS", "1/L/RGB with a transparent colour key -> RGBA, then the alpha rule"),
    ("RGB", "as is"),
    ("RGBX CMYK YCbCr", "Pillow convert('RGB')"),
    ("other Pillow modes", "error"),
    ("16-bit colour PNG/TIFF", "as Pillow opens them: 8-bit RGB/RGBA (high byte)"),
    ("frames", "first frame of GIF/APNG/WebP/MPO; multi-page TIFF -> error"),
    ("EXIF orientation, ICC profile", "not applied"),
    ("array shape", "[H,W] or [H,W,1] gray, [H,W,2] gray+alpha, [H,W,3] RGB, [H,W,4] RGBA"),
    ("array dtype", "uint8 as is, uint16 * 255/65535, float in [0,1] * 255, else error"),
    (
        "DICOM gray",
        "modality LUT, then VOI LUT or window mapped from its output range to [0, 255], "
        "else min-max; MONOCHROME1 inverted",
    ),
    ("DICOM colour", "RGB (YBR via pydicom) * 255 / (2**BitsStored - 1); PALETTE COLOR via LUT"),
    ("DICOM frames", "more than one frame -> error"),
)

# Formats whose extra frames are further images of a stack, not an animation: no frame is
# "the" image, so decoding one would silently drop data.
_STACK_FORMATS = ("TIFF",)
_DICOM_MAGIC = b"DICM"


class ImageDecodeError(ValueError):
    """An image file or array that featsim cannot turn into RGB pixels.

    Attributes:
        name: the file path (or ``array <id>``) that failed.
        cause: why, in words.
    """

    def __init__(self, name: str, cause: str):
        super().__init__(f"cannot decode {name}: {cause}")
        self.name = name
        self.cause = cause

    def __reduce__(self):
        # Survives pickling across process pools (the default would call __init__(message)).
        return type(self), (self.name, self.cause)


def load_rgb(item: Item) -> np.ndarray:
    """Decodes one :class:`~featsim.data.items.Item` by the mode rule.

    Args:
        item: a file item (``item.path``) or an in-memory item (``item.array``).

    Returns:
        float32 array of shape ``[H, W, 3]``, C-contiguous, finite, on ``[0, 255]``.

    Raises:
        ImageDecodeError: the file or array cannot be decoded; the message names
            ``item.name`` (the path, or ``array <id>``).
        FileNotFoundError: the file does not exist.

    Example:
        >>> load_rgb(Item("x", array=np.zeros((2, 3), np.uint8))).shape
        (2, 3, 3)
    """
    if item.path is not None:
        return decode_file(item.path)
    return to_rgb(item.array, name=item.name)


def decode_file(path: str | Path) -> np.ndarray:
    """Decodes an image file (any Pillow format, or DICOM), sniffing its content.

    Args:
        path: the file.

    Returns:
        float32 array of shape ``[H, W, 3]`` on ``[0, 255]``.

    Raises:
        ImageDecodeError: corrupt, truncated, empty or unsupported file (the message names it).
        FileNotFoundError: the file does not exist.
        ImportError: a DICOM file and pydicom is not installed.
    """
    path = Path(path)
    return decode_bytes(path.read_bytes(), name=str(path))


def decode_bytes(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decodes an encoded image held in memory.

    Args:
        data: the file's content.
        name: what error messages call it (a path); a name ending in ``.dcm`` also selects
            DICOM for files written without the 128-byte preamble.

    Returns:
        float32 array of shape ``[H, W, 3]`` on ``[0, 255]``.

    Raises:
        ImageDecodeError: the data cannot be decoded (the message names ``name``).
        ImportError: DICOM data and pydicom is not installed.
    """
    has_preamble = data[128:132] == _DICOM_MAGIC
    if has_preamble or name.lower().endswith(".dcm"):
        return _decode_dicom(data, name, force=not has_preamble)
    return _decode_pillow(data, name)


def to_rgb(pixels: np.ndarray | Image.Image, *, name: str = "array") -> np.ndarray:
    """Applies the mode rule to decoded pixels: a Pillow image or an array.

    Args:
        pixels: a loaded ``PIL.Image.Image`` (any mode in :data:`MODE_RULES`), or an array of
            shape ``[H, W]``, ``[H, W, 1]``, ``[H, W, 2]``, ``[H, W, 3]`` or ``[H, W, 4]``,
            dtype uint8, uint16 or float (on ``[0, 1]``).
        name: what error messages call the input.

    Returns:
        float32 array of shape ``[H, W, 3]``, C-contiguous, on ``[0, 255]``.

    Raises:
        ImageDecodeError: an unsupported mode, shape or dtype, an empty image, or float values
            that are not finite or (arrays) leave ``[0, 1]``.
    """
    if isinstance(pixels, Image.Image):
        return _pil_to_rgb(pixels, name)
    return _array_to_rgb(np.asarray(pixels), name)


# --------------------------------------------------------------------------- arrays


def _array_to_rgb(a: np.ndarray, name: str) -> np.ndarray:
    what = f"shape {a.shape}, {a.dtype}"  # as given, for messages
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageDecodeError(
            name,
            f"expected a non-empty array of shape [H, W] or [H, W, C] with C in 1..4, got {what}",
        )
    if a.dtype.kind == "u" and a.dtype.itemsize == 1:
        # The common case stays in float32: exact for integers up to 2**24.
        x, full = a.astype(np.float32), 255.0
    elif a.dtype.kind == "u" and a.dtype.itemsize == 2:  # either byte order (I;16B)
        x, full = a.astype(np.float64) * (255.0 / 65535.0), 255.0
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float64)
        lo, hi = (x.min(), x.max()) if np.isfinite(x).all() else (np.nan, np.nan)
        if not (lo >= 0.0 and hi <= 1.0):
            raise ImageDecodeError(
                name,
                f"float pixels must be finite and on [0, 1], got range [{lo}, {hi}] ({what})",
            )
        x, full = x * 255.0, 255.0
    else:
        raise ImageDecodeError(
            name,
            f"pixel dtype must be uint8, uint16 or float on [0, 1], got {what}",
        )
    n_color = 1 if x.shape[-1] <= 2 else 3
    color = x[..., :n_color]
    if x.shape[-1] in (2, 4):
        # alpha / full is exactly 1 for opaque pixels, so opaque images are unchanged.
        color = color * (x[..., n_color:] / full)
    rgb = np.broadcast_to(color, (*x.shape[:2], 3)) if n_color == 1 else color
    return np.ascontiguousarray(rgb, dtype=np.float32)


def _replicate(gray: np.ndarray) -> np.ndarray:
    """float ``[H, W]`` on [0, 255] -> float32 ``[H, W, 3]``."""
    return np.ascontiguousarray(np.broadcast_to(gray[..., None], (*gray.shape, 3)), np.float32)


def _min_max(v: np.ndarray, name: str) -> np.ndarray:
    """float64 ``[H, W]`` stretched to [0, 255] (a constant image -> 0)."""
    v = v.astype(np.float64)
    if not np.isfinite(v).all():
        raise ImageDecodeError(name, f"non-finite pixel values (shape {v.shape})")
    lo, hi = v.min(), v.max()
    if hi == lo:
        return np.zeros_like(v)
    return (v - lo) * (255.0 / (hi - lo))


# --------------------------------------------------------------------------- Pillow


def _decode_pillow(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            n_frames = getattr(image, "n_frames", 1) if image.format in _STACK_FORMATS else 1
            if n_frames > 1:
                raise ImageDecodeError(
                    name,
                    f"{image.format} with {n_frames} frames (a stack); featsim decodes single "
                    f"images only",
                )
            # Pillow decodes lazily: load() here so that truncated data fails inside this try.
            image.load()
            rgb = _pil_to_rgb(image, name)
    except ImageDecodeError:
        raise
    except Exception as exc:  # any Pillow failure on this data means the file is bad
        raise ImageDecodeError(name, f"{type(exc).__name__}: {exc}") from exc
    return rgb


def _pil_int32(image: Image.Image, name: str) -> np.ndarray:
    v = np.asarray(image)
    if v.size and v.min() >= 0 and v.max() <= 65535:
        return _array_to_rgb(v.astype(np.uint16), name)
    return _replicate(_min_max(v, name))


def _pil_float(image: Image.Image, name: str) -> np.ndarray:
    return _replicate(_min_max(np.asarray(image), name))


def _pil_palette(image: Image.Image, name: str) -> np.ndarray:
    mode = "RGBA" if "transparency" in image.info else "RGB"
    return _array_to_rgb(np.asarray(image.convert(mode)), name)


def _pil_convert(mode: str) -> Callable[[Image.Image, str], np.ndarray]:
    return lambda image, name: _array_to_rgb(np.asarray(image.convert(mode)), name)


def _pil_as_array(image: Image.Image, name: str) -> np.ndarray:
    return _array_to_rgb(np.asarray(image), name)


# Pillow mode -> converter; the table of the module docstring.
_PIL_MODES: dict[str, Callable[[Image.Image, str], np.ndarray]] = {
    "1": _pil_convert("L"),
    "L": _pil_as_array,
    "I;16": _pil_as_array,
    "I;16B": _pil_as_array,
    "I;16L": _pil_as_array,
    "I;16N": _pil_as_array,
    "I": _pil_int32,
    "F": _pil_float,
    "P": _pil_palette,
    "PA": _pil_convert("RGBA"),
    "LA": _pil_as_array,
    "RGBA": _pil_as_array,
    "RGB": _pil_as_array,
    "RGBX": _pil_convert("RGB"),
    "CMYK": _pil_convert("RGB"),
    "YCbCr": _pil_convert("RGB"),
}
# Modes whose tRNS colour key Pillow turns into alpha on convert("RGBA").
_COLOR_KEY_MODES = ("1", "L", "RGB")


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise ImageDecodeError(name, f"empty image of size {image.width}x{image.height}")
    if image.mode in _COLOR_KEY_MODES and "transparency" in image.info:
        return _array_to_rgb(np.asarray(image.convert("RGBA")), name)
    convert = _PIL_MODES.get(image.mode)
    if convert is None:
        raise ImageDecodeError(
            name, f"unsupported image mode {image.mode!r}; supported: {sorted(_PIL_MODES)}"
        )
    return convert(image, name)


# --------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, name: str, *, force: bool) -> np.ndarray:
    try:
        import pydicom
        import pydicom.pixels
    except ImportError as exc:
        raise ImportError(
            f"decoding the DICOM file {name} needs pydicom: pip install pydicom"
        ) from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as exc:
        raise ImageDecodeError(
            name, f"not a readable DICOM file ({type(exc).__name__}: {exc})"
        ) from exc
    if n_frames > 1:
        raise ImageDecodeError(
            name, f"multi-frame DICOM with {n_frames} frames; featsim decodes single images only"
        )
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageDecodeError(name, "DICOM file without pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, truncated data, bad attributes
        raise ImageDecodeError(name, f"{type(exc).__name__}: {exc}") from exc
    if pixels.size == 0:
        raise ImageDecodeError(name, f"empty DICOM image of shape {pixels.shape}")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    try:
        if pixels.ndim == 3:
            if pixels.shape[-1] != 3:
                raise ImageDecodeError(
                    name, f"DICOM with {pixels.shape[-1]} samples per pixel; expected 1 or 3"
                )
            # pydicom's pixel_array already converts YBR_* to RGB.
            rgb = pixels.astype(np.float64) * (255.0 / (2.0 ** int(ds.BitsStored) - 1.0))
        elif photometric == "PALETTE COLOR":
            rgb = pydicom.pixels.apply_color_lut(pixels, ds)
            rgb = rgb.astype(np.float64) * (255.0 / np.iinfo(rgb.dtype).max)
        elif photometric in ("MONOCHROME1", "MONOCHROME2"):
            rgb = _dicom_gray(pydicom, ds, pixels, name)[..., None]
        else:
            raise ImageDecodeError(
                name, f"unsupported DICOM PhotometricInterpretation {photometric!r}"
            )
    except ImageDecodeError:
        raise
    except (ValueError, KeyError, AttributeError, NotImplementedError, TypeError) as exc:
        # Inconsistent LUT/window attributes.
        raise ImageDecodeError(name, f"{type(exc).__name__}: {exc}") from exc
    rgb = np.clip(rgb, 0.0, 255.0)
    return np.ascontiguousarray(np.broadcast_to(rgb, (*rgb.shape[:2], 3)), dtype=np.float32)


def _dicom_gray(pydicom, ds, pixels: np.ndarray, name: str) -> np.ndarray:
    """Gray DICOM -> float64 ``[H, W]`` on [0, 255] (modality LUT, VOI, MONOCHROME1)."""
    values = pydicom.pixels.apply_modality_lut(pixels, ds)
    if not np.isfinite(values).all():
        raise ImageDecodeError(name, "non-finite DICOM pixel values")
    voi_luts = ds.get("VOILUTSequence")
    has_lut = bool(voi_luts) and all(k in voi_luts[0] for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    # pydicom's apply_voi_lut preference: the VOI LUT over the window.
    if has_lut:
        out = pydicom.pixels.apply_voi(np.rint(values).astype(np.int64), ds, 0)
        lo, hi = 0.0, 2.0 ** int(voi_luts[0].LUTDescriptor[2]) - 1.0
    elif has_window:
        out = pydicom.pixels.apply_windowing(values, ds, 0)
        # The window's output range (pydicom derives it from the stored bit depth and the
        # rescale) is where -inf and +inf land.
        ends = pydicom.pixels.apply_windowing(np.array([-np.inf, np.inf]), ds, 0)
        lo, hi = float(ends.min()), float(ends.max())
    else:
        out = values
        lo, hi = float(values.min()), float(values.max())
    out = np.asarray(out, dtype=np.float64)
    unit = np.zeros_like(out) if hi == lo else np.clip((out - lo) / (hi - lo), 0.0, 1.0)
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return unit * 255.0
