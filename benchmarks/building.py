"""Building one run: the anomalib module and the datamodule of a :class:`~.jobs.Job`, with raw-score output."""

from __future__ import annotations

from typing import Any

from .jobs import EFFICIENTNET_LITE0_LAYERS, TIMM_EFFICIENTNET_LITE0, Job, _baselines_helper
from .profiles import SEMI_SUPERVISED, Profile


# ---------------------------------------------------------------------------------------------------------------------
# Building one run
# ---------------------------------------------------------------------------------------------------------------------
def raw_score_post_processor() -> Any:
    """No normalisation, no thresholds: the test loop hands raw scores to :class:`TestRecorder`.

    anomalib's default normalisation clamps scores to [0, 1] around a validation threshold, which ties the tails and
    changes AUROC/AP; and without it, torchmetrics treats scores outside [0, 1] as logits and applies a sigmoid, which
    saturates large raw scores (PaDiM's Mahalanobis distances of 200-1000 all become 1.0: image AUROC 0.5). The
    runner therefore computes the metrics itself after the test loop, see :func:`compute_metrics`.
    """
    from anomalib.post_processing import PostProcessor

    return PostProcessor(enable_normalization=False, enable_thresholding=False)


def _common_model_kwargs() -> dict[str, Any]:
    return {"evaluator": False, "post_processor": raw_score_post_processor(), "visualizer": False}


def build_model(job: Job, profile: Profile) -> Any:
    """The anomalib module of ``job`` with raw-score output (metrics are computed by the runner)."""
    if job.method.model == "fcdd":
        from anomalib_fcdd import FcddHsc

        budget = profile.fcdd
        return FcddHsc(
            backbone=job.backbone.name,
            pre_trained=job.backbone.pre_trained,
            loss=job.method.loss,
            epochs=budget.epochs,
            passes_per_epoch=budget.passes_per_epoch,
            image_size=budget.image_size,
            **_common_model_kwargs(),
        )
    return _build_baseline(job, profile)


def _build_baseline(job: Job, profile: Profile) -> Any:
    """PaDiM or PatchCore: offline EfficientNet-Lite0 via ``anomalib_fcdd.baselines``, or anomalib's own models.

    The helper brings its own pre-processor (the weights expect inputs in [-1, 1], not ImageNet mean/std), so only
    the size is passed to it.
    """
    config = profile.baselines
    extra: dict[str, Any] = _common_model_kwargs()
    if job.method.model == "patchcore":
        extra["coreset_sampling_ratio"] = config.coreset_sampling_ratio
    helper = _baselines_helper(job.method.model)
    if job.backbone.name == "efficientnet_lite0" and job.backbone.pre_trained and helper is not None:
        return helper(offline=True, image_size=config.image_size or 256, **extra)
    from anomalib.models import Padim, Patchcore

    model_class = Padim if job.method.model == "padim" else Patchcore
    if config.image_size is not None:
        extra["pre_processor"] = model_class.configure_pre_processor(image_size=(config.image_size,) * 2)
    if job.backbone.name != "default":
        extra["backbone"] = job.backbone.name
    if job.backbone.name in {TIMM_EFFICIENTNET_LITE0, "efficientnet_lite0"}:
        extra["backbone"] = TIMM_EFFICIENTNET_LITE0
        extra["layers"] = EFFICIENTNET_LITE0_LAYERS[job.method.model]
        if job.method.model == "padim":
            extra["n_features"] = 100
    return model_class(pre_trained=job.backbone.pre_trained, **extra)


def build_datamodule(job: Job, profile: Profile) -> Any:
    """``MVTec`` (unsupervised) or ``MVTecFewAnomalies`` (semi-supervised), set up, with the training cap applied.

    The validation split is the test set (anomalib's MVTecAD default, stated here so it cannot drift): test metrics
    are always computed on the whole test set, as in the paper.
    """
    from anomalib.data.utils import ValSplitMode
    from lightning.pytorch.trainer.states import TrainerFn

    from anomalib_fcdd.data import MVTec, MVTecFewAnomalies

    batch = profile.fcdd.train_batch_size if job.method.model == "fcdd" else profile.baselines.train_batch_size
    kwargs: dict[str, Any] = {
        "root": job.source.root,
        "category": job.source.category,
        "train_batch_size": batch,
        "eval_batch_size": profile.eval_batch_size,
        "num_workers": profile.num_workers,
        "val_split_mode": ValSplitMode.SAME_AS_TEST,
        "seed": job.seed,
    }
    if job.method.setting == SEMI_SUPERVISED:
        datamodule = MVTecFewAnomalies(
            anomalies_per_defect=profile.fcdd.anomalies_per_defect, selection_seed=job.seed, **kwargs
        )
    else:
        datamodule = MVTec(**kwargs)
    datamodule.prepare_data()
    datamodule.setup(TrainerFn.FITTING)  # marks the module as set up, so the trainer keeps the capped split below
    if profile.max_train_images is not None:
        cap_training_images(datamodule, profile.max_train_images, job.seed)
    return datamodule


def cap_training_images(datamodule: Any, limit: int, seed: int) -> None:
    """Keep a seeded subset of ``limit`` normal training images; real training anomalies (semi-supervised) stay."""
    samples = datamodule.train_data.samples
    normal = samples[samples.label_index == 0]
    if len(normal) <= limit:
        return
    kept = normal.sample(n=limit, random_state=seed)
    capped = samples.loc[sorted([*kept.index, *samples.index[samples.label_index != 0]])].reset_index(drop=True)
    capped.attrs.update(samples.attrs)
    datamodule.train_data.samples = capped
