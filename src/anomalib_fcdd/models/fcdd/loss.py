"""Hypersphere losses for FCDD on upsampled pixel maps.

Notation (paper, sec. 3): ``A`` is the upsampled pseudo-Huber map of a batch (n images of m pixels each), ``Y`` the
binary ground-truth masks (1 = anomalous), ``J0``/``J1`` the sets of normal/anomalous (image, pixel) indices of the
whole batch, and ``p(x) = -log(1 - exp(-x))`` the "push" function that rewards anomalous pixels for moving away from
the centre.

Three losses are offered:

``fcdd`` -- eq. (4), the original FCDD loss::

    (1/n) sum_i [ (1/m) sum_j (1 - Y_ij) A_ij  +  p( (1/m) sum_j Y_ij A_ij ) ]

  (the anomalous term is 0 for an image with no anomalous pixel, as in the reference).

``per_image`` -- the baseline as it was run for the paper's tables (per-image averages over each pixel set, ``p``
applied per pixel)::

    (1/n) sum_i [ mean_{j in J0_i} A_ij  +  mean_{j in J1_i} p(A_ij) ]     (an empty set contributes 0)

``pixel_balanced`` -- eq. (5), the paper's proposal, one average over every pixel of the batch::

    (1/(n m)) sum_ij [ (1 - Y_ij) A_ij  +  (|J0| / |J1|) Y_ij p(A_ij) ]   (the second term is 0 when |J1| = 0)

  The reference code used ``|J0| / (|J1| + 1)``; with the thousands of anomalous pixels in a real batch the difference
  is below 0.1 %. The factor is computed from the masks only, so no gradient flows through it.

Feature anomalies (:mod:`.feature_anomalies`, not in the paper) add the anomalous term of eq. (5) for their pixels,
all of which are anomalous, averaged over them::

    mean_ij p(H~_ij)                                                        (H~: the map of the noisy features)

so they weigh as much as one batch's balanced anomalous term, whatever the selected loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...errors import ConfigurationError

#: Shift inside the push function. ``p`` has a pole at 0 (``p'(x) ~ -1/x``); evaluating it at ``x + PUSH_EPS``
#: keeps loss and gradient finite (|p'(0)| = 1e6) while changing ``p`` by less than 1e-5 for ``x >= 0.1``.
PUSH_EPS = 1e-6


def push(x: torch.Tensor, eps: float = PUSH_EPS) -> torch.Tensor:
    """Stable ``p(x) = -log(1 - exp(-x))`` for ``x >= 0``, computed as ``-log(-expm1(-(x + eps)))``.

    ``expm1`` avoids the cancellation of ``1 - exp(-x)`` for small ``x``; the shift ``eps`` removes the pole at 0.
    Inputs below ``-eps / 2`` (impossible for a pseudo-Huber map) are clamped; the clamp sits below 0 so that the
    gradient at exactly 0 still flows.
    """
    shifted = (x + eps).clamp_min(eps / 2)
    return -torch.log(-torch.expm1(-shifted))


def _flatten(anomaly_map: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and return ``(A, Y)`` as float tensors of shape ``n x m``."""
    if anomaly_map.dim() == 4:
        if anomaly_map.shape[1] != 1:
            raise ValueError(f"Anomaly map must have one channel, got shape {tuple(anomaly_map.shape)}.")
        anomaly_map = anomaly_map[:, 0]
    if mask.dim() == 4:
        mask = mask[:, 0]
    if anomaly_map.shape != mask.shape:
        raise ValueError(
            f"Anomaly map {tuple(anomaly_map.shape)} and mask {tuple(mask.shape)} differ in shape; the loss needs the "
            "map upsampled to the mask's resolution."
        )
    # At least float32 (bf16/fp16 maps are upcast for the sums and the log); float64 stays float64.
    values = anomaly_map.flatten(1)
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    labels = mask.flatten(1).to(values.dtype)
    return values, labels


def fcdd_loss(anomaly_map: torch.Tensor, mask: torch.Tensor, eps: float = PUSH_EPS) -> torch.Tensor:
    """Eq. (4): per-image means over all m pixels, ``p`` applied to the mean of the anomalous part."""
    values, labels = _flatten(anomaly_map, mask)
    normal_term = ((1 - labels) * values).mean(dim=1)
    has_anomaly = labels.amax(dim=1)
    anomalous_term = has_anomaly * push((labels * values).mean(dim=1), eps)
    return (normal_term + anomalous_term).mean()


def per_image_loss(anomaly_map: torch.Tensor, mask: torch.Tensor, eps: float = PUSH_EPS) -> torch.Tensor:
    """Paper baseline as run: per-image means over ``J0_i`` of ``A`` and over ``J1_i`` of ``p(A)``."""
    values, labels = _flatten(anomaly_map, mask)
    normal_count = (1 - labels).sum(dim=1).clamp_min(1)
    anomalous_count = labels.sum(dim=1).clamp_min(1)
    normal_term = ((1 - labels) * values).sum(dim=1) / normal_count
    anomalous_term = (labels * push(values, eps)).sum(dim=1) / anomalous_count
    return (normal_term + anomalous_term).mean()


def pixel_balanced_loss(anomaly_map: torch.Tensor, mask: torch.Tensor, eps: float = PUSH_EPS) -> torch.Tensor:
    """Eq. (5): one mean over every pixel of the batch, anomalous pixels weighted by ``|J0| / |J1|``."""
    values, labels = _flatten(anomaly_map, mask)
    with torch.no_grad():
        anomalous_pixels = labels.sum()
        balance = (labels.numel() - anomalous_pixels) / anomalous_pixels.clamp_min(1)
    per_pixel = (1 - labels) * values + balance * labels * push(values, eps)
    return per_pixel.mean()


def feature_anomaly_loss(feature_anomalies: torch.Tensor, eps: float = PUSH_EPS) -> torch.Tensor:
    """``mean p(H~)`` over every pixel of the noisy features' low-resolution map (all of them anomalous)."""
    values = feature_anomalies.to(torch.promote_types(feature_anomalies.dtype, torch.float32))
    return push(values, eps).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "fcdd": fcdd_loss,
    "per_image": per_image_loss,
    "pixel_balanced": pixel_balanced_loss,
}


def check_loss_name(name: str) -> str:
    """``name`` if it is one of :data:`LOSSES`, else a :class:`ConfigurationError` listing them."""
    if name not in LOSSES:
        raise ConfigurationError(f"Unknown FCDD loss {name!r} (--model.loss); choose one of {sorted(LOSSES)}.")
    return name


class FcddLoss(nn.Module):
    """Selectable hypersphere loss on the upsampled pseudo-Huber map.

    Args:
        name: ``"pixel_balanced"`` (eq. 5, default), ``"per_image"`` (paper baseline) or ``"fcdd"`` (eq. 4).
        eps: shift of the push function's pole, see :func:`push`.
    """

    def __init__(self, name: str = "pixel_balanced", eps: float = PUSH_EPS) -> None:
        super().__init__()
        self.name = check_loss_name(name)
        self.eps = eps
        self._loss = LOSSES[name]

    def forward(
        self, anomaly_map: torch.Tensor, mask: torch.Tensor, feature_anomalies: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss of a batch: ``anomaly_map`` is ``B x [K x] H x W`` and ``mask`` ``B x [1 x] H x W``;
        ``feature_anomalies``, the map of the noisy feature copies, adds :func:`feature_anomaly_loss`.

        ``K`` maps per image (one per head, ``FcddModel(heads=K)``) give the mean of the K heads' losses: each map is
        scored as an image of its own against the image's mask. Every loss here is a mean over images (or over all
        pixels of equal-sized images), so this is exactly ``(1/K) sum_k loss(A_k, Y)``.
        """
        if anomaly_map.dim() == 4 and anomaly_map.shape[1] > 1:
            heads = anomaly_map.shape[1]
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)
            anomaly_map = anomaly_map.reshape(-1, 1, *anomaly_map.shape[-2:])
            mask = mask.repeat_interleave(heads, dim=0)
        loss = self._loss(anomaly_map, mask, self.eps)
        if feature_anomalies is not None:
            loss = loss + feature_anomaly_loss(feature_anomalies, self.eps)
        return loss
