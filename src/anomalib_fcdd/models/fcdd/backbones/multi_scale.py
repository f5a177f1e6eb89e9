"""Feature maps of several depths of one network, concatenated on the grid of the shallowest (as PaDiM and PatchCore
read them), with the receptive field of the combined map that the Gaussian upsampler needs.

For taps of strides ``j`` (the shallowest) and ``J = f j`` (deeper ones), a deeper map is bilinearly upsampled by
``f`` (``align_corners=False``): combined pixel ``i`` reads the deep map at ``(i + 0.5) / f - 0.5``, that is at input
coordinate ``j i + j/2 - J/2 + S``, and, for ``f > 1``, two neighbouring deep pixels along each axis. So a deep tap
with field ``(r, J, S)`` contributes ``(r + J, j, S + j/2 - J/2)``; the combined field is the smallest box around every
tap's. An optional ``k x k`` average pooling (stride 1) of the combined map, the local neighbourhood aggregation of
PatchCore, adds ``(k - 1) j`` to the size. ``tests/test_backbones.py`` checks the result against the input gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from ..anomaly_map import ReceptiveField
from .receptive_field import derive_receptive_field


def upsampled_field(field: ReceptiveField, stride: int) -> ReceptiveField:
    """The field of a map with ``field`` after bilinear upsampling onto the finer grid of ``stride``."""
    factor = field.stride // stride
    if factor == 1:
        return field
    return ReceptiveField(
        size=field.size + field.stride, stride=stride, offset=field.offset + stride / 2 - field.stride / 2
    )


def enclosing_field(fields: Sequence[ReceptiveField]) -> ReceptiveField:
    """The smallest field (on the common grid) that contains every one of ``fields``."""
    left = min(f.offset - (f.size - 1) / 2 for f in fields)
    right = max(f.offset + (f.size - 1) / 2 for f in fields)
    return ReceptiveField(size=round(right - left + 1), stride=fields[0].stride, offset=(left + right) / 2)


class MultiScaleFeatures(nn.Module):
    """Run ``trunk`` (an ``nn.Sequential``) up to its deepest tap and concatenate the tapped outputs.

    Args:
        trunk: the network's layers in data-flow order; only those up to the deepest tap are kept.
        taps: indices of ``trunk`` whose outputs are used, shallowest first.
        pool: side of the average pooling of the combined map (1: none).
    """

    def __init__(self, trunk: nn.Sequential, taps: Sequence[int], pool: int = 1) -> None:
        super().__init__()
        if not taps or list(taps) != sorted(set(taps)):
            raise ValueError(f"taps must be increasing trunk indices, got {list(taps)}.")
        self.trunk = nn.Sequential(*list(trunk.children())[: taps[-1] + 1])
        self.taps = tuple(int(tap) for tap in taps)
        self.pool = int(pool)
        fields = [derive_receptive_field(nn.Sequential(*list(self.trunk.children())[: tap + 1])) for tap in self.taps]
        stride = fields[0].stride
        if any(field.stride % stride for field in fields):
            raise ValueError(f"Tap strides {[f.stride for f in fields]} are not multiples of the shallowest.")
        self.factors = tuple(field.stride // stride for field in fields)
        combined = enclosing_field([upsampled_field(field, stride) for field in fields])
        self.receptive_field = ReceptiveField(
            size=combined.size + (self.pool - 1) * stride, stride=stride, offset=combined.offset
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``B x sum(C_tap) x H/j x W/j`` for ``B x 3 x H x W`` images."""
        tapped = []
        x = images
        for index, layer in enumerate(self.trunk):
            x = layer(x)
            if index in self.taps:
                tapped.append(x)
        height, width = tapped[0].shape[-2:]
        maps = [tapped[0]]
        for deep, factor in zip(tapped[1:], self.factors[1:], strict=True):
            if factor > 1:
                deep = F.interpolate(deep, scale_factor=factor, mode="bilinear", align_corners=False)
            maps.append(deep[..., :height, :width])
        combined = torch.cat(maps, dim=1)
        if self.pool > 1:
            combined = F.avg_pool2d(combined, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)
        return combined
