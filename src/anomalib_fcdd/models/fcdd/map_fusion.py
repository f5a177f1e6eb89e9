"""The output map from two scorers of the same features: FCDD's heads and the memory of normal vectors.

Not in the paper. ``fused_map`` adds, at every low-resolution position, the heads' pseudo-Huber score ``H`` and the
position's distance ``D`` to its nearest memory vector (:mod:`.memory_bank`), each divided by its standard deviation
over normal training positions, before the map is upsampled::

    A = upsample(H / s_H + D / s_D)

The two scorers miss different things: the heads are a parametric summary of the normal features that confetti
taught what defects look like, the memory keeps rare normal content verbatim. Dividing by their spreads makes the
sum independent of either's units, so one weighting serves every dataset; what each contributes is decided on the
training data, never on defects. On one training per offline category (offline ``ANALYSIS.md``, "The map from
heads and memory") the sum ranked pixels better than either scorer alone on three of five categories (Magnetic-Tile
+2.5 points over the heads, gravel +1.2, grass +0.6) and within 0.1 point of the better one on the other two.

The spreads are measured when the memory is built, on a sample of training positions drawn alongside the memory's
pool (:class:`CalibrationSample`), and again whenever the heads may have changed (before every validation of a fit).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

#: Training positions whose scores give the spreads (drawn alongside the memory's pool, from every image alike).
CALIBRATION_SIZE = 10_000
#: Floor of a spread, so that a scorer constant on the normal data does not divide by zero.
MIN_SPREAD = 1e-12


class CalibrationSample(NamedTuple):
    """Normal training positions, as the heads read them and as the memory reads them."""

    features: torch.Tensor  # N x C: the backbone's vectors (what the heads score)
    memory_features: torch.Tensor  # N x C': the memory's reading of the same positions (neighbour means)


class MapFusion(nn.Module):
    """``H / s_H + D / s_D`` with ``s`` the standard deviations of the two scores over normal training positions.

    ``spreads`` (``[s_H, s_D]``) is a buffer saved with the model; it starts at zero, "not measured yet". Whether
    it holds measured values is also kept as a plain flag (:attr:`ready`), set when they are measured or loaded, so
    that the check costs nothing and leaves no data-dependent branch in an exported graph.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("spreads", torch.zeros(2))
        self.ready = False

    @torch.no_grad()
    def calibrate(self, heads_scores: torch.Tensor, distances: torch.Tensor) -> None:
        """Take the population standard deviations of the two scores of the same normal positions."""
        if heads_scores.numel() < 2 or distances.numel() < 2:
            raise ValueError("The map's spreads need the scores of at least two normal training positions.")
        spreads = torch.stack([heads_scores.double().std(correction=0), distances.double().std(correction=0)])
        self.spreads.copy_(spreads.clamp_min(MIN_SPREAD).to(self.spreads))
        self.ready = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Loaded spreads are measured ones unless they are the unmeasured zeros."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        saved = state_dict.get(prefix + "spreads")
        if saved is not None:
            self.ready = bool((saved > 0).all())

    def forward(self, heads_map: torch.Tensor, distance_map: torch.Tensor) -> torch.Tensor:
        """The fused low-resolution map (same shape as the two maps)."""
        if not self.ready:
            raise RuntimeError(
                "fused_map needs the spreads that training measures when it builds the memory; this model has none. "
                "Train it, or load a checkpoint trained with fused_map=True."
            )
        return heads_map / self.spreads[0] + distance_map / self.spreads[1]

    def extra_repr(self) -> str:
        return f"spreads={self.spreads.tolist()}"
