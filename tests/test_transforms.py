"""Transforms: labels stay nearest-neighbour, crops are exact, image and label stay aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import pattern_image

from pixcli.data.transforms import (
    IMAGENET_MEAN,
    AugmentConfig,
    augment,
    color_jitter,
    denormalize,
    gaussian_blur,
    hflip,
    normalize,
    random_crop,
    random_scale_crop,
    resize,
)

LABEL_VALUES = np.array([0, 3, 7, 18, 255], dtype=np.uint8)


def _label(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random train ids from LABEL_VALUES: resampling that interpolates would create others."""
    return np.random.default_rng(seed).choice(LABEL_VALUES, size=size)


def _aligned_pair(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Blocky label and an image whose red channel is 10 * label id."""
    rows, cols = np.indices(size)
    label = ((rows // 4 + cols // 4) % 5).astype(np.uint8)
    return np.dstack([label * 10, label * 3, np.zeros(size, np.uint8)]), label


def test_normalize_shape_values_and_round_trip() -> None:
    image = pattern_image(3, (10, 14))
    x = normalize(image)
    assert x.shape == (3, 10, 14) and x.dtype == torch.float32
    grey = np.full((2, 2, 3), np.round(np.array(IMAGENET_MEAN) * 255), dtype=np.uint8)
    assert normalize(grey).abs().max() < 0.01
    np.testing.assert_array_equal(denormalize(x), image)
    np.testing.assert_array_equal(denormalize(torch.stack([x, x]))[1], image)


@pytest.mark.parametrize("size", [(5, 7), (17, 31), (40, 3)])
def test_resize_label_nearest(size: tuple[int, int]) -> None:
    image, label = pattern_image(0, (12, 16)), _label((12, 16))
    out_image, out_label = resize(image, label, size)
    assert out_image.shape == (*size, 3) and out_label.shape == size
    assert out_image.dtype == np.uint8 and out_label.dtype == np.uint8
    assert set(np.unique(out_label)) <= set(LABEL_VALUES)
    assert resize(image, None, size)[1] is None


def test_resize_image_is_bilinear() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    image[:, 1] = 200
    out, _ = resize(image, None, (2, 8))
    assert len(np.unique(out[0, :, 0])) > 2  # interpolated values between 0 and 200


@pytest.mark.parametrize("seed", range(6))
def test_random_scale_crop_exact_size_and_no_new_ids(seed: int) -> None:
    rng = np.random.default_rng(seed)
    image, label = pattern_image(seed, (30, 40)), _label((30, 40), seed)
    out_image, out_label = random_scale_crop(image, label, (24, 20), (0.5, 2.0), rng)
    assert out_image.shape == (24, 20, 3) and out_label.shape == (24, 20)
    assert set(np.unique(out_label)) <= set(LABEL_VALUES)


def test_crop_pads_with_ignore_and_zeros() -> None:
    image, label = pattern_image(1, (8, 10)) | 1, np.zeros((8, 10), np.uint8)
    out_image, out_label = random_crop(image, label, (12, 16), np.random.default_rng(0))
    assert out_image.shape == (12, 16, 3)
    assert (out_label[8:] == 255).all() and (out_label[:, 10:] == 255).all()
    assert (out_label[:8, :10] == 0).all()
    assert (out_image[8:] == 0).all() and (out_image[:, 10:] == 0).all()
    assert (out_image[:8, :10] > 0).all()


def test_scale_crop_small_scale_pads() -> None:
    image, label = pattern_image(2, (20, 20)), np.ones((20, 20), np.uint8)
    out_image, out_label = random_scale_crop(
        image, label, (16, 16), (0.5, 0.5), np.random.default_rng(0)
    )
    assert (out_label[:10, :10] == 1).all() and (out_label[10:] == 255).all()


def test_hflip_flips_both() -> None:
    image, label = _aligned_pair((8, 12))
    flipped_image, flipped_label = hflip(image, label)
    np.testing.assert_array_equal(flipped_label, label[:, ::-1])
    np.testing.assert_array_equal(flipped_image[:, :, 0], flipped_label * 10)
    assert hflip(image, None)[1] is None


def test_color_jitter() -> None:
    image = pattern_image(4, (16, 16))
    assert color_jitter(image, 0.0, np.random.default_rng(0)) is image
    a = color_jitter(image, 0.4, np.random.default_rng(1))
    b = color_jitter(image, 0.4, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == image.shape
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - image).mean() > 1


def test_gaussian_blur_smooths() -> None:
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert gaussian_blur(image, 0.0) is image
    blurred = gaussian_blur(image, 2.0)
    assert blurred.shape == image.shape and blurred.dtype == np.uint8
    assert blurred.std() < 0.5 * image.std()


@pytest.mark.parametrize("seed", range(4))
def test_augment_keeps_image_and_label_aligned(seed: int) -> None:
    image, label = _aligned_pair((24, 32))
    cfg = AugmentConfig(crop_size=(16, 16), scale_range=(1.0, 1.0), flip=True)
    out_image, out_label = augment(image, label, cfg, np.random.default_rng(seed))
    assert out_image.shape == (16, 16, 3) and out_label.shape == (16, 16)
    np.testing.assert_array_equal(out_image[:, :, 0], out_label * 10)


def test_augment_full_config_and_unlabelled() -> None:
    cfg = AugmentConfig(crop_size=(12, 20), base_size=(30, 40), color_jitter=0.3, blur_prob=1.0)
    image, label = pattern_image(5, (60, 80)), _label((60, 80))
    out_image, out_label = augment(image, label, cfg, np.random.default_rng(0))
    assert out_image.shape == (12, 20, 3) and out_label.shape == (12, 20)
    assert set(np.unique(out_label)) <= set(LABEL_VALUES)
    out_image, out_label = augment(image, None, cfg, np.random.default_rng(0))
    assert out_image.shape == (12, 20, 3) and out_label is None


def test_augment_without_crop_keeps_scaled_size() -> None:
    cfg = AugmentConfig(crop_size=None, base_size=(10, 20), scale_range=(2.0, 2.0), flip=False)
    out_image, out_label = augment(
        pattern_image(0, (5, 5)), _label((5, 5)), cfg, np.random.default_rng(0)
    )
    assert out_image.shape == (20, 40, 3) and out_label.shape == (20, 40)


def test_augment_is_fast_enough_for_cpu_training() -> None:
    import time

    cfg = AugmentConfig(crop_size=(128, 128), color_jitter=0.2, blur_prob=0.5)
    image, label = pattern_image(0, (160, 320)), _label((160, 320))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(20):
        augment(image, label, cfg, rng)
    assert (time.perf_counter() - start) / 20 < 0.05  # ~4 ms here; generous for loaded machines
