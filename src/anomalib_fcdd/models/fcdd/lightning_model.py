"""FCDD as anomalib ``AnomalibModule`` s: :class:`FcddHsc` (the paper's proposal) and :class:`Fcdd` (ICLR 2021 setup).

Training step, per batch of normal images (already resized to ``train_size`` = 240 by the pre-processor):

1. each image is replaced with probability ``anomaly_probability`` by a confetti anomaly (pixel masks, or whole-image
   masks for the original FCDD), unless the batch already carries real anomalies (semi-supervised datamodules), which
   are then used instead -- never both;
2. the reference augmentation (joint crop/resize to 224, colour jitter, noise) is applied to image and mask;
3. the network returns the upsampled pseudo-Huber map ``A`` and the selected hypersphere loss compares it with the
   full-resolution mask.

Both classes derive *directly* from ``AnomalibModule`` (through a plain mixin) so that ``anomalib.models.get_model``
finds them by snake-case name; their init arguments are plain types so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torchvision.transforms.v2 import Compose, InterpolationMode, Resize

from .anomaly_generator import ConfettiAnomalyGenerator
from .augmentation import FcddAugmentation
from .backbones import check_backbone_name
from .loss import FcddLoss, check_loss_name
from .performance import HOST_MEMORY_REUSE, check_precision, resolve_precision
from .preprocessing import MVTEC_MINMAX, MinMaxAccumulator, nearest_resize, resolve_minmax
from .torch_model import FcddModel
from .weights import existing_weight_file

logger = logging.getLogger(__name__)


class FcddPreProcessor(PreProcessor):
    """Nearest-neighbour resize to ``image_size`` for evaluation and export, to ``train_size`` for training.

    The reference draws anomalies at 240 x 240 and only then crops or resizes to 224, so training batches are resized
    to 240 here and brought to 224 by the model's augmentation.
    """

    def __init__(self, image_size: int = 224, train_size: int = 240) -> None:
        super().__init__(transform=Resize((image_size, image_size), interpolation=InterpolationMode.NEAREST))
        self.train_size = train_size
        self.train_transform = Resize((train_size, train_size), interpolation=InterpolationMode.NEAREST)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Inference and export: the same nearest resize as ``transform``, as an index gather (:func:`nearest_resize`).

        The gather selects exactly the pixels torch does; the ONNX ``Resize`` that torchvision's ``Resize`` exports to
        picks a neighbouring row or column for some input sizes, so exported graphs would differ from eager torch.
        """
        if not isinstance(self.transform, Resize) or len(self.transform.size) != 2:
            return super().forward(batch)
        height, width = self.transform.size
        return nearest_resize(batch, (height, width))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Decode training images straight to ``train_size``.

        anomalib appends the model's (evaluation) resize to every subset's dataset augmentations; for the training set
        that would go original -> 224 -> 240. Swap it for the training resize so it goes original -> 240, as the
        reference does.
        """
        del pl_module, stage
        train_data = getattr(trainer.datamodule, "train_data", None) if trainer.datamodule is not None else None
        if train_data is not None:
            train_data.augmentations = _swap_resize(train_data.augmentations, self.transform, self.train_transform)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Batch, batch_idx: int) -> None:
        """Resize training images and masks to ``train_size``."""
        del trainer, pl_module, batch_idx
        batch.image, batch.gt_mask = self.train_transform(batch.image, batch.gt_mask)

    def checkpoint_config(self) -> dict[str, Any]:
        """Persist the training size next to the (allow-listed) evaluation transform."""
        return {**super().checkpoint_config(), "train_size": self.train_size}

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore both transforms."""
        super().load_checkpoint_config(config)
        self.train_size = int(config.get("train_size", self.train_size))
        self.train_transform = Resize((self.train_size, self.train_size), interpolation=InterpolationMode.NEAREST)


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
    if options.get("minmax") not in {None, "auto"}:
        resolve_minmax(options["minmax"])
    if options.get("weights_path") is not None:
        existing_weight_file(options["weights_path"], "--model.weights_path")


class HostMemoryHolder(Callback):
    """Holds :data:`~.performance.HOST_MEMORY_REUSE` from ``setup`` to ``teardown`` of a fit, validate, test or predict.

    Only for runs on the CPU: on a GPU the activations live in device memory and the host has nothing to gain. A
    callback rather than the module's own hooks because Lightning skips ``teardown`` when a run fails, and only
    callbacks hear ``on_exception``: a failed run hands the memory back too.
    """

    def __init__(self) -> None:
        self.held = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        del pl_module, stage
        if not self.held and trainer.strategy.root_device.type == "cpu":
            self.held = HOST_MEMORY_REUSE.acquire()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        del trainer, pl_module, stage
        self._release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        del trainer, pl_module, exception
        self._release()

    def _release(self) -> None:
        if self.held:
            HOST_MEMORY_REUSE.release()
            self.held = False


class _FcddLogic:
    """Shared implementation of the FCDD Lightning modules (a plain mixin, so both classes subclass AnomalibModule)."""

    model: FcddModel

    def _setup_fcdd(self, hparams: dict[str, Any]) -> None:
        check_options(hparams)
        self.model = FcddModel(
            backbone=hparams["backbone"],
            pre_trained=hparams["pre_trained"],
            weights_path=hparams["weights_path"],
            frozen_modules=hparams["frozen_modules"],
            gauss_std=hparams["gauss_std"],
            minmax=None if hparams["minmax"] in {"auto", None} else hparams["minmax"],
            frozen_bn_train_mode=hparams["frozen_bn_train_mode"],
            channels_last=hparams["channels_last"],
        )
        self.loss = FcddLoss(hparams["loss"])
        self.anomaly_generator = ConfettiAnomalyGenerator(
            probability=hparams["anomaly_probability"],
            image_level_masks=hparams["image_level_masks"],
            smooth=hparams["confetti_smoothing"],
        )
        self.augmentation = FcddAugmentation(size=hparams["image_size"]) if hparams["augment"] else None
        self._fcdd = hparams

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        """anomalib's component callbacks, plus the holder of host memory reuse (``reuse_host_memory``)."""
        callbacks = list(super().configure_callbacks())  # type: ignore[misc]
        if self._fcdd.get("reuse_host_memory", True):
            callbacks.append(HostMemoryHolder())
        return callbacks

    def setup(self, stage: str) -> None:
        """Settle ``precision="auto"`` for the device the run really uses (see :meth:`_match_precision_to_device`)."""
        super().setup(stage)  # type: ignore[misc]
        self._match_precision_to_device()

    def _match_precision_to_device(self) -> None:
        """Swap the trainer's precision plugin when ``auto`` was resolved for another device than the run's.

        ``trainer_arguments`` is read before the trainer exists, so it resolves ``auto`` for the default device: a
        bf16 GPU when there is one. A run forced onto the CPU (``--trainer.accelerator cpu``) of such a machine would
        then autocast to bf16 even where this CPU only emulates it, several times slower than fp32. Lightning calls
        this hook before its strategy sets up the module, so the plugin can still be swapped.
        """
        if self._fcdd["precision"] != "auto" or self._trainer is None:
            return
        strategy = self.trainer.strategy
        plugin = strategy.precision_plugin
        if type(plugin) not in {Precision, MixedPrecision}:  # a strategy's own plugin (FSDP, DeepSpeed, ...)
            return
        device = strategy.root_device.type
        wanted = resolve_precision("auto", device)
        if wanted == plugin.precision:
            return
        strategy.precision_plugin = Precision() if wanted == "32-true" else MixedPrecision("bf16-mixed", device)
        logger.info("FCDD: precision 'auto' on %s is %s, not %s.", device, wanted, plugin.precision)

    def on_train_start(self) -> None:
        """Pick the anomaly source and make sure the min-max constants exist (shipped MVTec ones or computed)."""
        self.model.require_weights()  # pretrained weights that could not be fetched (and no checkpoint resumed)
        datamodule = self.trainer.datamodule
        # A datamodule that supplies real training anomalies (MVTecFewAnomalies) switches confetti off for good.
        self._real_anomalies = bool(getattr(datamodule, "training_anomalies", None))
        if bool(self.model.normalization.ready):
            return
        category = getattr(datamodule, "category", None)
        if self._fcdd["minmax"] == "auto" and category in MVTEC_MINMAX and _is_mvtec(datamodule):
            self.model.normalization.set_constants(torch.tensor(MVTEC_MINMAX[category]).view(2, 3))
            logger.info("FCDD: using the reference's MVTec-AD min-max constants for %r.", category)
            return
        self.model.normalization.set_constants(self._compute_minmax())

    def _compute_minmax(self) -> torch.Tensor:
        """Per-channel min/max after LCN over the normal training images at ``image_size`` (one streaming pass)."""
        accumulator = MinMaxAccumulator()
        size = self._fcdd["image_size"]
        resize = Resize((size, size), interpolation=InterpolationMode.NEAREST)
        for batch in self.trainer.train_dataloader:
            labels = batch.gt_label
            images = batch.image if labels is None else batch.image[~torch.as_tensor(labels).bool()]
            if len(images):
                accumulator.update(resize(images.to(self.device)))
        table = accumulator.table()
        logger.info("FCDD: min-max constants computed from %d training images: %s", accumulator.count, table.tolist())
        return table

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """One FCDD step: anomalies, augmentation, forward, hypersphere loss."""
        del args, kwargs
        images, masks = self.training_inputs(batch)
        output = self.model(images)
        loss = self.loss(output.anomaly_map, masks)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, logger=True, batch_size=len(images))
        return {"loss": loss}

    def training_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and ``B x 1 x H x W`` masks for the loss: real anomalies if the batch has any, else confetti."""
        images = batch.image
        has_real = getattr(self, "_real_anomalies", False) or (
            batch.gt_label is not None and bool(torch.as_tensor(batch.gt_label).any())
        )
        if has_real:
            if batch.gt_mask is None:
                raise ValueError("A training batch holds anomalous images but no masks; FCDD needs pixel masks.")
            masks = torch.as_tensor(batch.gt_mask).view(images.shape[0], 1, *images.shape[-2:]).bool()
        else:
            images, masks, _ = self.anomaly_generator(images)
        if self.augmentation is not None:
            images, masks = self.augmentation(images, masks)
        elif images.shape[-1] != self._fcdd["image_size"]:
            images, masks = _resize_pair(images, masks, self._fcdd["image_size"])
        return images, masks

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score the validation batch (anomalib's post-processor fits thresholds on these outputs)."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with Nesterov momentum; lr decays by ``lr_decay`` once per paper epoch (``passes_per_epoch`` passes)."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = optim.SGD(
            parameters,
            lr=self._fcdd["lr"],
            momentum=self._fcdd["momentum"],
            nesterov=self._fcdd["momentum"] > 0,
            weight_decay=self._fcdd["weight_decay"],
        )
        decay, passes = self._fcdd["lr_decay"], self._fcdd["passes_per_epoch"]
        scheduler = optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: decay ** (epoch // passes))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @staticmethod
    def _post_training_quantization_ov(model: Any, datamodule: Any = None) -> Any:
        """INT8_PTQ for every export path (``Engine.export``, ``anomalib export``): backbone INT8, the rest float.

        See :mod:`anomalib_fcdd.deploy.quantization` for why the element-wise ops and the upsampler stay in float.
        """
        from anomalib_fcdd.deploy.quantization import quantize_post_training

        return quantize_post_training(model, datamodule)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation; bf16 where native; ``epochs`` paper epochs = ``epochs * passes_per_epoch`` passes."""
        arguments: dict[str, Any] = {"num_sanity_val_steps": 0, "precision": resolve_precision(self._fcdd["precision"])}
        if self._fcdd["epochs"] is not None:
            passes = self._fcdd["passes_per_epoch"]
            arguments["max_epochs"] = self._fcdd["epochs"] * passes
            arguments["check_val_every_n_epoch"] = passes
        return arguments

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images (plus synthetic or a few real anomalies)."""
        return LearningType.ONE_CLASS

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Nearest resize to 224 (240 while training); LCN and min-max live inside the network."""
        side = image_size[0] if image_size else 224
        return FcddPreProcessor(image_size=side, train_size=round(side * 240 / 224))

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


def _is_mvtec(datamodule: object) -> bool:
    from anomalib.data import MVTecAD

    return isinstance(datamodule, MVTecAD)


def _resize_pair(images: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    resize = Resize((size, size), interpolation=InterpolationMode.NEAREST)
    return resize(images), resize(masks.float()) > 0.5


class FcddHsc(_FcddLogic, AnomalibModule):
    """FCDD with the paper's pixel-wise, class-balanced hypersphere loss (eq. 5) by default.

    Args:
        backbone: feature extractor: ``vgg11_bn`` (the paper's), ``resnet18``, ``wide_resnet50_2`` or
            ``efficientnet_lite0`` (ImageNet weights ship with a pip package, so it works offline); see
            ``docs/backbones.md``.
        pre_trained: load ImageNet weights for the backbone (cache, download, or the offline package).
        weights_path: local backbone weight file (used whenever given).
        frozen_modules: leading backbone modules to freeze; ``None`` = the paper's choice (VGG: through the 3rd pool).
        loss: ``pixel_balanced`` (eq. 5), ``per_image`` (the paper's baseline as run) or ``fcdd`` (eq. 4).
        anomaly_probability: chance that a training image is replaced by an anomaly.
        confetti_smoothing: blur confetti noise (25 x 25, sigma 5) as in the original FCDD.
        image_level_masks: mark a whole synthetic-anomaly image as anomalous (original FCDD) instead of its pixels.
        gauss_std: sigma of the Gaussian receptive-field upsampler.
        minmax: ``auto`` (shipped constants for MVTec-AD categories, otherwise computed from the training images),
            ``None`` (always compute), a MVTec-AD category name, or six numbers (3 minima, 3 maxima).
        augment: apply the reference's training augmentation.
        image_size: side of the network input (224).
        lr, momentum, weight_decay: SGD settings (Nesterov when momentum > 0).
        lr_decay: multiplicative learning-rate decay per paper epoch.
        epochs: paper epochs; sets the trainer's ``max_epochs`` to ``epochs * passes_per_epoch`` when given.
        passes_per_epoch: passes over the training set per paper epoch (10 in the reference).
        frozen_bn_train_mode: keep frozen BatchNorm layers in train mode while training (reference behaviour).
        precision: Lightning precision; ``auto`` = ``bf16-mixed`` where bf16 is native (AMX/AVX512-BF16 CPUs, CUDA
            GPUs with bf16), else ``32-true``.
        channels_last: NHWC memory layout for weights and activations.
        reuse_host_memory: from ``setup`` to ``teardown`` of each fit/validate/test/predict on the CPU, keep freed host
            memory in the process instead of returning it to the system (glibc only; see
            :class:`~.performance.HostMemoryReuse`), so that CPU steps do not page-fault their activations in anew.
    """

    def __init__(
        self,
        backbone: str = "vgg11_bn",
        pre_trained: bool = True,
        weights_path: str | None = None,
        frozen_modules: int | None = None,
        loss: str = "pixel_balanced",
        anomaly_probability: float = 0.5,
        confetti_smoothing: bool = False,
        image_level_masks: bool = False,
        gauss_std: float = 12.0,
        minmax: str | list[float] | None = "auto",
        augment: bool = True,
        image_size: int = 224,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_decay: float = 0.985,
        epochs: int | None = None,
        passes_per_epoch: int = 10,
        frozen_bn_train_mode: bool = True,
        precision: str = "auto",
        channels_last: bool = True,
        reuse_host_memory: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: Any = True,
        evaluator: Evaluator | bool = True,
        visualizer: Any = True,
    ) -> None:
        super().__init__(
            pre_processor=_pre_processor(pre_processor, image_size),
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self._setup_fcdd(dict(self.hparams))


class Fcdd(_FcddLogic, AnomalibModule):
    """FCDD in its original ICLR 2021 configuration: eq. (4), smoothed confetti, whole-image anomaly labels.

    Same arguments as :class:`FcddHsc`; only the defaults of ``loss``, ``confetti_smoothing`` and
    ``image_level_masks`` differ.
    """

    def __init__(
        self,
        backbone: str = "vgg11_bn",
        pre_trained: bool = True,
        weights_path: str | None = None,
        frozen_modules: int | None = None,
        loss: str = "fcdd",
        anomaly_probability: float = 0.5,
        confetti_smoothing: bool = True,
        image_level_masks: bool = True,
        gauss_std: float = 12.0,
        minmax: str | list[float] | None = "auto",
        augment: bool = True,
        image_size: int = 224,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_decay: float = 0.985,
        epochs: int | None = None,
        passes_per_epoch: int = 10,
        frozen_bn_train_mode: bool = True,
        precision: str = "auto",
        channels_last: bool = True,
        reuse_host_memory: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: Any = True,
        evaluator: Evaluator | bool = True,
        visualizer: Any = True,
    ) -> None:
        super().__init__(
            pre_processor=_pre_processor(pre_processor, image_size),
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self._setup_fcdd(dict(self.hparams))


def _pre_processor(pre_processor: PreProcessor | bool, image_size: int) -> PreProcessor | bool:
    """``True`` means the FCDD pre-processor at ``image_size``; anything else is passed through."""
    if pre_processor is True:
        return _FcddLogic.configure_pre_processor((image_size, image_size))
    return pre_processor
