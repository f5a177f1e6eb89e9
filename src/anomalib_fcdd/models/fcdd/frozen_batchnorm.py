"""Training-time BatchNorm of the frozen backbone layers, written into the convolution's output.

The frozen layers need no gradient, so nothing keeps the output of a frozen ``Conv2d`` alive once the
``BatchNorm2d`` after it has read it. Writing the normalised values back into that tensor,

    x <- (x - mean_B) / sqrt(var_B + eps) * g + beta        (mean_B, var_B: the batch's statistics in train mode)

computes exactly what the BatchNorm layer computes (the same ATen kernel, statistics and running-statistics update,
bit for bit) without allocating a second activation of the largest size in the network (VGG-11-BN's first block:
B x 64 x 224 x 224). On a CPU that is one activation less at peak host memory and one fresh block less to fault in
per BatchNorm and step.

Only where that is certainly safe: CPU tensors and BatchNorm weights that do not require grad (a layer unfrozen later
runs as it is), in an ``nn.Sequential`` where the BatchNorm directly follows the convolution whose output it reads
(VGG's layout), for exact ``nn.BatchNorm2d`` layers that track running statistics, and with no hook on the way
(:func:`.lean_features.run_features` decides). Everything else runs the layers as they are.
"""

from __future__ import annotations

import torch
from torch import nn


def inplace_batchnorm_indices(features: nn.Module, frozen: list[nn.Module]) -> frozenset[int]:
    """Positions in ``features`` (a ``Sequential``) of frozen ``BatchNorm2d`` children that directly follow a conv."""
    if not isinstance(features, nn.Sequential):
        return frozenset()
    frozen_ids = {id(module) for module in frozen}
    layers = list(features.children())
    return frozenset(
        index
        for index in range(1, len(layers))
        if type(layers[index]) is nn.BatchNorm2d
        and id(layers[index]) in frozen_ids
        and layers[index].track_running_stats
        and isinstance(layers[index - 1], nn.Conv2d)
    )


def batchnorm_into_input(norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` written into ``x`` (which the caller must not need any more); returns ``x``."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training:
        assert norm.num_batches_tracked is not None
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
            momentum = 1.0 / float(norm.num_batches_tracked)
    statistics = norm.running_mean.dtype if norm.running_mean is not None else torch.float32
    torch.ops.aten.native_batch_norm.out(
        x,
        norm.weight,
        norm.bias,
        norm.running_mean,
        norm.running_var,
        norm.training,
        momentum,
        norm.eps,
        out=x,
        save_mean=torch.empty(0, dtype=statistics),
        save_invstd=torch.empty(0, dtype=statistics),
    )
    return x
