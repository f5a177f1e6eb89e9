"""Confetti synthesizer: exact masks, blob geometry, determinism, replacement rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomalib_fcdd.models.fcdd import anomaly_generator
from anomalib_fcdd.models.fcdd.anomaly_generator import (
    COLOURED_BLOBS,
    GRAY_BLOBS,
    BlobFamily,
    ConfettiAnomalyGenerator,
    ConfettiNoise,
    _at_least_one_poisson,
    patch_fill,
    transformed_sources,
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


# ---------------------------------------------------------------------------------------------------------------------
# Patch fill: the blobs filled with another image's content
# ---------------------------------------------------------------------------------------------------------------------
def test_patch_fill_by_hand() -> None:
    """Inside the blob a pixel takes the source's value if that changes it by >= 8 grey levels; only those pixels are
    marked, and nothing else changes."""
    images = torch.zeros(1, 3, 2, 3)
    sources = torch.zeros(1, 3, 2, 3)
    sources[0, :, 0, 0] = 100 / 255  # in the blob, changed: pasted and marked
    sources[0, 1, 0, 1] = 4 / 255  # in the blob, 4 grey levels: neither pasted nor marked
    sources[0, :, 1, 2] = 200 / 255  # outside the blob: ignored
    blobs = torch.tensor([[[[True, True, False], [True, False, False]]]])
    filled, mask = patch_fill(images, blobs, sources)
    assert mask.tolist() == [[[[True, False, False], [False, False, False]]]]
    expected = torch.zeros(1, 3, 2, 3)
    expected[0, :, 0, 0] = 100 / 255
    torch.testing.assert_close(filled, expected, rtol=0, atol=0)


def test_transformed_sources_are_rigid_moves_of_batch_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the brightness change every output pixel is a pixel of one source image, and neighbouring output pixels
    come from neighbouring source pixels (a flip, turn or shift; mirrored at the borders)."""
    monkeypatch.setattr(anomaly_generator, "PATCH_BRIGHTNESS", 0.0)
    side = 8
    index = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side)
    images = torch.cat([index, index + 1000]).expand(2, 3, side, side) / 4096  # two images, disjoint values
    targets = torch.arange(40) % 2
    moved = transformed_sources(images, targets, torch.Generator().manual_seed(3))
    assert moved.shape == (40, 3, side, side)
    codes = (moved[:, 0] * 4096).round().long()
    for target, code in zip(targets.tolist(), codes, strict=True):
        source = 1 - target  # never the target itself
        assert bool((code >= 1000).all()) if source else bool((code < 1000).all()), "the other image, whole"
        position = code - 1000 * source
        rows, cols = position // side, position % side
        steps = (rows[:, 1:] - rows[:, :-1]).abs() + (cols[:, 1:] - cols[:, :-1]).abs()
        assert int(steps.max()) <= 1, "horizontal neighbours stay neighbours"
    assert len({tuple(code.flatten().tolist()) for code in codes}) > 20, "the moves differ"


def test_transformed_sources_keep_the_brightness_change_in_bounds() -> None:
    images = torch.full((3, 3, 16, 16), 0.4)
    moved = transformed_sources(images, torch.zeros(200, dtype=torch.long), torch.Generator().manual_seed(0))
    factors = moved[:, 0, 0, 0] / 0.4
    assert bool((moved == moved[:, :1, :1, :1]).all()), "a constant image stays constant"
    assert 0.75 - 1e-6 <= float(factors.min()) < 0.8 and 1.2 < float(factors.max()) <= 1.25 + 1e-6


def test_patch_confetti_marks_exactly_what_changed_and_leaves_the_rest() -> None:
    levels = torch.tensor([0.1, 0.4, 0.7, 1.0]).view(4, 1, 1, 1)
    images = (levels.expand(4, 3, 120, 120) * 255).round() / 255
    generator = ConfettiAnomalyGenerator(probability=1.0, fill="patch")
    out, masks, replaced = generator(images, torch.Generator().manual_seed(5))
    assert bool(replaced.all()) and bool(masks.any(dim=(1, 2, 3)).all()), "every image got at least one patch"
    change = (out - images).abs().amax(dim=1, keepdim=True)
    assert bool((change[masks] >= 8 / 255 - 1e-6).all())
    assert bool((change[~masks] == 0).all())


def test_anomaly_fill_is_colour_unless_asked_and_fcdd_keeps_colour() -> None:
    from anomalib_fcdd import Fcdd, FcddHsc
    from anomalib_fcdd.errors import ConfigurationError

    assert FcddHsc(pre_trained=False).anomaly_generator.fill == "colour"  # patch fill hurt stochastic textures
    assert FcddHsc(backbone="vgg11_bn", pre_trained=False).anomaly_generator.fill == "colour"  # the paper's
    assert FcddHsc(pre_trained=False, anomaly_fill="patch").anomaly_generator.fill == "patch"
    assert Fcdd(pre_trained=False, anomaly_fill="colour").anomaly_generator.fill == "colour"
    with pytest.raises(ConfigurationError, match="anomaly_fill"):
        FcddHsc(pre_trained=False, anomaly_fill="paint")
