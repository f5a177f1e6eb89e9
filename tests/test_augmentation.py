"""Training augmentation: joint crop/resize alignment, probabilities, noise rule."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_fcdd.models.fcdd.augmentation import FcddAugmentation, gaussian_noise, joint_crop_or_resize, rotate_hue


def test_crop_keeps_marked_pixel_under_its_mask() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = 64
    images = torch.zeros(batch, 3, 240, 240)
    masks = torch.zeros(batch, 1, 240, 240, dtype=torch.bool)
    ys = torch.randint(20, 220, (batch,), generator=generator)
    xs = torch.randint(20, 220, (batch,), generator=generator)
    for i in range(batch):
        images[i, :, ys[i], xs[i]] = 1.0
        masks[i, 0, ys[i], xs[i]] = True
    out_images, out_masks = joint_crop_or_resize(images, masks, 224, 0.5, generator)
    assert out_images.shape == (batch, 3, 224, 224) and out_masks.shape == (batch, 1, 224, 224)
    visible = out_images[:, 0] > 0
    # Wherever the marked pixel survived, the mask marks exactly the same pixels.
    assert torch.equal(visible, out_masks[:, 0])


def test_crop_is_an_exact_window() -> None:
    images = torch.arange(240 * 240, dtype=torch.float32).view(1, 1, 240, 240).expand(100, 3, 240, 240)
    masks = torch.zeros(100, 1, 240, 240, dtype=torch.bool)
    out, _ = joint_crop_or_resize(images, masks, 224, 1.0, torch.Generator().manual_seed(1))
    top_left = out[:, 0, 0, 0].long()
    oy, ox = top_left // 240, top_left % 240
    expected = images[0, 0][None].expand(100, -1, -1)
    for i in range(0, 100, 17):
        window = expected[i, oy[i] : oy[i] + 224, ox[i] : ox[i] + 224]
        assert torch.equal(out[i, 0], window)
    assert oy.min() >= 0 and oy.max() <= 16 and len(set(oy.tolist())) > 5


def test_crop_probability_within_tolerance() -> None:
    n = 600
    images = torch.arange(240 * 240, dtype=torch.float32).view(1, 1, 240, 240).expand(n, 1, 240, 240)
    out, _ = joint_crop_or_resize(images, torch.zeros(n, 1, 240, 240), 224, 0.5, torch.Generator().manual_seed(2))
    # A resize keeps both image corners; a crop keeps both only with offset (0, 0) and (16, 16) -- impossible.
    resized = (out[:, 0, 0, 0] == 0) & (out[:, 0, -1, -1] == 240 * 240 - 1)
    rate = 1 - resized.float().mean().item()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / n)


def test_noise_probability_and_std_rule() -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(4000, 3, 16, 16, generator=generator) * 0.5 + 0.25
    noisy = gaussian_noise(images, 0.5, 0.1, generator)
    changed = (noisy != images).flatten(1).any(1)
    assert abs(changed.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / 4000)
    ratio = (noisy - images)[changed].flatten(1).std(1) / images[changed].flatten(1).std(1)
    assert ratio.mean().item() == pytest.approx(0.1, abs=0.01)


def test_hue_rotation_keeps_gray_and_full_turn_is_identity() -> None:
    gray = torch.full((2, 3, 4, 4), 0.4)
    torch.testing.assert_close(rotate_hue(gray, torch.tensor([0.3, -0.2])), gray)
    colour = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.25
    torch.testing.assert_close(rotate_hue(colour, torch.tensor([2 * math.pi, 0.0])), colour, atol=1e-5, rtol=0)


def test_full_augmentation_shapes_and_range() -> None:
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(8, 3, 240, 240, generator=generator)
    masks = torch.rand(8, 1, 240, 240, generator=generator) > 0.9
    out, out_masks = FcddAugmentation(224)(images, masks, generator)
    assert out.shape == (8, 3, 224, 224) and out_masks.dtype == torch.bool
    assert out.min() >= 0 and out.max() <= 1


def test_rectangular_crop_is_an_exact_window_and_resize_picks_nearest_pixels() -> None:
    height, width = 103, 154  # 96 x 144 scaled by 240/224, rounded as the pre-processor does
    images = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width).expand(40, 3, height, width)
    masks = torch.zeros(40, 1, height, width, dtype=torch.bool)
    crops, _ = joint_crop_or_resize(images, masks, (96, 144), 1.0, torch.Generator().manual_seed(2))
    assert crops.shape == (40, 3, 96, 144)
    top_left = crops[:, 0, 0, 0].long()
    oy, ox = top_left // width, top_left % width
    for i in range(0, 40, 7):
        assert torch.equal(crops[i, 0], images[0, 0, oy[i] : oy[i] + 96, ox[i] : ox[i] + 144])
    assert oy.min() >= 0 and oy.max() <= height - 96 and ox.min() >= 0 and ox.max() <= width - 144
    resized, _ = joint_crop_or_resize(images[:1], masks[:1], (96, 144), 0.0)
    rows = torch.floor((torch.arange(96) + 0.5) * height / 96).long()  # nearest source row of each output row
    columns = torch.floor((torch.arange(144) + 0.5) * width / 144).long()
    torch.testing.assert_close(resized[0, 0], images[0, 0][rows][:, columns], rtol=0, atol=0)


def test_bilinear_resize_branch_samples_images_smoothly_and_masks_nearest() -> None:
    images = torch.rand(2, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    masks = torch.rand(2, 1, 240, 240, generator=torch.Generator().manual_seed(1)) > 0.5
    out, out_masks = joint_crop_or_resize(images, masks, 224, crop_probability=0.0, resize="bilinear")
    expected = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)  # the affine grid rounds in float32
    _, nearest_masks = joint_crop_or_resize(images, masks, 224, crop_probability=0.0, resize="nearest")
    assert torch.equal(out_masks, nearest_masks)


def test_bilinear_crops_are_exact_pixel_windows() -> None:
    images = torch.rand(3, 3, 240, 240, generator=torch.Generator().manual_seed(2))
    masks = torch.zeros(3, 1, 240, 240, dtype=torch.bool)
    generator = torch.Generator().manual_seed(3)
    smooth, _ = joint_crop_or_resize(images, masks, 224, 1.0, torch.Generator().manual_seed(3), resize="bilinear")
    exact, _ = joint_crop_or_resize(images, masks, 224, 1.0, generator, resize="nearest")
    torch.testing.assert_close(smooth, exact, rtol=0, atol=1e-4)
