"""Confetti synthesizer: exact masks, blob geometry, determinism, replacement rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomalib_fcdd.models.fcdd.anomaly_generator import (
    COLOURED_BLOBS,
    GRAY_BLOBS,
    BlobFamily,
    ConfettiAnomalyGenerator,
    ConfettiNoise,
    _at_least_one_poisson,
)


def gray_images(batch: int, size: int = 240, level: float = 0.5) -> torch.Tensor:
    return torch.full((batch, 3, size, size), round(level * 255) / 255)


def test_mask_is_exactly_the_changed_pixels() -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 240, 240, generator=generator).mul(255).round().div(255)
    corrupted, mask = ConfettiNoise()(images, generator)
    changed = (corrupted != images).any(dim=1, keepdim=True)
    assert mask.dtype == torch.bool and mask.shape == (6, 1, 240, 240)
    assert torch.equal(mask, changed)
    assert mask.flatten(1).any(1).all(), "every image gets at least one blob"


def test_smoothed_mask_is_exactly_the_changed_pixels() -> None:
    generator = torch.Generator().manual_seed(2)
    images = gray_images(3)
    corrupted, mask = ConfettiNoise(smooth=True)(images, generator)
    assert torch.equal(mask, (corrupted != images).any(dim=1, keepdim=True))
    # Smoothing spreads the change: some changed pixels differ by less than the smallest unsmoothed blob value.
    diff = (corrupted - images).abs().amax(dim=1)[mask[:, 0]] * 255
    assert (diff < 0.5 * 255).any()


def test_single_unrotated_blob_sizes_within_range() -> None:
    one_blob = BlobFamily(expected_count=1e-9, gray=True)
    confetti = ConfettiNoise(families=(one_blob,), max_rotation=0.0)
    generator = torch.Generator().manual_seed(3)
    _, mask = confetti(gray_images(200), generator)
    sides = []
    for m in mask[:, 0].numpy():
        rows, cols = np.nonzero(m)
        assert rows.size > 0
        if rows.min() == 0 or cols.min() == 0 or rows.max() == 239 or cols.max() == 239:
            continue  # clipped at the border
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert height == width and m.sum() == height * width, "an unrotated blob is a filled square"
        sides.append(height)
    assert len(sides) > 100
    assert min(sides) >= 8 and max(sides) <= 54
    assert min(sides) < 14 and max(sides) > 48, "sizes cover the range"


def test_rotated_blob_stays_within_rotated_square_bounds() -> None:
    one_blob = BlobFamily(expected_count=1e-9, gray=True)
    generator = torch.Generator().manual_seed(4)
    _, mask = ConfettiNoise(families=(one_blob,))(gray_images(100), generator)
    for m in mask[:, 0].numpy():
        _, count = ndimage.label(m)
        assert count == 1
        rows, cols = np.nonzero(m)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= math.ceil(54 * math.sqrt(2)) + 2
        assert m.sum() >= 8 * 8 * 0.8  # nearest-neighbour rotation keeps the area roughly


def test_blob_sizes_scale_with_image_size() -> None:
    one_blob = BlobFamily(expected_count=1e-9, gray=True)
    generator = torch.Generator().manual_seed(5)
    _, mask = ConfettiNoise(families=(one_blob,), max_rotation=0.0)(gray_images(50, size=60), generator)
    areas = mask.flatten(1).sum(1).float()
    assert areas.max() <= (54 / 4 + 1) ** 2
    assert areas.min() >= 1


def test_coloured_blobs_darken_every_channel_and_gray_blobs_are_black() -> None:
    generator = torch.Generator().manual_seed(6)
    white = torch.ones(20, 3, 240, 240)
    corrupted, mask = ConfettiNoise(families=(COLOURED_BLOBS,))(white, generator)
    inside = corrupted.permute(0, 2, 3, 1)[mask[:, 0]]
    assert (inside < 1).all(), "colours are in [-256, -1]: every channel darkens"
    corrupted, mask = ConfettiNoise(families=(GRAY_BLOBS,))(white, generator)
    assert (corrupted.permute(0, 2, 3, 1)[mask[:, 0]] == 0).all()


def test_black_image_gets_brightened_by_inversion_rule() -> None:
    generator = torch.Generator().manual_seed(7)
    black = torch.zeros(4, 3, 64, 64)
    corrupted, mask = ConfettiNoise()(black, generator)
    assert mask.flatten(1).any(1).all()
    assert (corrupted >= black).all() and (corrupted > 0).any()


def test_deterministic_under_a_seed() -> None:
    images = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    first = ConfettiAnomalyGenerator()(images, torch.Generator().manual_seed(42))
    second = ConfettiAnomalyGenerator()(images, torch.Generator().manual_seed(42))
    third = ConfettiAnomalyGenerator()(images, torch.Generator().manual_seed(43))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[1], third[1])


@pytest.mark.parametrize("probability", [0.5, 0.2])
def test_replacement_rate(probability: float) -> None:
    generator = torch.Generator().manual_seed(8)
    images = gray_images(4000, size=16)
    out, masks, replaced = ConfettiAnomalyGenerator(probability=probability)(images, generator)
    rate = replaced.float().mean().item()
    assert abs(rate - probability) < 4 * math.sqrt(probability * (1 - probability) / 4000)
    assert torch.equal(masks.flatten(1).any(1), replaced)
    assert torch.equal(out[~replaced], images[~replaced])


def test_image_level_masks_cover_replaced_images() -> None:
    generator = torch.Generator().manual_seed(9)
    _, masks, replaced = ConfettiAnomalyGenerator(probability=0.5, image_level_masks=True)(
        gray_images(16, 32), generator
    )
    assert masks[replaced].all() and not masks[~replaced].any()


@pytest.mark.parametrize("rate", [COLOURED_BLOBS.expected_count, GRAY_BLOBS.expected_count])
def test_blob_counts_follow_zero_truncated_poisson(rate: float) -> None:
    counts = _at_least_one_poisson(20000, rate, torch.device("cpu"), torch.Generator().manual_seed(10))
    assert counts.min() >= 1
    expected_mean = rate / (1 - math.exp(-rate))
    assert counts.float().mean().item() == pytest.approx(expected_mean, rel=0.03)
