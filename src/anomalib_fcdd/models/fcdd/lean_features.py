"""Run a backbone's layers without allocations nobody reads: the CPU path of FCDD's frozen and no-grad layers.

Walking an ``nn.Sequential`` backbone layer by layer, two kinds of layer get a leaner kernel with identical results
where it is certainly safe:

* frozen ``BatchNorm2d`` right after a convolution normalise into the convolution's output
  (:mod:`.frozen_batchnorm`);
* plain 2 x 2 max-pooling runs without its int64 argmax indices (:mod:`.max_pooling`), writing its row maxima into
  its input when the walk created that input.

Safe means: CPU tensors (the leaner kernels are what helps oneDNN-bound CPUs; GPUs run the layers as they are), no
tracing (``torch.compile`` and exports see the plain layers), no hooks on the layer, and an input that needs no
gradient, so no autograd graph holds or will read the overwritten tensor. Everything else runs ``layer(x)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .frozen_batchnorm import batchnorm_into_input
from .max_pooling import is_plain_2x2_max_pool, max_pool_2x2


def _has_hooks(layer: nn.Module) -> bool:
    """Forward hooks would be skipped by calling a kernel directly."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks)


def _storage(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


def run_features(
    features: nn.Module,
    x: torch.Tensor,
    inplace_batchnorms: frozenset[int] = frozenset(),
    indexless_pooling: bool = False,
) -> torch.Tensor:
    """``features(x)``; BatchNorms at ``inplace_batchnorms`` and (if asked) 2 x 2 max-pools run leaner where safe.

    A tensor may be overwritten only if the walk owns it: its storage is neither the caller's input nor anything a
    hook has seen (a hook may keep what it was given).
    """
    if (
        not (inplace_batchnorms or indexless_pooling)
        or not isinstance(features, nn.Sequential)
        or x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    ):
        return features(x)
    exposed = {_storage(x)}
    for index, layer in enumerate(features.children()):
        hooked = _has_hooks(layer)
        if hooked:
            exposed.add(_storage(x))
        owned = _storage(x) not in exposed
        if x.requires_grad or hooked:
            x = layer(x)
        elif index in inplace_batchnorms and owned and not any(p.requires_grad for p in layer.parameters()):
            x = batchnorm_into_input(layer, x)
        elif indexless_pooling and is_plain_2x2_max_pool(layer):
            x = max_pool_2x2(x, overwrite_input=owned)
        else:
            x = layer(x)
        if hooked:
            exposed.add(_storage(x))
    return x
