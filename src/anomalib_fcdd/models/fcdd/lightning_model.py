"""FCDD as anomalib ``AnomalibModule`` s: :class:`FcddHsc` (the paper's proposal) and :class:`Fcdd` (ICLR 2021 setup).

One training step (:meth:`FcddHsc.training_step`), per batch of normal images already resized to ``train_size``
(240) by :class:`~.pre_processing.FcddPreProcessor`:

1. anomalies: each image is replaced with probability ``anomaly_probability`` by a confetti anomaly
   (:mod:`.anomaly_generator`; the paper's sec. 4.1), unless the batch carries real anomalies (the semi-supervised
   datamodules), which are then used instead (the paper's) or, with ``confetti_with_real``, beside confetti on the
   batch's normal images;
2. augmentation: the reference's joint crop/resize to 224, colour jitter and noise (:mod:`.augmentation`);
3. network: ``A = upsample(pseudo_huber(head(backbone(normalise(x)))))`` (:mod:`.torch_model`);
4. loss: the selected hypersphere loss between ``A`` and the full-resolution mask (:mod:`.loss`; eq. 4 or 5).

Both classes list :class:`AnomalibModule` among their *direct* bases, so ``anomalib.models.get_model`` (which scans
``AnomalibModule.__subclasses__()``) finds them by snake-case name; their options are plain types, so checkpoints load
with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import InterpolationMode, Resize

from ...errors import ConfigurationError
from .acceleration import check_precision, resolve_precision
from .anomaly_generator import ConfettiAnomalyGenerator, check_fill
from .augmentation import FcddAugmentation
from .backbones import check_backbone_name, training_defaults
from .backbones.weights import existing_weight_file
from .feature_anomalies import SPREAD_IMAGES, SpreadAccumulator
from .loss import FcddLoss, check_loss_name
from .map_fusion import CALIBRATION_SIZE, CalibrationSample
from .memory_bank import MEMORY_DIM, MEMORY_SIZE, POOL_SIZE, PositionPool
from .pre_processing import (
    MVTEC_MINMAX,
    FcddPreProcessor,
    MinMaxAccumulator,
    as_height_width,
    check_aspect_option,
    check_input_normalization,
    check_resize,
    resize_transform,
    resolve_minmax,
)
from .torch_model import FcddModel, check_head, check_heads, check_image_score

logger = logging.getLogger(__name__)


def check_options(options: Mapping[str, Any]) -> None:
    """Refuse an unknown ``loss``, ``backbone`` or ``precision``, impossible ``minmax`` constants and a missing
    ``weights_path`` file up front.

    ``FcddHsc``/``Fcdd`` run it first thing; ``anomalib-fcdd`` runs it on the parsed options before jsonargparse
    builds the model, since jsonargparse would report the error inside a long "does not validate" message.

    Raises:
        ConfigurationError: naming the option, the value and what it accepts.
        WeightsError: ``weights_path`` names no file.
    """
    if "loss" in options:
        check_loss_name(options["loss"])
    if "backbone" in options:
        check_backbone_name(options["backbone"])
    if "precision" in options:
        check_precision(options["precision"])
    if "image_size" in options:
        check_image_size(options["image_size"])
        check_aspect_option(options["image_size"], bool(options.get("keep_aspect_ratio")))
    if "input_normalization" in options:
        check_input_normalization(options["input_normalization"])
    if "resize" in options:
        check_resize(options["resize"])
    if options.get("minmax") not in {None, "auto"}:
        resolve_minmax(options["minmax"])
    if options.get("weights_path") is not None:
        existing_weight_file(options["weights_path"], "--model.weights_path")
    if options.get("lr_schedule") not in {None, *LR_SCHEDULES}:
        raise ConfigurationError(
            f"Unknown lr_schedule {options['lr_schedule']!r} (--model.lr_schedule); use one of {LR_SCHEDULES}."
        )
    if options.get("lr_schedule") == "cosine" and options.get("lr_decay") is not None:
        raise ConfigurationError(
            "--model.lr_decay applies to --model.lr_schedule exponential only; the cosine schedule decays to 0 by "
            "itself. Drop lr_decay, or add --model.lr_schedule exponential."
        )
    if options.get("optimizer") not in {None, *OPTIMIZERS}:
        raise ConfigurationError(
            f"Unknown optimizer {options['optimizer']!r} (--model.optimizer); use one of {OPTIMIZERS}."
        )
    if options.get("head") is not None:
        check_head(options["head"])
    if options.get("image_score") is not None:
        check_image_score(options["image_score"])
    if options.get("heads") is not None:
        check_heads(options["heads"])
    if options.get("anomaly_fill") is not None:
        check_fill(options["anomaly_fill"])
    for name, (allowed, wording) in NUMBER_RANGES.items():
        value = options.get(name)
        if value is not None and not allowed(value):
            raise ConfigurationError(f"--model.{name} {value} is out of range: it must be {wording}.")


#: Training steps after which the expected duration of the whole budget is logged.
ETA_AFTER_STEPS = 5
#: ``optimizer`` choices.
OPTIMIZERS = ("sgd", "adam")
#: ``lr_schedule`` choices (``backbones.base.TrainingDefaults.lr_schedule``).
LR_SCHEDULES = ("exponential", "cosine")
#: Numeric options and the values they accept (``None`` always means "the backbone's default").
NUMBER_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda v: v > 0, "above 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "lr_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "epochs": (lambda v: v >= 1, "1 or more (a training needs at least one pass)"),
    "passes_per_epoch": (lambda v: v >= 1, "1 or more"),
    "anomaly_probability": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "gauss_std": (lambda v: v > 0, "above 0"),
    "map_gauss_std": (lambda v: v > 0, "above 0"),
    "feature_noise": (lambda v: v >= 0, "0 (off) or more"),
    "memory_size": (lambda v: isinstance(v, int) and v >= 1, "a whole number of at least 1"),
    "memory_dim": (lambda v: isinstance(v, int) and v >= 1, "a whole number of at least 1"),
    "memory_neighbourhood": (lambda v: isinstance(v, int) and v >= 1 and v % 2 == 1, "an odd whole number (1, 3, ...)"),
}


def check_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` if every side is a multiple of 8 and at least 32 (the backbones' stride-8 grid needs
    whole cells, and the deepest stages several of them); else a :class:`ConfigurationError`."""
    size = as_height_width(image_size)
    if any(side < 32 or side % 8 for side in size):
        raise ConfigurationError(
            f"image_size {list(size)} (--model.image_size): each side must be a multiple of 8 and at least 32, "
            "e.g. 224 or [192, 288]."
        )
    return size


class FcddHsc(AnomalibModule):
    """FCDD with the paper's pixel-wise, class-balanced hypersphere loss (eq. 5) by default.

    Args:
        backbone: feature extractor: ``efficientnet_lite0_multiscale`` (default: the most accurate one measured whose
            ImageNet weights ship with a pip package, so it works offline), ``efficientnet_lite0``, ``vgg11_bn``
            (the paper's; ``configs/`` use it), ``resnet18`` or ``wide_resnet50_2``; see ``docs/backbones.md``.
        pre_trained: load ImageNet weights for the backbone (cache, download, or the offline package).
        weights_path: local backbone weight file (used whenever given).
        frozen_modules: leading backbone modules to freeze; ``None`` = the paper's choice (VGG: through the 3rd pool).
        loss: ``pixel_balanced`` (eq. 5), ``per_image`` (the paper's baseline as run) or ``fcdd`` (eq. 4).
        anomaly_probability: chance that a training image is replaced by an anomaly.
        confetti_smoothing: blur confetti noise (25 x 25, sigma 5) as in the original FCDD (``colour`` fill only).
        anomaly_fill: what fills the confetti blobs: ``colour`` (the paper's flat colours) or ``patch`` (content of
            another training image, shifted and turned; :mod:`.anomaly_generator`).
        image_level_masks: mark a whole synthetic-anomaly image as anomalous (original FCDD) instead of its pixels.
        gauss_std: sigma of the Gaussian receptive-field upsampler.
        minmax: ``auto`` (shipped constants for MVTec-AD categories, otherwise computed from the training images),
            ``None`` (always compute), a MVTec-AD category name, or six numbers (3 minima, 3 maxima).
        augment: apply the reference's training augmentation.
        image_size: side of the network input (224), or ``[height, width]`` for non-square parts; each side a
            multiple of 8, at least 32.
        keep_aspect_ratio: ``image_size`` is the shorter side, and the longer one follows the training images'
            median aspect ratio (measured when training starts, saved in the checkpoint; see
            :class:`~.pre_processing.FcddPreProcessor`).
        optimizer: ``sgd`` (Nesterov when momentum > 0, the paper's) or ``adam`` (AdamW).
        lr, momentum, weight_decay: optimiser settings.
        lr_decay: multiplicative learning-rate decay per paper epoch (``lr_schedule="exponential"``).
        lr_schedule: ``exponential`` (``lr * lr_decay^paper_epoch``, the paper's) or ``cosine``
            (``lr * (1 + cos(pi * step / steps)) / 2`` over every optimiser step of the budget).
        epochs: paper epochs; the trainer runs ``epochs * passes_per_epoch`` passes over the training set.
        passes_per_epoch: passes over the training set per paper epoch (10 in the reference).
        frozen_bn_train_mode: keep frozen BatchNorm layers in train mode while training (reference behaviour).

    ``optimizer``, ``lr``, ``lr_decay``, ``lr_schedule``, ``epochs``, ``passes_per_epoch``, ``frozen_bn_train_mode``,
    ``head``, ``heads``, ``image_score``, ``anomaly_fill``, ``feature_noise``, ``confetti_with_real``,
    ``memory_neighbourhood``, ``normalized_map``, ``fused_map`` and ``map_gauss_std`` left unset take the backbone's
    measured defaults
    (``backbones.TRAINING_DEFAULTS``; the paper's recipe for VGG-11-BN and the ResNets), so every backbone trains to
    its best accuracy in a bounded time.
        precision: Lightning precision; ``auto`` = ``bf16-mixed`` where bf16 is native (AMX/AVX512-BF16 CPUs, CUDA
            GPUs with bf16), else ``32-true``.
        accelerate: channels-last tensors and BatchNorm folded at inference (:mod:`.acceleration`); ``False`` runs
            plain eager layers. Either way the network computes the same function up to float rounding.
        input_normalization: ``lcn_minmax`` (the paper's LCN + min-max, sec. 4), ``weights`` (the statistics the
            pretrained backbone was trained with) or ``auto``: the paper's for VGG-11-BN and untrained backbones,
            the weights' own for every other pretrained backbone.
        resize: how images are brought to ``image_size`` (and to the 240/224-scaled training size): ``nearest``, the
            reference's, or antialiased ``bilinear``; the exported graph resizes the same way.
        head: ``linear`` (the paper's 1x1 convolution) or ``mlp`` (two 1x1 convolutions, BatchNorm and ReLU between).
        heads: how many such heads train side by side, each from its own random start and on its own loss; the map
            is the mean of theirs (:class:`~.torch_model.FcddModel`). Averaging evens out the start each one depends on.
        image_score: ``mean`` of the low-resolution map (the reference's), ``max`` of the upsampled map, or
            ``memory``: the peak of the upsampled distances to a small memory of normal feature vectors, built from
            the clean training images when training ends (:mod:`.memory_bank`; the map is FCDD's unless ``fused_map``).
        memory_size: vectors the memory keeps (greedy k-centre coreset; ``image_score="memory"`` only).
        memory_dim: PCA dimensions each memory vector is stored in (at most the channels it compares).
        memory_neighbourhood: compare feature vectors averaged over ``k x k`` neighbours (PatchCore's locally aware
            features; odd ``k``) instead of the vectors themselves (1). Default: the backbone's (5 for
            ``efficientnet_lite0_multiscale``, whose memory also reads only its stride-8 and deepest stages).
        normalized_map: upsample the output map as a weighted mean of the low-resolution scores instead of the
            reference's Gaussian sum, whose mass fades towards the image's border (:class:`~.torch_model.FcddModel`);
            training keeps the sum. Default: the backbone's (on for ``efficientnet_lite0_multiscale``).
        fused_map: the output map adds the memory's distances to the heads' scores, each divided by its spread over
            normal training positions (:mod:`.map_fusion`); the memory is then built whatever ``image_score`` is.
            Default: the backbone's (on for ``efficientnet_lite0_multiscale``).
        map_gauss_std: sigma of the output map's Gaussian upsampler; the training loss and the memory's image score
            keep ``gauss_std``. Default: the backbone's (8 for ``efficientnet_lite0_multiscale``, its grid's stride:
            sharper maps; ``gauss_std`` for the paper's backbones).
        feature_noise: relative size of the feature-space anomalies scored alongside every training batch (its
            features plus Gaussian noise, :mod:`.feature_anomalies`; not in the paper); 0 turns them off.
        confetti_with_real: with real training anomalies (semi-supervised datamodules), also corrupt the batch's
            normal images with confetti, each with ``anomaly_probability`` (not in the paper, which uses the real
            ones alone): a handful of real defects then teach what defects look like, and the confetti keeps the
            head from learning only those few.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0_multiscale",
        pre_trained: bool = True,
        weights_path: str | None = None,
        frozen_modules: int | None = None,
        loss: str = "pixel_balanced",
        anomaly_probability: float = 0.5,
        confetti_smoothing: bool = False,
        image_level_masks: bool = False,
        anomaly_fill: str | None = None,
        gauss_std: float = 12.0,
        minmax: str | list[float] | None = "auto",
        augment: bool = True,
        image_size: int | tuple[int, int] = 224,
        keep_aspect_ratio: bool = False,
        optimizer: str | None = None,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_decay: float | None = None,
        lr_schedule: str | None = None,
        epochs: int | None = None,
        passes_per_epoch: int | None = None,
        frozen_bn_train_mode: bool | None = None,
        precision: str = "auto",
        accelerate: bool = True,
        input_normalization: str = "auto",
        resize: str = "nearest",
        head: str | None = None,
        heads: int | None = None,
        image_score: str | None = None,
        feature_noise: float | None = None,
        confetti_with_real: bool | None = None,
        memory_size: int = MEMORY_SIZE,
        memory_dim: int = MEMORY_DIM,
        memory_neighbourhood: int | None = None,
        normalized_map: bool | None = None,
        fused_map: bool | None = None,
        map_gauss_std: float | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: Any = True,
        evaluator: Evaluator | bool = True,
        visualizer: Any = True,
    ) -> None:
        check_options({name: value for name, value in locals().items() if name != "self"})
        super().__init__(
            pre_processor=self.configure_pre_processor(check_image_size(image_size), keep_aspect_ratio, resize)
            if pre_processor is True
            else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.minmax = minmax
        self.image_size = check_image_size(image_size)
        #: ``nearest`` or ``bilinear``: how the pre-processor and the augmentation resize images.
        self.resize = resize
        defaults = training_defaults(backbone)
        self.optimizer_name = _chosen(optimizer, defaults.optimizer)
        self.lr, self.lr_decay = _chosen(lr, defaults.lr), _chosen(lr_decay, defaults.lr_decay)
        self.lr_schedule = _chosen(lr_schedule, defaults.lr_schedule)
        if self.lr_schedule == "cosine" and lr_decay is not None:
            logger.warning(
                "FCDD: lr_decay=%s is not used: %s trains with a cosine schedule; add --model.lr_schedule exponential "
                "to decay by lr_decay per paper epoch.",
                lr_decay,
                backbone,
            )
        self.momentum, self.weight_decay = momentum, weight_decay
        self.epochs = _chosen(epochs, defaults.epochs)
        self.passes_per_epoch = _chosen(passes_per_epoch, defaults.passes_per_epoch)
        # A step budget (bounded time whatever the dataset's size) applies unless the user sets a pass budget.
        self.steps = defaults.steps if epochs is None and passes_per_epoch is None else None
        #: Trainer epochs per paper epoch: ``passes_per_epoch``, or 1 where the datamodule shuffles the passes of a
        #: paper epoch together (:meth:`_batch_paper_epochs`).
        self.trainer_epochs_per_paper_epoch = self.passes_per_epoch
        self.precision = str(precision)
        self.model = FcddModel(
            backbone=backbone,
            pre_trained=pre_trained,
            weights_path=weights_path,
            frozen_modules=frozen_modules,
            gauss_std=gauss_std,
            minmax=None if minmax in {"auto", None} else minmax,
            frozen_bn_train_mode=_chosen(frozen_bn_train_mode, defaults.frozen_bn_train_mode),
            accelerate=accelerate,
            input_normalization=input_normalization,
            head=_chosen(head, defaults.head),
            heads=_chosen(heads, defaults.heads),
            image_score=_chosen(image_score, defaults.image_score),
            feature_noise=_chosen(feature_noise, defaults.feature_noise),
            memory_size=memory_size,
            memory_dim=memory_dim,
            memory_neighbourhood=_chosen(memory_neighbourhood, defaults.memory_neighbourhood),
            normalized_map=bool(_chosen(normalized_map, defaults.normalized_map)),
            fused_map=bool(_chosen(fused_map, defaults.fused_map)),
            map_gauss_std=_chosen(map_gauss_std, defaults.map_gauss_std),
        )
        #: Optimiser step at which the memory was last built (``image_score="memory"``), ``None`` before.
        self._memory_step: int | None = None
        #: Normal training positions drawn with the memory's pool: the fused map's spreads are measured on them.
        self._calibration: CalibrationSample | None = None
        self.loss = FcddLoss(loss)
        self.anomaly_generator = ConfettiAnomalyGenerator(
            probability=anomaly_probability,
            image_level_masks=image_level_masks,
            fill=_chosen(anomaly_fill, defaults.anomaly_fill),
            smooth=confetti_smoothing,
        )
        self.augmentation = FcddAugmentation(size=self.image_size, resize=self.resize) if augment else None
        self.real_anomalies = False
        self.confetti_with_real = bool(_chosen(confetti_with_real, defaults.confetti_with_real))

    # ----------------------------------------------------------------------------------------------------------------
    # The paper's training step
    # ----------------------------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """One FCDD step: anomalies, augmentation, forward, hypersphere loss."""
        del args, kwargs
        images, masks = self.training_inputs(batch)
        output = self.model(images)
        loss = self.loss(output.anomaly_map, masks, output.feature_anomalies)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, logger=True, batch_size=len(images))
        return {"loss": loss}

    def training_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and ``B x 1 x H x W`` masks for the loss: real anomalies if the batch has any (and confetti on its
        normal images with ``confetti_with_real``), else confetti."""
        images = batch.image
        has_real = self.real_anomalies or (batch.gt_label is not None and bool(torch.as_tensor(batch.gt_label).any()))
        if not has_real:
            images, masks, _ = self.anomaly_generator(images)
            return self._augment(images, masks)
        if batch.gt_mask is None:
            raise ValueError("A training batch holds anomalous images but no masks; FCDD needs pixel masks.")
        masks = torch.as_tensor(batch.gt_mask).view(images.shape[0], 1, *images.shape[-2:]).bool()
        if self.confetti_with_real:
            images, masks = self._confetti_on_normal_images(images, masks)
        return self._augment(images, masks)

    def _confetti_on_normal_images(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Confetti on the images whose mask is empty, each with ``anomaly_probability``; real anomalies untouched."""
        normal = ~masks.flatten(1).any(1)
        if not bool(normal.any()):
            return images, masks
        corrupted, confetti_masks, _ = self.anomaly_generator(images[normal])
        images, masks = images.clone(), masks.clone()
        images[normal], masks[normal] = corrupted, confetti_masks
        return images, masks

    def _augment(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's augmentation, or a resize to ``image_size`` when it is off."""
        if self.augmentation is not None:
            return self.augmentation(images, masks)
        if tuple(images.shape[-2:]) != self.image_size:
            nearest = Resize(self.image_size, interpolation=InterpolationMode.NEAREST)
            return resize_transform(self.image_size, self.resize)(images), nearest(masks.float()) > 0.5
        return images, masks

    def on_validation_start(self) -> None:
        """Build the memory of ``image_score="memory"`` before the first validation of a fit (and again before later
        ones if training changes the backbone's features), so validation and every later use score with it."""
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._refresh_memory()

    def on_train_end(self) -> None:
        """A fit that never validated still leaves a memory behind."""
        self._refresh_memory()

    def _refresh_memory(self) -> None:
        """(Re)build the memory where it is missing, or stale because training has changed the features since; then
        measure the fused map's spreads again, since the heads change with every step."""
        memory = self.model.memory
        if memory is None:
            return
        step = self.trainer.global_step
        changed = self.model.features_change_in_training and step != self._memory_step
        uncalibrated = self.model.map_fusion is not None and self._calibration is None
        if self._memory_step is None or changed or not memory.ready or uncalibrated:
            self._build_memory()
            self._memory_step = step
        if self.model.map_fusion is not None and self._calibration is not None:
            self.model.calibrate_map(self._calibration)
            logger.info(
                "FCDD: fused map's spreads (heads, memory) %s on %d training positions.",
                [round(value, 6) for value in self.model.map_fusion.spreads.tolist()],
                len(self._calibration.features),
            )

    @torch.no_grad()
    def _build_memory(self) -> None:
        """Fill the memory from the clean normal training images, decoded and resized once as test images are
        (:meth:`_normal_training_batches` with ``as_tested``), in eval mode
        (:mod:`.memory_bank`: a bounded pool of positions, its PCA basis, a greedy coreset in it). With ``fused_map``
        it also keeps a sample of other positions for the map's spreads (:mod:`.map_fusion`)."""
        memory = self.model.memory
        datamodule = self.trainer.datamodule
        dataset = getattr(datamodule, "train_data", None)
        if dataset is not None:
            images = len(dataset)
        else:  # no dataset to count: the training loader's batches times their size (an endless loader: a guess)
            batches = self.trainer.num_training_batches
            size = getattr(datamodule, "train_batch_size", 1)
            images = int(batches) * size if math.isfinite(batches) else POOL_SIZE
        started = time.perf_counter()
        pool = PositionPool(POOL_SIZE, max(1, images), torch.Generator().manual_seed(0))
        calibration = (
            PositionPool(CALIBRATION_SIZE, max(1, images), torch.Generator().manual_seed(1))
            if self.model.map_fusion is not None
            else None
        )
        resize = resize_transform(self.image_size, self.resize)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self._normal_training_images(as_tested=True):
                features = self.model.backbone_features(resize(batch))
                read = memory.memory_features(features)
                pool.add(read)
                if calibration is not None:
                    calibration.add(torch.cat([features.float(), read.float()], dim=1))
        finally:
            self.model.train(was_training)
        vectors = pool.vectors()
        memory.fit(vectors.to(self.device))
        if calibration is not None:
            sample = calibration.vectors()
            channels = read.shape[1]
            self._calibration = CalibrationSample(sample[:, :-channels], sample[:, -channels:])
        logger.info(
            "FCDD: image-score memory of %d vectors (%d PCA dimensions) chosen from %d training positions in %.1f s.",
            len(memory.vectors),
            memory.basis.shape[1],
            len(vectors),
            time.perf_counter() - started,
        )

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score the validation batch (anomalib's post-processor fits thresholds on these outputs)."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    # ----------------------------------------------------------------------------------------------------------------
    # Set-up: normalisation constants, optimiser, trainer
    # ----------------------------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """Pick the anomaly source and make sure the min-max constants exist (shipped MVTec ones or computed)."""
        self._pace_started: float | None = None
        self.model.require_weights()  # pretrained weights that could not be fetched (and no checkpoint resumed)
        datamodule = self.trainer.datamodule
        # A datamodule that supplies real training anomalies (MVTecFewAnomalies) makes every batch a semi-supervised
        # one: confetti goes off, or onto the normal images only (confetti_with_real).
        self.real_anomalies = bool(getattr(datamodule, "training_anomalies", None))
        self._settle_normalization(datamodule)
        if self.model.feature_noise is not None:
            self.model.feature_noise.set_spread(self._feature_spread())

    def _settle_normalization(self, datamodule: Any) -> None:
        """Min-max constants for ``lcn_minmax``: already there, the shipped MVTec-AD ones, or computed."""
        if bool(self.model.normalization.ready):
            return
        category = getattr(datamodule, "category", None)
        if self.minmax == "auto" and category in MVTEC_MINMAX and _is_mvtec(datamodule):
            self.model.normalization.set_constants(torch.tensor(MVTEC_MINMAX[category]).view(2, 3))
            logger.info("FCDD: using the reference's MVTec-AD min-max constants for %r.", category)
            return
        self.model.normalization.set_constants(self._compute_minmax())

    def _compute_minmax(self) -> torch.Tensor:
        """Per-channel min/max after LCN over the normal training images at ``image_size`` (one streaming pass).

        The pass reads the datamodule's normal training set directly, before any anomaly replaces an image (the
        semi-supervised datamodules swap half of the images for real anomalies in their training loader) and
        without a distributed sampler, so every DDP rank sees the same images and gets the same constants.
        """
        accumulator = MinMaxAccumulator()
        resize = resize_transform(self.image_size, self.resize)
        for images in self._normal_training_images():
            accumulator.update(resize(images))
        table = accumulator.table()
        logger.info("FCDD: min-max constants computed from %d training images: %s", accumulator.count, table.tolist())
        return table

    def _feature_spread(self) -> torch.Tensor:
        """Per-channel spread of the backbone's features over up to ``SPREAD_IMAGES`` normal training images, each
        prepared as a training step prepares it (confetti, augmentation): the scale of the feature noise."""
        accumulator, images_seen = SpreadAccumulator(), 0
        was_training = self.model.training
        self.model.eval()  # frozen statistics; nothing is learnt here
        try:
            with torch.no_grad():
                for images in self._normal_training_images():
                    images = images[: SPREAD_IMAGES - images_seen]
                    images, masks, _ = self.anomaly_generator(images)
                    accumulator.update(self.model.backbone_features(self._augment(images, masks)[0]))
                    images_seen += len(images)
                    if images_seen >= SPREAD_IMAGES:
                        break
        finally:
            self.model.train(was_training)
        logger.info("FCDD: feature-noise scale measured on %d training images.", images_seen)
        return accumulator.spread()

    def _normal_training_images(self, as_tested: bool = False) -> Iterator[torch.Tensor]:
        """The normal images of each training batch (never an empty one), on the model's device."""
        for batch in self._normal_training_batches(as_tested):
            labels = batch.gt_label
            images = batch.image if labels is None else batch.image[~torch.as_tensor(labels).bool()]
            if len(images):
                yield images.to(self.device)

    def _normal_training_batches(self, as_tested: bool = False) -> Any:
        """Batches of the datamodule's normal training set, or the trainer's training loader if it has none.

        ``as_tested``: decode the images straight to the evaluation size, as the test images are, instead of to the
        larger training size (then resized again): a copy of the dataset whose augmentations end in the evaluation
        resize (:meth:`~.pre_processing.FcddPreProcessor.evaluation_augmentations`). Its items are decoded anew,
        since the kept training items are the training size's. The memory then compares test images with training
        images prepared the same way (over three pool draws, resizing twice had cost Magnetic-Tile 0.5 points of image
        AUROC; in the benchmark's own draw the change moved it by -0.3, offline ``ANALYSIS.md``)."""
        datamodule = self.trainer.datamodule
        dataset = getattr(datamodule, "train_data", None)
        if dataset is None:
            return self.trainer.train_dataloader
        swap = getattr(self.pre_processor, "evaluation_augmentations", None)
        if as_tested and swap is not None and hasattr(dataset, "augmentations"):
            augmentations = swap(dataset.augmentations)
            if augmentations is not dataset.augmentations:
                dataset = copy.copy(dataset)
                dataset.augmentations = augmentations
        return DataLoader(
            dataset,
            batch_size=getattr(datamodule, "eval_batch_size", 32),
            num_workers=getattr(datamodule, "num_workers", 0),
            collate_fn=getattr(dataset, "collate_fn", None),
        )

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with Nesterov momentum (or AdamW); the lr decays by ``lr_decay`` once per paper epoch, or along half a
        cosine to 0 over every step of the budget (``lr_schedule``)."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            optimizer: optim.Optimizer = optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = optim.SGD(
                parameters,
                lr=self.lr,
                momentum=self.momentum,
                nesterov=self.momentum > 0,
                weight_decay=self.weight_decay,
            )
        if self.lr_schedule == "cosine":
            total = max(1, self.steps if self.steps is not None else int(self.trainer.estimated_stepping_batches))
            cosine = optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
        decay, per_paper_epoch = self.lr_decay, self.trainer_epochs_per_paper_epoch
        scheduler = optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: decay ** (epoch // per_paper_epoch))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation; bf16 where native; the budget: ``steps`` optimiser steps (validated once, at the end)
        or ``epochs`` paper epochs = ``epochs * passes_per_epoch`` passes (validated after each paper epoch)."""
        arguments: dict[str, Any] = {"num_sanity_val_steps": 0, "precision": resolve_precision(self.precision)}
        if self.steps is not None:
            return {
                **arguments,
                "max_steps": self.steps,
                "max_epochs": -1,
                "check_val_every_n_epoch": None,
                "val_check_interval": self.steps,
            }
        return {
            **arguments,
            "max_epochs": self.epochs * self.passes_per_epoch,
            "check_val_every_n_epoch": self.passes_per_epoch,
        }

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After a few steps, say how long the whole budget will take at their pace. The clock starts after the first
        step, which also pays for starting the workers and building the kernels (counted, it made the estimate for
        bottle 7.8 min where the training took 1.7)."""
        del outputs, batch, batch_idx
        step = self.trainer.global_step
        if step == 1:
            self._pace_started = time.perf_counter()
        elif step == 1 + ETA_AFTER_STEPS and getattr(self, "_pace_started", None) is not None:
            elapsed = time.perf_counter() - self._pace_started
            total = self.trainer.estimated_stepping_batches
            logger.info(
                "FCDD: %d training steps in all; about %.1f min at the pace of steps 2-%d.",
                total,
                elapsed / ETA_AFTER_STEPS * total / 60,
                1 + ETA_AFTER_STEPS,
            )

    def setup(self, stage: str) -> None:
        """Take the input size the pre-processor settled (``keep_aspect_ratio``; its hook runs just before this one),
        batch paper epochs as the reference does (:meth:`_batch_paper_epochs`), and settle ``precision="auto"`` for
        the device the run really uses.

        ``trainer_arguments`` is read before the trainer exists, so it resolves ``auto`` for the default device: a
        bf16 GPU when there is one. A run forced onto the CPU (``--trainer.accelerator cpu``) of such a machine would
        then autocast to bf16 even where this CPU only emulates it. Lightning calls this hook before its strategy
        sets up the module, so the precision plugin can still be swapped.
        """
        super().setup(stage)
        self._adopt_input_size()
        if stage == "fit" and self._trainer is not None:
            self._batch_paper_epochs()
            self._scale_step_budget()
        if self.precision != "auto" or self._trainer is None:
            return
        strategy = self.trainer.strategy
        plugin = strategy.precision_plugin
        if type(plugin) not in {Precision, MixedPrecision}:  # a strategy's own plugin (FSDP, DeepSpeed, ...)
            return
        device = strategy.root_device.type
        wanted = resolve_precision("auto", device)
        if wanted != plugin.precision:
            strategy.precision_plugin = Precision() if wanted == "32-true" else MixedPrecision("bf16-mixed", device)
            logger.info("FCDD: precision 'auto' on %s is %s, not %s.", device, wanted, plugin.precision)

    def _scale_step_budget(self) -> None:
        """Raise a step budget to the backbone's ``min_passes`` over a large training set (at most ``max_steps``;
        :meth:`~.backbones.base.TrainingDefaults.step_budget`), once the datamodule says how many images it holds."""
        if self.steps is None:
            return
        datamodule = self.trainer.datamodule
        dataset = getattr(datamodule, "train_data", None)
        images = len(dataset) if dataset is not None else None
        batch_size = getattr(datamodule, "train_batch_size", None)
        steps = training_defaults(self.model.backbone_name).step_budget(images, batch_size)
        if steps is None or steps == self.steps or not images or not batch_size:
            return
        logger.info(
            "FCDD: %d training steps for %d training images (%.0f passes).", steps, images, steps * batch_size / images
        )
        self.steps = steps
        self.trainer.fit_loop.epoch_loop.max_steps = steps
        self.trainer.val_check_interval = steps

    def _batch_paper_epochs(self) -> None:
        """Make one trainer epoch one paper epoch, batched as the reference batches it, where the datamodule can.

        The reference shuffles the ``passes_per_epoch`` passes of a paper epoch together and cuts them into batches
        (of 128), so only the paper epoch's last batch is partial. This package's datamodules do the same
        (``passes_per_loader``); the trainer then runs ``epochs`` epochs and validates after each. Other datamodules
        keep ``epochs * passes_per_epoch`` separate passes. A step budget is unaffected.
        """
        datamodule = self.trainer.datamodule
        if self.steps is not None or self.passes_per_epoch == 1 or not hasattr(datamodule, "passes_per_loader"):
            return
        datamodule.passes_per_loader = self.passes_per_epoch
        self.trainer.fit_loop.max_epochs = self.epochs
        self.trainer.check_val_every_n_epoch = 1
        self.trainer_epochs_per_paper_epoch = 1
        logger.info(
            "FCDD: each of the %d paper epochs shuffles %d passes over the training set together (the reference's "
            "batching).",
            self.epochs,
            self.passes_per_epoch,
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (``Engine.export(..., "torch")``, ``torch.save`` of the module) without the fused map's calibration
        sample: 10,000 training positions (15 MB) that only a later fit would use, and that it draws again."""
        state = super().__getstate__()
        state["_calibration"] = None
        return state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the pre-processor (anomalib) and take the input size it was trained at."""
        super().on_load_checkpoint(checkpoint)
        self._adopt_input_size()

    def _adopt_input_size(self) -> None:
        """Train at the pre-processor's size and with its resize: the size differs from ``image_size`` once
        ``keep_aspect_ratio`` settled it, and a restored checkpoint brings both."""
        self.resize = getattr(self.pre_processor, "resize", self.resize)
        size = getattr(self.pre_processor, "image_size", None)
        if size is not None:
            self.image_size = tuple(size)
        if self.augmentation is not None:
            self.augmentation = FcddAugmentation(size=self.image_size, resize=self.resize)

    @staticmethod
    def _post_training_quantization_ov(model: Any, datamodule: Any = None) -> Any:
        """INT8_PTQ for every export path (``Engine.export``, ``anomalib export``): backbone INT8, the rest float.

        See :mod:`anomalib_fcdd.deploy.quantization` for why the element-wise ops and the upsampler stay in float.
        """
        from anomalib_fcdd.deploy.quantization import quantize_post_training

        return quantize_post_training(model, datamodule)

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images (plus synthetic or a few real anomalies)."""
        return LearningType.ONE_CLASS

    @classmethod
    def configure_pre_processor(
        cls, image_size: tuple[int, int] | None = None, keep_aspect_ratio: bool = False, resize: str = "nearest"
    ) -> PreProcessor:
        """Resize to 224 (240 while training); the input normalisation lives inside the network."""
        return FcddPreProcessor(
            image_size=as_height_width(image_size or 224), keep_aspect_ratio=keep_aspect_ratio, resize=resize
        )

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC/F1 and pixel AUROC, AP (AUPR) and AUPRO on test; image and pixel AUROC on validation."""
        val_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
        ]
        return Evaluator(val_metrics=val_metrics, test_metrics=test_metrics)


class Fcdd(FcddHsc, AnomalibModule):
    """FCDD in its original ICLR 2021 configuration: eq. (4), smoothed colour confetti, whole-image anomaly labels.

    Takes every argument of :class:`FcddHsc`; only these six defaults differ (real anomalies, where a datamodule
    supplies them, are used alone, as the original did). ``AnomalibModule`` is named as a direct base so that
    ``get_model("fcdd")`` finds the class.
    """

    def __init__(
        self,
        loss: str = "fcdd",
        confetti_smoothing: bool = True,
        image_level_masks: bool = True,
        anomaly_fill: str = "colour",
        feature_noise: float = 0.0,
        confetti_with_real: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            loss=loss,
            confetti_smoothing=confetti_smoothing,
            image_level_masks=image_level_masks,
            anomaly_fill=anomaly_fill,
            feature_noise=feature_noise,
            confetti_with_real=confetti_with_real,
            **kwargs,
        )


def _chosen(value: Any, default: Any) -> Any:
    """The user's ``value``, or the backbone's ``default`` where it was left unset (``None``)."""
    return default if value is None else value


def _is_mvtec(datamodule: object) -> bool:
    from anomalib.data import MVTecAD

    return isinstance(datamodule, MVTecAD)
