"""Feature-space anomalies: the batch's own feature vectors, moved off by Gaussian noise and labelled anomalous.

Not in the paper. The hypersphere loss (eq. 5) only learns a boundary around the normal features where it sees
anomalies. Confetti (:mod:`.anomaly_generator`) supplies them in image space, and a frozen backbone maps flat coloured
blobs to a few directions of its feature space: the head learns "paint" rather than "not normal", and on stochastic
textures (grass, gravel), whose normal features spread widely, real defects fall inside what it calls normal.
Noise added to the normal feature vectors themselves supplies anomalies in every direction just outside the normal
data, so the head closes its boundary around them (the idea of outlier exposure with synthetic noise, moved from
the input to the feature space).

For the features ``F`` (B x C x h x w) of a training batch::

    F~ = F + sigma * s * N(0, I)        s_c = standard deviation of channel c over training features

``s`` carries no gradient, so ``sigma`` is relative to each channel's own spread and one value fits every backbone
stage. ``FcddHsc`` measures it once before training, over up to :data:`SPREAD_IMAGES` training images prepared as
for a training step (confetti, augmentation), and keeps it fixed: noise that followed each batch's own spread, which
the confetti of 16 images swings from batch to batch, scored markedly worse (grass pixel AUROC 0.92-0.93 against
0.96-0.97; ``benchmarks/results/offline/ANALYSIS.md``). Without a measured spread (the module used on its own) each
batch's spread is used. Every pixel of ``F~`` is anomalous; :func:`.loss.feature_anomaly_loss` adds their
term of eq. (5) to the loss. Only training uses it: inference and the exported graph never see the noise.
"""

from __future__ import annotations

import torch
from torch import nn

#: Training images over which ``FcddHsc`` measures the features' spread before training.
SPREAD_IMAGES = 256


class SpreadAccumulator:
    """Per-channel standard deviation of feature maps over batches and positions, in one streaming pass (float64
    sums, so memory stays constant however many images pass)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        """Add a B x C x h x w batch."""
        values = features.detach().double().transpose(0, 1).flatten(1)
        sums, squares = values.sum(dim=1), (values * values).sum(dim=1)
        self.total = sums if self.total is None else self.total + sums
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += values.shape[1]

    def spread(self) -> torch.Tensor:
        """``sqrt(E[x^2] - E[x]^2)`` per channel (float32); an error before any update."""
        if self.total is None or self.squares is None:
            raise ValueError("No features were added; the training set gave no normal image.")
        mean = self.total / self.count
        return (self.squares / self.count - mean * mean).clamp_min(0).sqrt().float()


class FeatureNoise(nn.Module):
    """``F + sigma * s * N(0, I)`` with ``s`` the measured per-channel spread of training features (see module doc).

    Args:
        sigma: noise standard deviation relative to each channel's spread; above 0.
    """

    spread: torch.Tensor

    def __init__(self, sigma: float) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be above 0, got {sigma}.")
        self.sigma = float(sigma)
        # A training statistic, not saved with the model: measured again before every training run.
        self.register_buffer("spread", torch.empty(0), persistent=False)

    def set_spread(self, spread: torch.Tensor) -> None:
        """Fix ``s`` (one value per channel) for the noise of every following batch."""
        self.spread = spread.detach().flatten().to(self.spread.device, torch.float32)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Noisy copy of ``features`` (B x C x h x w), same dtype and device, drawn from torch's global generator."""
        if features.dim() != 4:
            raise ValueError(f"Expected features of shape B x C x h x w, got {tuple(features.shape)}.")
        with torch.no_grad():
            if self.spread.numel():
                if self.spread.numel() != features.shape[1]:
                    raise ValueError(
                        f"The measured spread has {self.spread.numel()} channels, the features {features.shape[1]}."
                    )
                spread = self.spread.view(1, -1, 1, 1)
            else:
                spread = features.float().transpose(0, 1).flatten(1).std(dim=1).view(1, -1, 1, 1)
            noise = torch.randn(features.shape, device=features.device) * (self.sigma * spread)
        return features + noise.to(features.dtype)
