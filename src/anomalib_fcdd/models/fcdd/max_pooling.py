"""2 x 2 max-pooling without the argmax indices, for layers no gradient flows through.

PyTorch's CPU ``max_pool2d`` always runs ``max_pool2d_with_indices``, even under ``no_grad``: next to every pooled
output it writes an int64 index tensor four times the size of a bf16 output. In FCDD's frozen VGG layers nobody reads
those indices (no gradient goes through the frozen prefix, and nothing at inference), yet after the first block they
are the largest tensor of the step (VGG-11-BN at batch 128: 822 MB of indices beside a 205 MB output).

A 2 x 2, stride-2 pool is two element-wise maxima, over row pairs and then over column pairs::

    rows[i, :]   = max(x[2i, :], x[2i + 1, :])
    out[i, j]    = max(rows[i, 2j], rows[i, 2j + 1])

Both read channel-contiguous runs (channels-last) and return exactly ``max_pool2d``'s values, NaN included
(``torch.maximum`` propagates NaN as the pooling kernel does). When the caller owns ``x``, the row maxima go into
its even rows, so the pool allocates nothing but its output.
"""

from __future__ import annotations

import torch
from torch import nn


def is_plain_2x2_max_pool(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``nn.MaxPool2d(2)``: kernel and stride 2, no padding, dilation, ceil mode or indices."""
    if type(layer) is not nn.MaxPool2d or layer.return_indices or layer.ceil_mode:
        return False
    return all(
        value in (expected, (expected, expected))
        for value, expected in ((layer.kernel_size, 2), (layer.stride, 2), (layer.padding, 0), (layer.dilation, 1))
    )


def max_pool_2x2(x: torch.Tensor, overwrite_input: bool = False) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for ``B x C x H x W`` (odd sides drop their last row/column, as floor mode does).

    ``overwrite_input``: the caller no longer needs ``x``, so its even rows may hold the row maxima.
    """
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    even, odd = x[..., 0:height:2, :width], x[..., 1:height:2, :width]
    rows = torch.maximum(even, odd, out=even) if overwrite_input else torch.maximum(even, odd)
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])
