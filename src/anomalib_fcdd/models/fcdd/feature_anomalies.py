"""Feature-space anomalies: the batch's own feature vectors, moved off by Gaussian noise and labelled anomalous.

Not in the paper. The hypersphere loss (eq. 5) only learns a boundary around the normal features where it sees
anomalies. Confetti (:mod:`.anomaly_generator`) supplies them in image space, and a frozen backbone maps flat coloured
blobs to a few directions of its feature space: the head learns "paint" rather than "not normal", and on stochastic
textures (grass, gravel), whose normal features spread widely, real defects fall inside what it calls normal.
Noise added to the normal feature vectors themselves supplies anomalies in every direction just outside the normal
data, so the head closes its boundary around them (the idea of outlier exposure with synthetic noise, moved from
the input to the feature space).

For the features ``F`` (B x C x h x w) of a training batch::

    F~ = F + sigma * s * N(0, I)        s_c = standard deviation of channel c over the batch and all positions

``s`` is measured on the batch and carries no gradient, so ``sigma`` is relative to each channel's own spread and one
value fits every backbone stage. Every pixel of ``F~`` is anomalous; :func:`.loss.feature_anomaly_loss` adds their
term of eq. (5) to the loss. Only training uses it: inference and the exported graph never see the noise.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureNoise(nn.Module):
    """``F + sigma * s * N(0, I)`` with ``s`` the per-channel standard deviation of the batch ``F`` (see module doc).

    Args:
        sigma: noise standard deviation relative to each channel's spread; above 0.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be above 0, got {sigma}.")
        self.sigma = float(sigma)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Noisy copy of ``features`` (B x C x h x w), same dtype and device, drawn from torch's global generator."""
        if features.dim() != 4:
            raise ValueError(f"Expected features of shape B x C x h x w, got {tuple(features.shape)}.")
        with torch.no_grad():
            spread = features.float().transpose(0, 1).flatten(1).std(dim=1).view(1, -1, 1, 1)
            noise = torch.randn(features.shape, device=features.device) * (self.sigma * spread)
        return features + noise.to(features.dtype)
