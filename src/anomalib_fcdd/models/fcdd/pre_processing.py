"""FCDD's pre-processing: the resize anomalib runs, and the input normalisation that travels inside the model.

The resize is the reference's nearest-neighbour one by default; ``resize="bilinear"`` antialiases instead, as the
photos of ImageNet training were resized (offline ANALYSIS.md has what it measured).

The reference ``lcnaug1`` pipeline normalises every image in two steps (the paper's sec. 4):

1. *Local contrast normalisation* (a per-image, global one despite its name)::

       x' = (x - mean(x)) / mean(|x - mean(x)|)        (means over all C*H*W values of one image)

   The division is skipped for a constant image, whose mean absolute deviation is 0.

2. *Min-max* with per-channel constants ``lo_c``, ``hi_c`` (the per-channel extremes of step 1 over the training
   images)::

       x'' = (x' - lo_c) / (hi_c - lo_c)

The reference ships the constants of the 15 MVTec-AD categories; they are in :data:`MVTEC_MINMAX`. For any other data
they are computed from the training images with :class:`MinMaxAccumulator` and stored in the model's buffers, so they
are saved in checkpoints and exported with the model.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import get_exportable_transform
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Resize

from ...data.decode import upright_size
from ...errors import ConfigurationError

logger = logging.getLogger(__name__)

#: Per-category (min R, min G, min B, max R, max G, max B) after LCN, as the reference code ships them.
MVTEC_MINMAX: dict[str, tuple[float, ...]] = {
    category: tuple(values)
    for category, values in json.loads((Path(__file__).parent / "mvtec_minmax.json").read_text()).items()
}


def mean_per_image(values: torch.Tensor) -> torch.Tensor:
    """Mean over C, H and W of each image (``B x 1 x 1 x 1``), as row sums followed by short means.

    Equal to ``values.mean(dim=(1, 2, 3), keepdim=True)``, but no single reduction is long: ONNX Runtime and OpenVINO
    sum one long ReduceMean sequentially in float32 (relative errors of 4e-5 and 3e-6 over a 3 x 224 x 224 image,
    enough to move exported anomaly maps by more than 1e-4), and OpenVINO merges consecutive means into one, so the
    first step is a sum.
    """
    row_sums = values.sum(dim=3, keepdim=True)
    return row_sums.mean(dim=2, keepdim=True).mean(dim=1, keepdim=True) / values.shape[-1]


def nearest_indices(in_size: torch.Tensor, out_size: int) -> torch.Tensor:
    """Source index of each output pixel of a nearest resize, computed as torch's kernel does (float32 arithmetic)."""
    scale = in_size.to(torch.float32) / out_size
    indices = torch.floor(torch.arange(out_size, dtype=torch.float32, device=in_size.device) * scale).to(torch.int64)
    return torch.minimum(indices, in_size - 1)


def linear_resize_weights(in_size: torch.Tensor, out_size: int) -> torch.Tensor:
    """``out_size x in_size`` weights of an antialiased linear resize along one axis, as torch's bilinear
    ``antialias=True`` kernel computes them.

    Output pixel ``i`` is centred on input coordinate ``c_i = (i + 0.5) s`` with ``s = in_size / out_size``; input
    pixel ``j`` (centred on ``j + 0.5``) weighs ``max(0, 1 - |j + 0.5 - c_i| / max(s, 1))``, and each row is scaled to
    sum to 1. Shrinking, the triangle stretches over the output pixel's footprint (no aliasing); enlarging, it is plain
    linear interpolation.
    """
    scale = in_size.to(torch.float32) / out_size
    support = torch.clamp(scale, min=1.0)
    centres = (torch.arange(out_size, dtype=torch.float32, device=in_size.device) + 0.5) * scale
    positions = torch.arange(in_size, device=in_size.device).to(torch.float32) + 0.5
    weights = torch.clamp(1 - (positions[None, :] - centres[:, None]).abs() / support, min=0)
    return weights / weights.sum(dim=1, keepdim=True)


def smooth_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of ``B x C x H x W`` images to ``size``, written as two matrix products.

    The same values as torchvision's ``Resize(antialias=True)`` (float rounding aside), from shape arithmetic and
    ``matmul`` only, so eager torch, ONNX Runtime and OpenVINO agree for every input size: exporters turn ``Resize``
    into a resize without antialiasing, which aliases when shrinking. The price is dense arithmetic: about
    ``C * h * H * W`` multiply-adds (0.9 G for a 1024 x 1024 image to 224, more than the default network's own),
    where the nearest gather costs nothing.
    """
    height = torch.scalar_tensor(images.shape[-2], dtype=torch.int64, device=images.device)
    width = torch.scalar_tensor(images.shape[-1], dtype=torch.int64, device=images.device)
    rows = linear_resize_weights(height, size[0]).to(images.dtype)
    columns = linear_resize_weights(width, size[1]).to(images.dtype)
    return torch.matmul(torch.matmul(rows, images), columns.transpose(0, 1))


def nearest_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``B x C x H x W`` images to ``size``, written as an index gather.

    It picks exactly the pixels of torchvision's nearest ``Resize``. The exported ONNX ``Resize`` divides by the scale
    where torch multiplies, so for some input sizes (e.g. 500 -> 224) it picks a neighbouring row or column; the
    gather keeps eager torch, ONNX Runtime and OpenVINO identical for every input size.
    """
    height = torch.scalar_tensor(images.shape[-2], dtype=torch.int64, device=images.device)
    width = torch.scalar_tensor(images.shape[-1], dtype=torch.int64, device=images.device)
    rows = nearest_indices(height, size[0])
    columns = nearest_indices(width, size[1])
    return images.index_select(-2, rows).index_select(-1, columns)


def local_contrast_normalization(images: torch.Tensor) -> torch.Tensor:
    """Per-image ``(x - mean) / mean|x - mean|`` over all channels and pixels; constant images are only centred.

    "Constant" means a mean absolute deviation below 1e-6 (far below one grey level, 1/255): float rounding of the
    mean must not be blown up to +-1.
    """
    centred = images - mean_per_image(images)
    spread = mean_per_image(centred.abs())
    constant = spread < 1e-6
    return torch.where(constant, torch.zeros_like(centred), centred / torch.where(constant, 1.0, spread))


def resolve_minmax(constants: str | list[float] | tuple[float, ...] | None) -> torch.Tensor | None:
    """Turn a MVTec-AD category name or six numbers (3 minima, 3 maxima) into a ``2 x 3`` tensor; None stays None."""
    if constants is None:
        return None
    if isinstance(constants, str):
        if constants not in MVTEC_MINMAX:
            raise ConfigurationError(
                f"No shipped min-max constants for {constants!r}. Known MVTec-AD categories: {sorted(MVTEC_MINMAX)}. "
                "Pass minmax=None to compute them from the training images, or six numbers (3 minima, 3 maxima)."
            )
        constants = MVTEC_MINMAX[constants]
    values = torch.as_tensor(constants, dtype=torch.float32).flatten()
    if values.numel() != 6:
        raise ConfigurationError(
            f"min-max constants need 6 numbers (min R, G, B then max R, G, B); got {values.numel()}: {constants}."
        )
    table = values.view(2, 3)
    if not bool((table[1] > table[0]).all()):
        raise ConfigurationError(f"min-max constants must have every maximum above its minimum; got {table.tolist()}.")
    return table


class InputNormalization(nn.Module):
    """LCN followed by per-channel min-max, with the constants held in (checkpointed) buffers.

    Until constants are set (``ready`` is False) the module refuses to run, so a model can never silently use
    placeholder values. The check reads a Python mirror of ``ready`` (refreshed when a state dict is loaded), so it
    costs no device synchronisation per batch and traces as a constant.
    """

    def __init__(self, constants: str | list[float] | tuple[float, ...] | None = None) -> None:
        super().__init__()
        table = resolve_minmax(constants)
        self.register_buffer("low", torch.zeros(1, 3, 1, 1))
        self.register_buffer("high", torch.ones(1, 3, 1, 1))
        self.register_buffer("ready", torch.tensor(False))
        self._has_constants = False
        self.register_load_state_dict_post_hook(_refresh_readiness)
        if table is not None:
            self.set_constants(table)

    def set_constants(self, table: torch.Tensor) -> None:
        """Store a ``2 x 3`` (minima, maxima) table."""
        table = table.to(self.low.device, torch.float32)
        self.low.copy_(table[0].view(1, 3, 1, 1))
        self.high.copy_(table[1].view(1, 3, 1, 1))
        self.ready.fill_(True)
        self._has_constants = True

    @property
    def constants(self) -> torch.Tensor:
        """Current ``2 x 3`` table of minima and maxima."""
        return torch.stack([self.low.flatten(), self.high.flatten()])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise ``B x 3 x H x W`` images in [0, 1]."""
        if "_has_constants" not in self.__dict__:  # a whole module pickled by a version without the mirror
            self._has_constants = bool(self.ready)
        if not self._has_constants:
            raise ConfigurationError(
                "FCDD's input normalisation has no min-max constants yet, so it would score with placeholders. "
                "Train the model first (fit sets them), load a checkpoint of a trained model, or pass minmax= a "
                "MVTec-AD category name (e.g. 'bottle') or six numbers (3 minima, 3 maxima)."
            )
        contrast = local_contrast_normalization(images)
        return (contrast - self.low) / (self.high - self.low)


def _refresh_readiness(module: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: a loaded ``ready`` buffer decides whether the constants are real."""
    del incompatible_keys
    module._has_constants = bool(module.ready)


#: ``input_normalization`` choices: ``lcn_minmax`` (the paper's, sec. 4), ``weights`` (the statistics the pretrained
#: backbone was trained with) and ``auto`` (the paper's for its VGG setting and untrained backbones, else ``weights``).
INPUT_NORMALIZATIONS = ("auto", "lcn_minmax", "weights")


def check_input_normalization(name: str) -> str:
    """``name`` if it is one of :data:`INPUT_NORMALIZATIONS`, else a :class:`ConfigurationError`."""
    if name not in INPUT_NORMALIZATIONS:
        raise ConfigurationError(
            f"Unknown input_normalization {name!r} (--model.input_normalization); use one of {INPUT_NORMALIZATIONS}."
        )
    return name


def resolve_input_normalization(name: str, backbone: str, pre_trained: bool) -> str:
    """``auto`` -> ``lcn_minmax`` for the paper's VGG setting and untrained backbones, else ``weights``."""
    if check_input_normalization(name) != "auto":
        return name
    return "lcn_minmax" if backbone == "vgg11_bn" or not pre_trained else "weights"


#: ``resize`` choices: ``nearest`` (the reference's) or antialiased ``bilinear``.
RESIZES = ("nearest", "bilinear")


def check_resize(name: str) -> str:
    """``name`` if it is one of :data:`RESIZES`, else a :class:`ConfigurationError`."""
    if name not in RESIZES:
        raise ConfigurationError(f"Unknown resize {name!r} (--model.resize); use one of {RESIZES}.")
    return name


def resize_transform(size: int | tuple[int, int], resize: str) -> Resize:
    """torchvision's ``Resize`` to ``size`` for ``resize`` (``nearest``/``bilinear``); masks are always resized
    nearest by torchvision."""
    if resize == "nearest":
        return Resize(size, interpolation=InterpolationMode.NEAREST)
    return Resize(size, interpolation=InterpolationMode.BILINEAR, antialias=True)


def resize_name(transform: Resize) -> str:
    """``nearest`` or ``bilinear``: what ``transform`` does (also for one restored from a checkpoint)."""
    return "nearest" if transform.interpolation == InterpolationMode.NEAREST else "bilinear"


class WeightsNormalization(nn.Module):
    """``(x - mean) / std`` per channel, with the statistics the backbone's pretrained weights were trained on.

    Nothing is computed from the data, so it is ready from the start (``ready`` is always True).
    """

    ready = True

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise ``B x 3 x H x W`` images in [0, 1]."""
        return (images - self.mean) / self.std


class MinMaxAccumulator:
    """Running per-channel minimum and maximum of LCN-normalised images (memory independent of the dataset size)."""

    def __init__(self) -> None:
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.count = 0

    def update(self, images: torch.Tensor) -> None:
        """Add a ``B x 3 x H x W`` batch of [0, 1] images."""
        contrast = local_contrast_normalization(images.float())
        low = contrast.amin(dim=(0, 2, 3))
        high = contrast.amax(dim=(0, 2, 3))
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        self.count += images.shape[0]

    def table(self) -> torch.Tensor:
        """``2 x 3`` table; raises if no image was seen or a channel is constant over the whole set."""
        if self.low is None or self.high is None:
            raise RuntimeError("Cannot compute min-max constants: the training set yielded no images.")
        if not bool((self.high > self.low).all()):
            raise RuntimeError(
                "Cannot compute min-max constants: a channel is constant over all training images "
                f"(min {self.low.tolist()}, max {self.high.tolist()})."
            )
        return torch.stack([self.low, self.high]).cpu()


def as_height_width(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of a side or of a ``[height, width]`` pair (what ``image_size`` accepts)."""
    if isinstance(size, int | float):
        return int(size), int(size)
    values = [int(side) for side in size]
    if len(values) != 2:
        raise ConfigurationError(f"image_size is a side or [height, width]; got {list(size)}.")
    return values[0], values[1]


def training_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """The reference's 240 for 224, scaled: anomalies are drawn at this size, then cropped or resized to 224."""
    return round(image_size[0] * 240 / 224), round(image_size[1] * 240 / 224)


#: Images whose aspect ratio is measured for ``keep_aspect_ratio`` (evenly spread over the training set).
ASPECT_SAMPLE = 256
#: Spread of the training images' aspect ratios (max / min) above which a warning says that some are stretched.
ASPECT_SPREAD_WARNING = 1.1


def aspect_preserving_size(side: int, ratio: float) -> tuple[int, int]:
    """``(height, width)`` with the shorter side ``side`` and ``width / height`` as close to ``ratio`` as whole stride-8
    cells allow: the longer side is ``side * max(ratio, 1 / ratio)`` rounded to a multiple of 8."""
    longer = max(side, 8 * round(side * max(ratio, 1 / ratio) / 8))
    return (side, longer) if ratio >= 1 else (longer, side)


def median_aspect_ratio(paths: Sequence[str | Path]) -> tuple[float, float, float]:
    """Median, smallest and largest ``width / height`` of up to :data:`ASPECT_SAMPLE` of ``paths`` (upright, from the
    file headers).

    Raises:
        ConfigurationError: ``paths`` is empty.
    """
    if not len(paths):
        raise ConfigurationError("keep_aspect_ratio needs training images to measure, and the training set is empty.")
    step = max(1, len(paths) // ASPECT_SAMPLE)
    ratios = [width / height for width, height in map(upright_size, list(paths)[::step])]
    return statistics.median(ratios), min(ratios), max(ratios)


def check_aspect_option(image_size: int | Sequence[int], keep_aspect_ratio: bool) -> tuple[int, int]:
    """``(height, width)`` of ``image_size``; with ``keep_aspect_ratio`` it must be one side (the shorter).

    Raises:
        ConfigurationError: ``keep_aspect_ratio`` with two different sides.
    """
    size = as_height_width(image_size)
    if keep_aspect_ratio and size[0] != size[1]:
        raise ConfigurationError(
            f"--model.keep_aspect_ratio takes --model.image_size as one side (the shorter), not {list(size)}; "
            "give e.g. --model.image_size 224."
        )
    return size


class FcddPreProcessor(PreProcessor):
    """Resize (``nearest`` or antialiased ``bilinear``) to ``image_size`` for evaluation and export, to ``train_size``
    for training.

    The reference draws anomalies at 240 x 240 and only then crops or resizes to 224, so training batches are resized
    to 240 here and brought to 224 by the model's augmentation.

    With ``keep_aspect_ratio``, ``image_size`` is the *shorter* side: when the trainer sets up, the longer one is chosen
    from the training images' median aspect ratio (:func:`aspect_preserving_size`), and the chosen size is saved in
    checkpoints, so a checkpoint and its exported graph keep the size it was trained at.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        train_size: int | tuple[int, int] | None = None,
        keep_aspect_ratio: bool = False,
        resize: str = "nearest",
    ) -> None:
        size = check_aspect_option(image_size, keep_aspect_ratio)
        super().__init__(transform=resize_transform(size, check_resize(resize)))
        self.train_size = as_height_width(train_size) if train_size is not None else training_size(size)
        self.train_transform = resize_transform(self.train_size, resize)
        #: The shorter side while the longer one is still to be measured; ``None`` once the size is settled.
        self.aspect_side: int | None = size[0] if keep_aspect_ratio else None

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the network input."""
        return as_height_width(self.transform.size)

    @property
    def resize(self) -> str:
        """``nearest`` or ``bilinear``, from the transform (a restored checkpoint says what it was trained with)."""
        return resize_name(self.transform)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Inference and export: the resize of ``transform``, written so that exported graphs compute it too.

        Nearest is an index gather (:func:`nearest_resize`): it selects exactly the pixels torch does, where the ONNX
        ``Resize`` that torchvision's ``Resize`` exports to picks a neighbouring row or column for some input sizes.
        Bilinear is :func:`smooth_resize`, antialiased like ``transform``, which exporters are not.
        """
        if not isinstance(self.transform, Resize) or len(self.transform.size) != 2:
            return super().forward(batch)
        height, width = self.transform.size
        if self.resize == "nearest":
            return nearest_resize(batch, (height, width))
        return smooth_resize(batch, (height, width))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Settle a ``keep_aspect_ratio`` size, then decode training images straight to ``train_size``.

        anomalib appends the model's (evaluation) resize to every subset's dataset augmentations; for the training set
        that would go original -> 224 -> 240. Swap it for the training resize so it goes original -> 240, as the
        reference does. Lightning runs this hook after the datamodule's ``setup`` and before the model's.
        """
        del pl_module, stage
        datamodule = trainer.datamodule
        subsets = {name: getattr(datamodule, f"{name}_data", None) for name in ("train", "val", "test")}
        if self.aspect_side is not None and subsets["train"] is not None:
            previous = self.transform
            self.resize_to(self._measured_size(subsets["train"]))
            for dataset in subsets.values():
                if dataset is not None:
                    dataset.augmentations = _swap_resize(dataset.augmentations, previous, self.transform)
        if subsets["train"] is not None:
            subsets["train"].augmentations = _swap_resize(
                subsets["train"].augmentations, self.transform, self.train_transform
            )

    def _measured_size(self, train_data: Any) -> tuple[int, int]:
        """The ``keep_aspect_ratio`` size for ``train_data`` (an anomalib dataset), logged with its source."""
        samples = train_data.samples
        paths = list(samples.image_path[samples.label_index == 0]) if "label_index" in samples else []
        median, low, high = median_aspect_ratio(paths or list(samples.image_path))
        size = aspect_preserving_size(self.aspect_side or 0, median)
        logger.info(
            "FCDD: keeping the training images' aspect ratio (median width/height %.3f): image_size %d x %d.",
            median,
            *size,
        )
        if high / low > ASPECT_SPREAD_WARNING:
            logger.warning(
                "FCDD: the training images' aspect ratios range from %.3f to %.3f; each is resized to %d x %d, so "
                "the ones far from the median are stretched.",
                low,
                high,
                *size,
            )
        return size

    def resize_to(self, size: tuple[int, int]) -> None:
        """Use ``size`` as the network input (and its 240/224-scaled training size); the size is then settled."""
        resize = self.resize
        self.transform = resize_transform(size, resize)
        self.export_transform = get_exportable_transform(self.transform)
        self.train_size = training_size(size)
        self.train_transform = resize_transform(self.train_size, resize)
        self.aspect_side = None

    def evaluation_augmentations(self, augmentations: Any) -> Any:
        """A training set's ``augmentations`` with the training resize (to ``train_size``) swapped back for the
        evaluation one: images decoded straight to ``image_size``, resized once as test images are, where resizing
        the training images again would resize twice (anything else is kept)."""
        return _swap_resize(augmentations, self.train_transform, self.transform)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Batch, batch_idx: int) -> None:
        """Resize training images and masks to ``train_size``."""
        del trainer, pl_module, batch_idx
        batch.image, batch.gt_mask = self.train_transform(batch.image, batch.gt_mask)

    def checkpoint_config(self) -> dict[str, Any]:
        """Persist the training size next to the (allow-listed) evaluation transform."""
        return {**super().checkpoint_config(), "train_size": list(self.train_size)}

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore both transforms; a restored size is settled (a checkpoint keeps the size it was trained at)."""
        super().load_checkpoint_config(config)
        self.train_size = as_height_width(config.get("train_size", self.train_size))
        self.train_transform = resize_transform(self.train_size, self.resize)
        self.aspect_side = None


def _swap_resize(augmentations: Any, model_resize: Any, train_resize: Resize) -> Any:
    """``augmentations`` with the appended model resize replaced by ``train_resize`` (anything else is kept)."""
    if augmentations is model_resize or _same_resize(augmentations, model_resize):
        return train_resize
    if isinstance(augmentations, Compose) and augmentations.transforms:
        *head, last = augmentations.transforms
        if last is model_resize or _same_resize(last, model_resize):
            return Compose([*head, train_resize])
    return augmentations


def _same_resize(first: Any, second: Any) -> bool:
    return isinstance(first, Resize) and isinstance(second, Resize) and first.size == second.size
