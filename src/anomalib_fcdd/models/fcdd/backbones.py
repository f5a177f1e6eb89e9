"""Fully convolutional feature extractors for FCDD and the receptive field of their output pixels.

A backbone is a CNN cut at a stride-8 layer. Its receptive field (size ``r``, stride ``j``, offset ``s``), which the
Gaussian upsampler needs, is *derived* by walking its convolution and pooling layers along the main path with the
standard recurrences (fcdd-method.md sec. 1)::

    j' = j * stride,   r' = r + (k - 1) * j,   s' = s + ((k - 1) / 2 - p) * j

Shortcut branches (ResNet ``downsample``) are skipped: they see a subset of the main path's field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision.models import vgg11_bn

from .anomaly_map import ReceptiveField
from .weights import WeightsError, fetch_torchvision_weights, load_state_dict_file

#: Submodule names whose layers are not on the main path of a residual network.
SHORTCUT_NAMES = ("downsample", "shortcut", "skip")


def _pair(value: int | tuple[int, ...]) -> int:
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"Non-square kernels/strides are not supported for receptive-field derivation: {value}")
        return int(value[0])
    return int(value)


def derive_receptive_field(network: nn.Module) -> ReceptiveField:
    """Receptive field of one output pixel of ``network``, from its Conv2d / MaxPool2d / AvgPool2d layers in order.

    Padding of "same"-style convolutions (timm's ``Conv2dSame``, padding='same') is taken as ``(k - 1) // 2`` per side
    as seen from the top-left, which is what an input whose size is a multiple of the stride gets.
    """
    size, stride, offset = 1, 1, 0.0  # offset in pixel-centre coordinates: input pixel k is centred at k
    for name, layer in network.named_modules():
        if any(part in SHORTCUT_NAMES for part in name.split(".")):
            continue
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            kernel = _pair(layer.kernel_size)
            step = _pair(layer.stride)
            dilation = _pair(getattr(layer, "dilation", 1))
            padding = layer.padding
            if isinstance(padding, str):
                pad = 0 if padding == "valid" else (dilation * (kernel - 1)) // 2
            else:
                pad = _pair(padding)
            if type(layer).__name__ == "Conv2dSame":  # timm pads dynamically: bottom/right get the odd pixel
                pad = (dilation * (kernel - 1) - (step - 1)) // 2 if step > 1 else (dilation * (kernel - 1)) // 2
            effective = dilation * (kernel - 1) + 1
            size = size + (effective - 1) * stride
            offset = offset + ((effective - 1) / 2 - pad) * stride
            stride = stride * step
    return ReceptiveField(size=size, stride=stride, offset=offset)


@dataclass(frozen=True)
class Backbone:
    """A feature extractor ready for FCDD.

    Attributes:
        features: the cut network (input B x 3 x H x W, output B x C x H/stride x W/stride).
        out_channels: C.
        frozen: modules whose parameters are not trained by default.
    """

    features: nn.Module
    out_channels: int
    frozen: tuple[nn.Module, ...]


BackboneBuilder = Callable[[bool, "str | None", "int | None"], Backbone]

VGG11_BN_URL = "https://download.pytorch.org/models/vgg11_bn-6002323d.pth"
#: FCDD keeps VGG-11-BN's modules 0-20 (cut before the 4th max-pool) and freezes 0-14 (through the 3rd max-pool).
VGG11_BN_CUT = 21
VGG11_BN_FROZEN = 15


def _select(state: dict, prefix: str, keep: set[str], source: str) -> dict:
    """Keys of ``state`` for the kept layers, accepting a full model's (``prefix``) or the cut network's names."""
    selected = {}
    for key, value in state.items():
        short = key[len(prefix) :] if key.startswith(prefix) else key
        if short in keep:
            selected[short] = value
    missing = keep - set(selected)
    if missing:
        raise WeightsError(
            f"Weight file {source} does not fit the backbone: {len(missing)} tensors are missing, "
            f"e.g. {sorted(missing)[:3]}."
        )
    return selected


def build_vgg11_bn(pre_trained: bool, weights_path: str | None, frozen_modules: int | None) -> Backbone:
    """VGG-11-BN ``features[:21]`` (512 channels, stride 8), the paper's backbone."""
    features = vgg11_bn(weights=None).features[:VGG11_BN_CUT]
    if weights_path is not None or pre_trained:
        state = (
            load_state_dict_file(weights_path)
            if weights_path is not None
            else fetch_torchvision_weights(VGG11_BN_URL, "vgg11_bn")
        )
        keep = set(features.state_dict())
        source = weights_path or VGG11_BN_URL
        features.load_state_dict(_select(state, "features.", keep, str(source)))
    count = VGG11_BN_FROZEN if frozen_modules is None else frozen_modules
    return Backbone(features=features, out_channels=512, frozen=tuple(features[:count]))


BACKBONES: dict[str, BackboneBuilder] = {
    "vgg11_bn": build_vgg11_bn,
}


def build_backbone(
    name: str, pre_trained: bool = True, weights_path: str | None = None, frozen_modules: int | None = None
) -> Backbone:
    """Build a registered backbone.

    Args:
        name: one of :data:`BACKBONES`.
        pre_trained: load ImageNet weights (from the cache or a download; see :mod:`.weights`).
        weights_path: a local weight file; used whenever given, whatever ``pre_trained`` says.
        frozen_modules: how many leading modules to freeze; ``None`` keeps the backbone's default (the paper's
            choice for VGG-11-BN).
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown FCDD backbone {name!r}; available: {sorted(BACKBONES)}.")
    return BACKBONES[name](pre_trained, weights_path, frozen_modules)
