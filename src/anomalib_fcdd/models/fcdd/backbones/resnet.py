"""timm ResNets cut after ``layer2`` (stride 8), the layers anomalib's PaDiM and PatchCore read."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

from torch import nn

from .base import Backbone, frozen_units, load_weights, timm_channels, timm_model
from .weights import fetch_hf_hub_weights, load_state_dict_file

#: ResNet modules through ``layer2`` (stride 8); the first five (stem + ``layer1``) are frozen by default.
RESNET_CUT = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2")
RESNET_FROZEN = 5


def build_timm_resnet(arch: str, pre_trained: bool, weights_path: str | None, frozen_modules: int | None) -> Backbone:
    """A timm ResNet through ``layer2`` (stride 8), with the names of the full model (``layer1.0.conv1.weight``)."""
    model = timm_model(arch)
    features = nn.Sequential(OrderedDict((name, getattr(model, name)) for name in RESNET_CUT))
    hub_id = model.pretrained_cfg["hf_hub_id"]
    fetch = partial(fetch_hf_hub_weights, hub_id, arch)
    missing = load_weights(features, pre_trained, weights_path, load_state_dict_file, fetch, f"hf-hub:{hub_id}")
    frozen = frozen_units(list(features), frozen_modules, RESNET_FROZEN, arch)
    return Backbone(
        features=features, out_channels=timm_channels(model, "layer2"), frozen=frozen, missing_weights=missing
    )
