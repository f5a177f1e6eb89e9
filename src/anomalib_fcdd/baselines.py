"""anomalib's PaDiM and PatchCore on the offline EfficientNet-Lite0 weights that FCDD's ``efficientnet_lite0`` uses.

anomalib builds its feature extractor with ``timm.create_model(backbone, pretrained=pre_trained, features_only=True)``
and has no setting for a local weight file. Offline, :func:`build_baseline` therefore constructs the model with
``backbone="tf_efficientnet_lite0", pre_trained=False`` and then copies the packaged ImageNet weights into
``model.model.feature_extractor.feature_extractor`` (timm's ``features_only`` model keeps the full model's tensor names,
minus the head). The pre-processor normalises with the weights' own statistics (mean 0.5, std 0.5, i.e. [-1, 1])
instead of anomalib's ImageNet mean/std.

Default feature layers mirror anomalib's ResNet choices at the same strides:

* PaDiM: ``blocks.1, blocks.2, blocks.4`` (strides 4, 8, 16; 24 + 40 + 112 = 176 channels; like ResNet ``layer1-3``),
  ``n_features=100`` random channels kept (PaDiM's ResNet-18 default);
* PatchCore: ``blocks.2, blocks.4`` (strides 8, 16; like ``layer2, layer3``).

With ``offline=False`` the models are built with anomalib's own defaults (ResNet-18 / Wide-ResNet-50-2, weights from
the Hugging Face Hub) and the keyword arguments are passed through unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from anomalib.models import Padim, Patchcore
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from .models.fcdd.backbones.efficientnet_lite import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    TIMM_ARCH,
    efficientnet_lite0_state_dict,
    features_only_state_dict,
)

#: Offline defaults per baseline: feature layers and extra constructor arguments.
OFFLINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "padim": {"layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 100},
    "patchcore": {"layers": ["blocks.2", "blocks.4"]},
}
_CLASSES: dict[str, type[AnomalibModule]] = {"padim": Padim, "patchcore": Patchcore}


def offline_pre_processor(image_size: int = 256) -> PreProcessor:
    """Resize to ``image_size`` and scale to [-1, 1], the input EfficientNet-Lite0's weights were trained on."""
    transform = Compose(
        [
            Resize((image_size, image_size), antialias=True),
            Normalize(mean=list(EFFICIENTNET_LITE0_MEAN), std=list(EFFICIENTNET_LITE0_STD)),
        ]
    )
    return PreProcessor(transform=transform)


def build_baseline(
    name: Literal["padim", "patchcore"], offline: bool = True, image_size: int = 256, **kwargs: Any
) -> AnomalibModule:
    """Build anomalib's PaDiM or PatchCore; offline, on ``tf_efficientnet_lite0`` with the packaged weights.

    Args:
        name: ``padim`` or ``patchcore``.
        offline: use the offline backbone and weights; ``False`` builds anomalib's defaults (needs the Hub/cache).
        image_size: side of the offline pre-processor's resize (anomalib's default 256).
        **kwargs: constructor arguments of the anomalib model (e.g. ``layers``, ``n_features``,
            ``coreset_sampling_ratio``); offline they override :data:`OFFLINE_DEFAULTS`, but ``backbone`` and
            ``pre_trained`` are fixed.

    Raises:
        ValueError: unknown name, or ``backbone`` / ``pre_trained`` given together with ``offline=True``.
        WeightsError: the offline weights are missing or do not fit.
    """
    if name not in _CLASSES:
        raise ValueError(f"Unknown baseline {name!r}; available: {sorted(_CLASSES)}.")
    if not offline:
        return _CLASSES[name](**kwargs)
    fixed = sorted({"backbone", "pre_trained"} & set(kwargs))
    if fixed:
        raise ValueError(f"offline=True fixes {fixed} (backbone {TIMM_ARCH!r} with the packaged weights).")
    arguments = {**OFFLINE_DEFAULTS[name], **kwargs}
    arguments.setdefault("pre_processor", offline_pre_processor(image_size))
    model = _CLASSES[name](backbone=TIMM_ARCH, pre_trained=False, **arguments)
    extractor = model.model.feature_extractor.feature_extractor
    extractor.load_state_dict(features_only_state_dict(extractor, efficientnet_lite0_state_dict()), strict=True)
    return model


def build_padim(offline: bool = True, **kwargs: Any) -> AnomalibModule:
    """PaDiM via :func:`build_baseline`."""
    return build_baseline("padim", offline=offline, **kwargs)


def build_patchcore(offline: bool = True, **kwargs: Any) -> AnomalibModule:
    """PatchCore via :func:`build_baseline`."""
    return build_baseline("patchcore", offline=offline, **kwargs)
