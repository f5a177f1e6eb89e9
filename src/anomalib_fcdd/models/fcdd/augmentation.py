"""The reference's training augmentation (``lcnaug1``), vectorised over a batch on its own device.

Order, per image (the paper's sec. 4), applied after the anomaly has been drawn at 240 x 240:

1. jointly on image and mask: 50/50 a random 224 crop or a nearest-neighbour resize to 224;
2. 50/50 one of two colour jitters, ``ColorJitter(0.04, 0.04, 0.04, 0.04)`` or ``ColorJitter(0.005, 5e-4, 5e-4, 5e-4)``;
3. with probability 0.5, Gaussian noise of std ``0.1 * std(image)`` on every pixel, then clamp to [0, 1].

LCN and min-max follow inside the network. Differences to torchvision's ColorJitter, all below the jitter's own
magnitude: the four adjustments run in a fixed order (brightness, contrast, saturation, hue) instead of a random one,
and hue is rotated in YIQ space instead of HSV.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

#: (brightness, contrast, saturation, hue) of the two jitters the reference picks from.
STRONG_JITTER = (0.04, 0.04, 0.04, 0.04)
WEAK_JITTER = (0.005, 0.0005, 0.0005, 0.0005)

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY = torch.tensor([0.299, 0.587, 0.114])


def joint_crop_or_resize(
    images: torch.Tensor,
    masks: torch.Tensor,
    size: int | tuple[int, int],
    crop_probability: float = 0.5,
    generator: torch.Generator | None = None,
    resize: str = "nearest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, a random ``size`` crop (probability ``crop_probability``) or a resize to ``size``.

    ``size`` is a side or ``(height, width)``. Both are one ``grid_sample`` with a per-image affine grid, so image and
    mask (``B x 1 x H x W``) stay pixel-aligned: a crop maps output pixel ``i`` to input pixel ``offset + i`` exactly.
    Images are sampled ``nearest`` (the reference's) or ``bilinear`` (``resize``; a crop hits pixel centres, so it is
    exact either way), masks always nearest.
    """
    out_height, out_width = (size, size) if isinstance(size, int) else size
    batch, _, height, width = images.shape
    device = images.device
    crop = torch.rand(batch, device=device, generator=generator) < crop_probability
    offset_y = torch.floor(torch.rand(batch, device=device, generator=generator) * (height - out_height + 1))
    offset_x = torch.floor(torch.rand(batch, device=device, generator=generator) * (width - out_width + 1))
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = torch.where(crop, torch.full_like(offset_x, out_width / width), torch.ones_like(offset_x))
    theta[:, 1, 1] = torch.where(crop, torch.full_like(offset_y, out_height / height), torch.ones_like(offset_y))
    theta[:, 0, 2] = torch.where(crop, (2 * offset_x + out_width) / width - 1, torch.zeros_like(offset_x))
    theta[:, 1, 2] = torch.where(crop, (2 * offset_y + out_height) / height - 1, torch.zeros_like(offset_y))
    grid = F.affine_grid(theta, [batch, 1, out_height, out_width], align_corners=False)
    out_images = F.grid_sample(images, grid.to(images.dtype), mode=resize, align_corners=False)
    out_masks = F.grid_sample(masks.float(), grid, mode="nearest", align_corners=False) > 0.5
    return out_images, out_masks


def _factor(strength: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform in [1 - strength, 1 + strength], one per image."""
    noise = torch.rand(strength.shape, device=strength.device, generator=generator) * 2 - 1
    return (1 + strength * noise).clamp_min(0)


def color_jitter(
    images: torch.Tensor, strengths: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter with per-image strengths (``B x 4``).

    Each step works in place on one new tensor (the input stays as it is), so a batch costs one image-sized block
    and two single-channel ones instead of a fresh block per arithmetic step.
    """
    view = (-1, 1, 1, 1)
    gray_weights = _GRAY.to(images.device, images.dtype)
    images = (images * _factor(strengths[:, 0], generator).view(view)).clamp_(0, 1)
    gray_mean = _luma(images, gray_weights).mean(dim=(2, 3), keepdim=True)
    contrast = _factor(strengths[:, 1], generator).view(view)
    images.mul_(contrast).add_((1 - contrast) * gray_mean).clamp_(0, 1)
    gray = _luma(images, gray_weights)
    saturation = _factor(strengths[:, 2], generator).view(view)
    images.mul_(saturation).add_((1 - saturation) * gray).clamp_(0, 1)
    hue = (torch.rand(images.shape[0], device=images.device, generator=generator) * 2 - 1) * strengths[:, 3]
    return rotate_hue(images, hue * 2 * math.pi)


def _luma(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_c w_c x_c`` as ``B x 1 x H x W``, accumulated channel by channel (no 3-channel temporary)."""
    luma = images[:, 0:1] * weights[0]
    for channel in range(1, images.shape[1]):
        luma.add_(images[:, channel : channel + 1] * weights[channel])
    return luma


def rotate_hue(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of YIQ by ``angles`` radians per image; luma is unchanged."""
    to_yiq = _RGB_TO_YIQ.to(images.device, images.dtype)
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rotation = torch.zeros(images.shape[0], 3, 3, device=images.device, dtype=images.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    transform = from_yiq @ rotation @ to_yiq  # B x 3 x 3
    return torch.einsum("bij,bjhw->bihw", transform, images).clamp_(0, 1)


def gaussian_noise(
    images: torch.Tensor, probability: float = 0.5, relative_std: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """With ``probability`` per image, add N(0, (relative_std * std(image))^2) to every value; clamp to [0, 1].

    The noise tensor becomes the result (scaled, shifted by the image and clamped in place): one new block.
    """
    batch = images.shape[0]
    chosen = torch.rand(batch, device=images.device, generator=generator) < probability
    std = images.flatten(1).std(dim=1) * relative_std * chosen
    noise = torch.randn(images.shape, device=images.device, generator=generator, dtype=images.dtype)
    return noise.mul_(std.view(-1, 1, 1, 1)).add_(images).clamp_(0, 1)


class FcddAugmentation(nn.Module):
    """Joint crop/resize, colour jitter and image noise of the reference, for a batch of images and masks.

    Args:
        size: output side (224), or ``(height, width)``.
        crop_probability: chance of a random crop rather than a resize.
        noise_probability: chance of Gaussian noise per image.
        noise_relative_std: noise std as a fraction of the image's std.
        resize: how the resize branch samples images, ``nearest`` (the reference's) or ``bilinear``.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        crop_probability: float = 0.5,
        noise_probability: float = 0.5,
        noise_relative_std: float = 0.1,
        resize: str = "nearest",
    ) -> None:
        super().__init__()
        self.size = size
        self.resize = resize
        self.crop_probability = crop_probability
        self.noise_probability = noise_probability
        self.noise_relative_std = noise_relative_std

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``B x 3 x H x W`` images in [0, 1] and ``B x 1 x H x W`` masks, always outside autocast.

        Under bf16 autocast ``affine_grid`` and the hue ``einsum`` would run in bf16: the rounded sampling grid picks
        other source pixels for a third of a resized image, and the colours come out rounded to bf16. The
        augmentation is a few element-wise passes, so it costs nothing to keep it in the images' own dtype.
        """
        with torch.autocast(images.device.type, enabled=False):
            return self._augment(images, masks, generator)

    def _augment(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = joint_crop_or_resize(images, masks, self.size, self.crop_probability, generator, self.resize)
        strong = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
        strengths = torch.where(
            strong[:, None],
            torch.tensor(STRONG_JITTER, device=images.device, dtype=images.dtype),
            torch.tensor(WEAK_JITTER, device=images.device, dtype=images.dtype),
        )
        images = color_jitter(images, strengths, generator)
        images = gaussian_noise(images, self.noise_probability, self.noise_relative_std, generator)
        return images, masks
