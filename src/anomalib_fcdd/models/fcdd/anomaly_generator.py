"""Confetti noise: FCDD's synthetic anomalies, vectorised over a batch on its own device.

A confetti anomaly is a handful of randomly placed, sized, rotated and coloured squares superposed on a normal image
(FCDD, ICLR 2021; the paper's sec. 4 and Fig. 2). Per image, two kinds of blobs are drawn and summed:

* "coloured" blobs: ~1.04 expected (per-pixel centre probability 1.8e-5 at 240 x 240), each channel darkened by an
  integer uniform in [-256, -1];
* "gray" blobs: ~0.69 expected (1.2e-5 per pixel), darkened by -255 on all channels (black after clamping).

Each kind is drawn at least once. Sizes are uniform in {8, ..., 54} pixels at 240 x 240 (scaled with the image),
rotations uniform in [-45, 45] degrees. The image is ``clamp(x + noise, 0, 255)``; when darkening changes the image
by less than 0.025 grey levels on average and brightening would change it more, the noise is negated. The ground-truth
mask is exactly the set of pixels where any channel changed. Optionally the noise is smoothed first with a 25 x 25
Gaussian (sigma 5), as in the original FCDD configuration.

Everything is computed with tensor operations over the batch; the only Python loop runs over blob slots (a handful).

*Patch fill* (``fill="patch"``) keeps the blobs' shapes, counts, sizes and rotations but fills them with the content of
another image of the batch -- flipped or turned, shifted and brightened or darkened by up to 25 % -- instead of a flat
colour: anomalies that look like misplaced material rather than paint. A pixel counts as anomalous where the paste
changed it by at least :data:`PATCH_MIN_CHANGE` (pasted background that equals the original is not labelled). It is
not in the paper, and not a default: on frozen multi-scale EfficientNet-Lite0 features it raised bottle's pixel AP from
0.52 to 0.66 and Magnetic-Tile's pixel AUROC from 0.68 to 0.72, but on stochastic textures, where another patch of the
same texture is no defect, it taught the model noise (grass 0.90 -> 0.66, gravel 0.94 -> 0.79;
``benchmarks/results/offline/ANALYSIS.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

#: Resolution at which the reference draws confetti; sizes and counts are defined there.
REFERENCE_SIZE = 240
#: ``fill`` choices: the paper's flat colours, or content pasted from another image of the batch.
FILLS = ("colour", "patch")
#: Smallest change (max over channels, in [0, 1]) that marks a pasted pixel as anomalous: 8 grey levels.
PATCH_MIN_CHANGE = 8 / 255
#: Pasted content is scaled by a factor drawn uniformly from [1 - this, 1 + this].
PATCH_BRIGHTNESS = 0.25


@dataclass(frozen=True)
class BlobFamily:
    """One kind of confetti blob.

    Attributes:
        expected_count: mean number of blob centres per image (per-pixel probability x 240^2).
        gray: if True every channel gets ``gray_value``; otherwise each channel gets its own random value.
        colour_range: integer range [low, high] of the additive value per channel (0-255 units).
    """

    expected_count: float
    gray: bool
    colour_range: tuple[int, int] = (-256, -1)
    gray_value: int = -255


COLOURED_BLOBS = BlobFamily(expected_count=0.000018 * REFERENCE_SIZE**2, gray=False)
GRAY_BLOBS = BlobFamily(expected_count=0.000012 * REFERENCE_SIZE**2, gray=True)


def _gaussian_kernel_2d(size: int, std: float, device: torch.device) -> torch.Tensor:
    """Normalised ``size x size`` Gaussian used to smooth the noise (kornia-style blur of the reference)."""
    k = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    window = torch.exp(-0.5 * (k / std) ** 2)
    window = window / window.sum()
    return torch.outer(window, window)


class ConfettiNoise(nn.Module):
    """Draw confetti anomalies on a batch of images.

    Args:
        min_size: smallest blob side at 240 x 240 (8 in the reference).
        max_size: largest blob side at 240 x 240 (54 in the reference).
        max_rotation: blobs are rotated uniformly in [-max_rotation, max_rotation] degrees.
        families: blob kinds to draw and sum; the reference's coloured + gray by default.
        smooth: blur the noise with a 25 x 25 Gaussian (sigma 5) before applying it (original FCDD); off in the paper.
        scale_with_size: scale blob sizes by ``min(H, W) / 240`` so small images get proportionally small blobs.
    """

    def __init__(
        self,
        min_size: int = 8,
        max_size: int = 54,
        max_rotation: float = 45.0,
        families: tuple[BlobFamily, ...] = (COLOURED_BLOBS, GRAY_BLOBS),
        smooth: bool = False,
        smooth_kernel: int = 25,
        smooth_std: float = 5.0,
        scale_with_size: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(f"Need 1 <= min_size <= max_size, got {min_size}, {max_size}.")
        self.min_size = min_size
        self.max_size = max_size
        self.max_rotation = max_rotation
        self.families = families
        self.smooth = smooth
        self.smooth_kernel = smooth_kernel
        self.smooth_std = smooth_std
        self.scale_with_size = scale_with_size

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(corrupted, mask)`` for images in [0, 1] of shape ``B x C x H x W``; mask is ``B x 1 x H x W``."""
        if images.dim() != 4:
            raise ValueError(f"Expected a B x C x H x W batch, got shape {tuple(images.shape)}.")
        noise = self.blob_noise(images, generator)
        if self.smooth:
            noise = self._smooth(noise)
        return apply_noise(images, noise)

    def blob_noise(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The unsmoothed noise of every blob family, summed (non-zero exactly on the blobs)."""
        return sum(self.draw_noise(images, family, generator) for family in self.families)  # type: ignore[return-value]

    def draw_noise(
        self, images: torch.Tensor, family: BlobFamily, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Additive noise (0-255 units) of one blob family for every image of the batch."""
        batch, channels, height, width = images.shape
        device = images.device
        scale = min(height, width) / REFERENCE_SIZE if self.scale_with_size else 1.0
        counts = _at_least_one_poisson(batch, family.expected_count, device, generator)
        slots = int(counts.max())
        active = torch.arange(slots, device=device)[None, :] < counts[:, None]  # B x K

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, device=device, generator=generator)

        centre_y = (uniform(batch, slots) * height).floor()
        centre_x = (uniform(batch, slots) * width).floor()
        side = self.min_size + (uniform(batch, slots) * (self.max_size - self.min_size + 1)).floor()
        side = (side * scale).round().clamp_min(1)
        angle = (uniform(batch, slots) * 2 - 1) * math.radians(self.max_rotation)
        low, high = family.colour_range
        if family.gray:
            colour = torch.full((batch, slots, channels), float(family.gray_value), device=device)
        else:
            colour = low + (uniform(batch, slots, channels) * (high - low + 1)).floor()

        # Odd side s covers [-s//2, s//2] around the centre, even side [-s//2 + 1, s//2] (reference convention).
        half = torch.div(side, 2, rounding_mode="floor")
        lower = torch.where(side % 2 == 1, -half, -half + 1)
        rows = torch.arange(height, device=device, dtype=torch.float32)[None, :, None]
        cols = torch.arange(width, device=device, dtype=torch.float32)[None, None, :]
        noise = torch.zeros(batch, channels, height, width, device=device)
        inside = torch.empty(batch, height, width, dtype=torch.bool, device=device)
        for k in range(slots):
            dy = rows - centre_y[:, k, None, None]  # B x H x 1
            dx = cols - centre_x[:, k, None, None]  # B x 1 x W
            cos, sin = torch.cos(angle[:, k])[:, None, None], torch.sin(angle[:, k])[:, None, None]
            # Inverse rotation of each pixel into the blob's frame, rounded to the nearest pixel (order-0 rotation);
            # the masks are combined in place, so a slot allocates two single-channel float planes and nothing else.
            lo, hi = lower[:, k, None, None], half[:, k, None, None]
            u = torch.round_(cos * dx + sin * dy)
            torch.ge(u, lo, out=inside)
            inside &= u <= hi
            v = torch.round_(-sin * dx + cos * dy)
            inside &= v >= lo
            inside &= v <= hi
            inside &= active[:, k, None, None]
            torch.where(inside[:, None], colour[:, k, :, None, None], noise, out=noise)
        return noise

    def _smooth(self, noise: torch.Tensor) -> torch.Tensor:
        """Gaussian blur per channel with reflect padding, truncated towards zero like the reference's int cast."""
        channels = noise.shape[1]
        kernel = _gaussian_kernel_2d(self.smooth_kernel, self.smooth_std, noise.device)
        kernel = kernel.expand(channels, 1, -1, -1)
        pad = self.smooth_kernel // 2
        blurred = F.conv2d(F.pad(noise, (pad, pad, pad, pad), mode="reflect"), kernel, groups=channels)
        return blurred.trunc()


def _at_least_one_poisson(
    batch: int, rate: float, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Per-image blob counts: Poisson(rate) conditioned on >= 1 (the reference resamples empty masks)."""
    rates = torch.full((batch,), float(rate), device=device)
    counts = torch.poisson(rates, generator=generator)
    for _ in range(1000):
        empty = counts == 0
        if not bool(empty.any()):
            break
        counts = torch.where(empty, torch.poisson(rates, generator=generator), counts)
    return counts.clamp_min(1).long()


def apply_noise(images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add 0-255-unit ``noise`` to [0, 1] ``images`` with the reference's inversion rule; mask = changed pixels.

    The result is quantised to grey levels exactly like ``clamp(uint8 + int noise, 0, 255)``, so the mask holds the
    pixels that really changed after clamping.
    """
    levels = torch.round_(images.float() * 255)
    darkened = (levels + noise).clamp_(0, 255)
    brightened = (levels - noise).clamp_(0, 255)
    dark_change = (darkened - levels).abs_().flatten(1).mean(1)
    bright_change = (brightened - levels).abs_().flatten(1).mean(1)
    flip = (dark_change < 0.025) & (bright_change > dark_change)
    corrupted = torch.where(flip[:, None, None, None], brightened, darkened, out=darkened)
    mask = (corrupted != levels).any(dim=1, keepdim=True)
    return corrupted.div_(255).to(images.dtype), mask


def check_fill(fill: str) -> str:
    """``fill`` if it is one of :data:`FILLS`, else a ``ConfigurationError`` naming the option."""
    if fill not in FILLS:
        from ...errors import ConfigurationError

        raise ConfigurationError(f"Unknown anomaly_fill {fill!r} (--model.anomaly_fill); use one of {FILLS}.")
    return fill


def transformed_sources(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """For each index in ``targets``, another image of ``images`` (B x C x H x W; the same one only when B is 1),
    flipped or turned, shifted and rescaled in brightness: the material :func:`patch_fill` pastes into that target.

    The turn is one of the 8 symmetries of a square (the 4 of a rectangle for non-square images); the shift is uniform
    in +-half the image per axis with mirrored borders; the brightness factor is uniform in
    ``1 +- PATCH_BRIGHTNESS``. Nearest sampling, so the pasted pixels are pixels of the source.
    """
    batch, _, height, width = images.shape
    count, device = len(targets), images.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=device, generator=generator)

    offsets = 1 + (uniform(count) * (batch - 1)).floor().long().clamp_max(max(batch - 2, 0))
    picked = images[(targets + offsets) % batch] if batch > 1 else images[targets]
    turns = (uniform(count) * 4).floor() if height == width else (uniform(count) * 2).floor() * 2
    cos, sin = torch.cos(turns * math.pi / 2).round(), torch.sin(turns * math.pi / 2).round()
    flip = torch.where(uniform(count) < 0.5, -1.0, 1.0)
    shift = uniform(count, 2) * 2 - 1
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [count, *images.shape[1:]], align_corners=False)
    moved = F.grid_sample(picked, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    brightness = 1 + (uniform(count, 1, 1, 1) * 2 - 1) * PATCH_BRIGHTNESS
    return (moved * brightness).clamp_(0, 1)


def patch_fill(images: torch.Tensor, blobs: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``sources`` into ``images`` where ``blobs`` (B x 1 x H x W) is set; quantised to grey levels as
    :func:`apply_noise` is. The mask holds the pixels that changed by at least :data:`PATCH_MIN_CHANGE`, and only
    those pixels change."""
    pasted = torch.round(torch.where(blobs, sources, images) * 255) / 255
    mask = blobs & ((pasted - images).abs().amax(dim=1, keepdim=True) >= PATCH_MIN_CHANGE)
    return torch.where(mask, pasted, images).to(images.dtype), mask


class ConfettiAnomalyGenerator(nn.Module):
    """Replace each image of a batch by a confetti anomaly with probability ``probability``.

    Args:
        probability: chance that an image is replaced (0.5 in the reference).
        image_level_masks: label a replaced image as entirely anomalous (original FCDD ``malformed_normal``) instead
            of marking only the changed pixels (``malformed_normal_gt``, the paper's setting).
        fill: ``colour`` (the paper's flat-coloured blobs) or ``patch`` (the blobs filled with another image of the
            batch, :func:`patch_fill`); ``smooth`` applies to ``colour`` only.
        **confetti_kwargs: forwarded to :class:`ConfettiNoise`.

    Returns from ``forward``: ``(images, masks, replaced)`` with masks ``B x 1 x H x W`` (bool) and ``replaced`` (B,).
    """

    def __init__(
        self,
        probability: float = 0.5,
        image_level_masks: bool = False,
        fill: str = "colour",
        **confetti_kwargs: object,
    ) -> None:
        super().__init__()
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"anomaly probability must be in [0, 1], got {probability}.")
        self.probability = probability
        self.image_level_masks = image_level_masks
        self.fill = check_fill(fill)
        self.confetti = ConfettiNoise(**confetti_kwargs)  # type: ignore[arg-type]

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Corrupt a random subset of ``images`` (B x C x H x W in [0, 1]), always outside autocast.

        Under bf16 autocast the optional blur (a convolution) would run in bf16 and shift the noise's grey levels.
        """
        with torch.autocast(images.device.type, enabled=False):
            return self._corrupt(images, generator)

    def _corrupt(
        self, images: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = images.shape[0]
        replaced = torch.rand(batch, device=images.device, generator=generator) < self.probability
        masks = torch.zeros(batch, 1, *images.shape[-2:], dtype=torch.bool, device=images.device)
        if not bool(replaced.any()):
            return images, masks, replaced
        if self.fill == "patch":
            chosen = images[replaced]
            blobs = (self.confetti.blob_noise(chosen, generator) != 0).any(dim=1, keepdim=True)
            sources = transformed_sources(images, replaced.nonzero().flatten(), generator)
            corrupted, blob_masks = patch_fill(chosen, blobs, sources)
        else:
            corrupted, blob_masks = self.confetti(images[replaced], generator)
        images = images.clone()
        images[replaced] = corrupted
        masks[replaced] = torch.ones_like(blob_masks) if self.image_level_masks else blob_masks
        return images, masks, replaced
