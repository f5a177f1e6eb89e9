"""VGG-11-BN cut at stride 8, the paper's backbone (torchvision layout, ImageNet weights from torch hub's cache)."""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models import VGG11_BN_Weights

from .base import Backbone, frozen_units, load_weights
from .weights import fetch_torchvision_weights, load_state_dict_file

#: torchvision's ``VGG11_BN_Weights.IMAGENET1K_V1`` (file ``vgg11_bn-6002323d.pth``), the reference's weights.
VGG11_BN_URL = VGG11_BN_Weights.IMAGENET1K_V1.url
#: FCDD keeps VGG-11-BN's modules 0-20 (cut before the 4th max-pool) and freezes 0-14 (through the 3rd max-pool).
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
    missing = load_weights(
        features, pre_trained, weights_path, load_state_dict_file, fetch, VGG11_BN_URL, prefixes=("features.",)
    )
    frozen = frozen_units(list(features), frozen_modules, VGG11_BN_FROZEN, "vgg11_bn")
    return Backbone(features=features, out_channels=512, frozen=frozen, missing_weights=missing)
