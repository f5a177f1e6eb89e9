"""What every backbone builder returns, and the two steps all of them share: loading weights and freezing layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ....errors import ConfigurationError
from .weights import WeightsError

#: torchvision's and timm's ImageNet input statistics (VGG, ResNet).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """A feature extractor ready for FCDD.

    Attributes:
        features: the cut network (input B x 3 x H x W, output B x C x H/stride x W/stride).
        out_channels: C.
        frozen: modules whose parameters are not trained.
        input_mean, input_std: per-channel statistics of the images the pretrained weights were trained on (inputs in
            [0, 1]); ``input_normalization="weights"`` normalises with them.
        missing_weights: why the asked-for pretrained weights could not be fetched (offline, no cache), or ``None``.
            The features then hold random weights; :class:`~..torch_model.FcddModel` refuses to run until a state
            dict that covers them (a checkpoint) is loaded, so restoring a trained model needs no network while
            nothing ever runs silently on random weights.
        memory_channels: ``[start, stop)`` channel ranges that the image-score memory compares
            (:class:`~..memory_bank.FeatureMemory`); empty: all of them.
    """

    features: nn.Module
    out_channels: int
    frozen: tuple[nn.Module, ...]
    missing_weights: WeightsError | None = None
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD
    memory_channels: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class TrainingDefaults:
    """What ``FcddHsc`` uses for each training option left unset, per backbone, chosen from measured learning curves
    (``benchmarks/README.md``). The paper's recipe (sec. 4) is the default: SGD with Nesterov momentum, lr 1e-3
    decayed 1.5 % per paper epoch, 50 epochs of 10 passes, the 1x1 linear head, the mean-of-map image score."""

    optimizer: str = "sgd"
    lr: float = 1e-3
    lr_decay: float = 0.985
    #: ``exponential`` (x ``lr_decay`` per paper epoch, the paper's) or ``cosine`` (half a cosine from ``lr`` to 0 over
    #: the whole budget, stepped every optimiser step).
    lr_schedule: str = "exponential"
    epochs: int = 50
    passes_per_epoch: int = 10
    head: str = "linear"
    #: Heads trained side by side and averaged (``FcddModel(heads=...)``): the paper's one.
    heads: int = 1
    image_score: str = "mean"
    #: ``image_score="memory"``: feature vectors averaged over k x k neighbours before they are compared.
    memory_neighbourhood: int = 1
    #: The output map upsampled as a weighted mean instead of the reference's Gaussian-weighted sum, which fades
    #: towards the image's border (``ReceptiveFieldUpsampler(normalized=True)``); training keeps the reference's.
    normalized_map: bool = False
    #: The output map adds the memory's distances to the heads' scores, each divided by its spread over normal
    #: training positions (:mod:`..map_fusion`); the heads' scores alone in the paper.
    fused_map: bool = False
    #: Sigma of the output map's Gaussian upsampler at inference; ``None``: the training loss's (``gauss_std``, the
    #: paper's 12).
    map_gauss_std: float | None = None
    frozen_bn_train_mode: bool = True
    #: What fills the confetti blobs (``anomaly_generator.FILLS``): the paper's flat colours by default.
    anomaly_fill: str = "colour"
    #: Relative size of the feature-space anomalies (:mod:`..feature_anomalies`); 0 = none, as in the paper.
    feature_noise: float = 0.0
    #: Semi-supervised: confetti also corrupts the normal images of batches that hold real anomalies (the paper uses
    #: the real ones alone).
    confetti_with_real: bool = False
    #: Optimiser steps as the budget instead of ``epochs x passes_per_epoch``; raised to ``min_passes`` passes over a
    #: large training set, but never beyond ``max_steps`` (bounded time whatever the data's size).
    steps: int | None = None
    min_passes: int = 0
    max_steps: int | None = None

    def step_budget(self, training_images: int | None, batch_size: int | None) -> int | None:
        """``steps``, or as many as ``min_passes`` passes over ``training_images`` take at ``batch_size``, capped at
        ``max_steps``: ``min(max(steps, ceil(min_passes * N / B)), max_steps)``. Unknown sizes, and an unset
        ``max_steps``, keep ``steps``."""
        if self.steps is None or not training_images or not batch_size or not self.min_passes:
            return self.steps
        passes = -(-self.min_passes * training_images // batch_size)
        return min(max(self.steps, passes), self.max_steps or self.steps)


BackboneBuilder = Callable[[bool, "str | None", "int | None"], Backbone]


def frozen_units(units: Sequence[nn.Module], count: int | None, default: int, backbone: str) -> tuple[nn.Module, ...]:
    """The first ``count`` (default ``default``) modules of ``units``."""
    count = default if count is None else count
    if not 0 <= count <= len(units):
        raise ConfigurationError(
            f"frozen_modules for {backbone!r} must be between 0 and {len(units)}, got {count} (--model.frozen_modules)."
        )
    return tuple(units[:count])


def match_state(
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


def load_weights(
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
    features.load_state_dict(match_state(state, features.state_dict(), where, prefixes), strict=True)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# VGG-11-BN (torchvision, the paper's backbone)
# ---------------------------------------------------------------------------------------------------------------------


def timm_model(arch: str) -> nn.Module:
    """A randomly initialised timm model; never downloads anything."""
    import timm

    return timm.create_model(arch, pretrained=False)


def timm_channels(model: nn.Module, module_name: str) -> int:
    """Output channels of ``module_name`` from timm's feature info."""
    for info in model.feature_info:
        if info["module"] == module_name:
            return int(info["num_chs"])
    raise ValueError(f"{type(model).__name__} has no feature stage {module_name!r}.")
