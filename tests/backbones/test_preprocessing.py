"""The Preprocessing value: validation, immutability and pixel scaling."""

import dataclasses

import numpy as np
import pytest

from featsim.backbones import IMAGENET_MEAN, IMAGENET_STD, TORCHVISION_IMAGENET, Preprocessing

PIXELS = np.array([[0, 127, 255], [64, 128, 192]], np.uint8)


def test_torchvision_imagenet_recipe():
    p = TORCHVISION_IMAGENET
    assert (p.input_size, p.resize_size, p.crop, p.interpolation) == (
        224,
        256,
        "center",
        "bilinear",
    )
    assert p.scaling == "imagenet"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.input_size = 299  # type: ignore[misc]
    assert hash(p) == hash(Preprocessing(input_size=224, resize_size=256))


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        ("imagenet", (PIXELS / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)),
        ("[0,1]", PIXELS / 255.0),
        ("[-1,1]", PIXELS / 127.5 - 1.0),
        ("tf_lite", (PIXELS - 127.0) / 128.0),
    ],
)
def test_normalize(scaling, expected):
    p = Preprocessing(input_size=8, resize_size=8, crop="none", scaling=scaling)
    got = p.normalize(PIXELS)
    assert got.dtype == np.float32 and got.shape == PIXELS.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_mean_std_mode():
    p = Preprocessing(
        input_size=8, resize_size=9, scaling="mean_std", mean=[0.5] * 3, std=[0.25] * 3
    )
    assert p.mean == (0.5, 0.5, 0.5)  # stored as a tuple: hashable
    np.testing.assert_allclose(p.normalize(PIXELS), (PIXELS / 255.0 - 0.5) / 0.25, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(crop="random"), "crop must be one of"),
        (dict(interpolation="lanczos"), "interpolation must be one of"),
        (dict(scaling="caffe"), "scaling must be one of"),
        (dict(scaling="mean_std"), "needs both mean and std"),
        (dict(mean=(0.5, 0.5, 0.5)), 'only used with scaling="mean_std"'),
        (dict(resize_size=200), "resize_size >= input_size"),
        (dict(crop="none"), "must equal input_size"),
        (dict(input_size=0), "must be positive"),
        (dict(scaling="mean_std", mean=(1, 2), std=(1, 1, 1)), "3 channel values"),
    ],
)
def test_validation(kwargs, match):
    args = dict(input_size=224, resize_size=256) | kwargs
    with pytest.raises(ValueError, match=match):
        Preprocessing(**args)


def test_normalize_needs_channels_last():
    with pytest.raises(ValueError, match="3 channels last"):
        TORCHVISION_IMAGENET.normalize(np.zeros((1, 3, 4, 4)))
