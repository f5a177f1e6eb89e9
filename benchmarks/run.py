"""Run a benchmark grid (models x categories x seeds), one anomalib ``Engine`` per run, one CSV row per finished run.

Usage (from the repository root)::

    python -m benchmarks.run --profile smoke
    python -m benchmarks.run --profile offline [--mvtec-root DIR] [--extra-root DIR ...]
    python -m benchmarks.run --profile full --mvtec-root DIR --devices 0,1,2,3
    python -m benchmarks.run --profile full --dry-run

Why not ``anomalib benchmark``: its ``collect`` builds the CSV columns from the first job's keys and raises
``KeyError`` when models have different init arguments (anomalib-2.7-integration.md sec. 8), losing every row. Here
the column set is fixed (:data:`COLUMNS`) and each row is appended, flushed and fsynced as soon as its run ends, so an
interrupted grid resumes where it stopped: rows are keyed by :data:`KEY_COLUMNS` and keys already in the file are
skipped; a truncated last line (a crash mid-write) is dropped and its run repeated.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .profiles import NOT_APPLICABLE, SEMI_SUPERVISED, Method, Profile, get_profile

logger = logging.getLogger("benchmarks.run")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
DEFAULT_MVTEC_ROOT = REPO_ROOT.parent / "shared" / "data" / "mvtec_ad"
MVTEC_ROOT_ENV = "FCDD_MVTEC_ROOT"
MVTEC_DATASET = "mvtec_ad"

KEY_COLUMNS = ("model", "loss", "setting", "backbone", "pre_trained", "dataset", "category", "seed")
CONFIG_COLUMNS = (
    "image_size",
    "epochs",
    "passes_per_epoch",
    "train_batch_size",
    "n_train",
    "n_train_anomalous",
    "n_test",
)
METRIC_COLUMNS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro")
COST_COLUMNS = (
    "train_time_s",
    "test_time_s",
    "test_throughput_ips",
    "rss_start_mb",
    "peak_rss_mb",
    "peak_cuda_mb",
    "artefact_mb",
)
META_COLUMNS = ("profile", "device", "rss_method", "backbone_note", "anomalib_version", "torch_version", "finished_at")
COLUMNS = KEY_COLUMNS + CONFIG_COLUMNS + METRIC_COLUMNS + COST_COLUMNS + META_COLUMNS
FAILURE_COLUMNS = (*KEY_COLUMNS, "error", "finished_at")

#: anomalib metric (as an Evaluator would name it) -> CSV column. ``AUPR`` on anomaly_map/gt_mask is the pixel AP.
ANOMALIB_METRICS = {
    "image_AUROC": "image_auroc",
    "pixel_AUROC": "pixel_auroc",
    "pixel_AUPR": "pixel_ap",
    "pixel_AUPRO": "pixel_aupro",
}

Row = dict[str, str]
Key = tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CategorySource:
    """Where one category's MVTec-layout data lives; ``dataset`` names the collection in the CSV."""

    dataset: str
    root: Path
    category: str


@dataclass(frozen=True)
class BackboneChoice:
    """The backbone a model actually gets, and why it differs from the profile's wish (empty note if it does not)."""

    name: str
    pre_trained: bool
    note: str = ""


@dataclass(frozen=True)
class Job:
    """One run: a method on one category with one seed, with everything resolved that goes into its key."""

    method: Method
    backbone: BackboneChoice
    source: CategorySource
    seed: int

    def key(self) -> Key:
        """The identity of the run in the CSV (same order as :data:`KEY_COLUMNS`)."""
        return (
            self.method.model,
            self.method.loss,
            self.method.setting,
            self.backbone.name,
            str(self.backbone.pre_trained),
            self.source.dataset,
            self.source.category,
            str(self.seed),
        )

    def slug(self) -> str:
        """A file-system-safe name for the run's working folder."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(self.key()))


def build_jobs(
    profile: Profile, sources: Sequence[CategorySource], backbones: dict[Method, BackboneChoice]
) -> list[Job]:
    """The grid, seed-major: an interrupted run has every method on every category for the first seeds."""
    return [
        Job(method=method, backbone=backbones[method], source=source, seed=seed)
        for seed in profile.seeds
        for source in sources
        for method in profile.methods
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Resolving data and backbones (with logged fall-backs, never silent ones)
# ---------------------------------------------------------------------------------------------------------------------
def resolve_mvtec_root(cli_value: str | None) -> Path:
    """``--mvtec-root`` wins, then ``$FCDD_MVTEC_ROOT``, then ``../shared/data/mvtec_ad`` next to the repository."""
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get(MVTEC_ROOT_ENV):
        return Path(os.environ[MVTEC_ROOT_ENV]).expanduser()
    return DEFAULT_MVTEC_ROOT


def mvtec_layout_categories(root: Path) -> list[str]:
    """Subfolders of ``root`` that look like MVTec categories (they have ``train/good``)."""
    if not root.is_dir():
        return []
    return sorted(child.name for child in root.iterdir() if (child / "train" / "good").is_dir())


def resolve_sources(
    profile: Profile,
    mvtec_root: Path,
    extra_roots: Sequence[Path],
    work_dir: Path,
    generate: bool = True,
    include_missing: bool = False,
) -> tuple[list[CategorySource], list[str]]:
    """Category sources of the profile, and human-readable notes on what is missing (and therefore skipped).

    Args:
        generate: write generated data (synthetic or demo) to ``work_dir``; a dry run passes False and only lists.
        include_missing: keep MVTec-AD categories that are not on disk (a dry run lists the complete grid).
    """
    sources: list[CategorySource] = []
    missing: list[str] = []
    for category in profile.mvtec_categories:
        source = CategorySource(MVTEC_DATASET, mvtec_root, category)
        if include_missing or (mvtec_root / category / "train" / "good").is_dir():
            sources.append(source)
        if not (mvtec_root / category / "train" / "good").is_dir():
            missing.append(f"MVTec-AD category {category!r} not found under {mvtec_root}")
    if profile.synthetic is not None:
        sources.extend(_synthetic_sources(profile, work_dir / "synthetic", generate))
    if profile.include_demo:
        demo, note = _demo_sources(work_dir / "demo", generate)
        sources.extend(demo)
        if note:
            missing.append(note)
    for root in extra_roots:
        found = mvtec_layout_categories(root)
        if not found:
            missing.append(f"--extra-root {root} holds no MVTec-layout category (no <category>/train/good)")
        sources.extend(CategorySource(root.name, root, category) for category in found)
    return sources, missing


def _synthetic_sources(profile: Profile, root: Path, generate: bool) -> list[CategorySource]:
    """Generated categories; generator seed = index, so a resumed run regenerates identical data."""
    spec = profile.synthetic
    assert spec is not None
    sources = []
    for index, category in enumerate(spec.categories):
        if generate and not (root / category / "train" / "good").is_dir():
            from anomalib_fcdd.data import make_synthetic_mvtec

            make_synthetic_mvtec(
                root,
                category,
                n_train=spec.n_train,
                n_test_good=spec.n_test_good,
                n_test_defect=spec.n_test_defect,
                size=spec.size,
                seed=index,
            )
        sources.append(CategorySource("synthetic", root, category))
    return sources


def _demo_sources(root: Path, generate: bool) -> tuple[list[CategorySource], str]:
    """The demo textures of ``anomalib_fcdd.demo`` (built once under ``root``), or a note saying they are skipped."""
    try:
        from anomalib_fcdd.demo.dataset import TEXTURES, build_demo_dataset
    except ImportError as error:
        return [], (
            f"the demo textures are skipped (anomalib_fcdd.demo.dataset unavailable: {error}); pass --extra-root DIR "
            "to add MVTec-layout categories"
        )
    if generate:
        build_demo_dataset(root)  # seeded and idempotent: a resumed run sees the same pixels
    return [CategorySource("demo", root, category) for category in TEXTURES], ""


def resolve_backbones(profile: Profile) -> dict[Method, BackboneChoice]:
    """The backbone each method of the profile gets, with a note where a fall-back replaces the wished one."""
    choices: dict[Method, BackboneChoice] = {}
    fcdd = _fcdd_backbone(profile.fcdd.backbone, profile.fcdd.pre_trained)
    for method in profile.methods:
        if method.model == "fcdd":
            choices[method] = fcdd
        else:
            wished = getattr(profile.baselines, f"{method.model}_backbone")
            choices[method] = _baseline_backbone(method.model, wished, profile.baselines.pre_trained)
    for method, choice in choices.items():
        if choice.note:
            logger.warning("%s: %s", method, choice.note)
    return choices


def _fcdd_backbone(name: str, pre_trained: bool) -> BackboneChoice:
    """FCDD's registered backbone, or VGG-11-BN with random weights (labelled) if ``name`` is not registered."""
    from anomalib_fcdd.models.fcdd.backbones import BACKBONES

    if name in BACKBONES:
        return BackboneChoice(name, pre_trained)
    return BackboneChoice(
        "vgg11_bn",
        False,
        f"FCDD backbone {name!r} is not registered in this build (have {sorted(BACKBONES)}); falling back to "
        "vgg11_bn with RANDOM weights (pre_trained=False)",
    )


#: Feature layers used when the timm EfficientNet-Lite0 has to be built by anomalib itself (random weights).
EFFICIENTNET_LITE0_LAYERS = {"padim": ["blocks.1", "blocks.2", "blocks.4"], "patchcore": ["blocks.2", "blocks.4"]}
TIMM_EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"


def _baseline_backbone(model: str, wished: str | None, pre_trained: bool) -> BackboneChoice:
    """anomalib's default (``None``), a timm name, or ``efficientnet_lite0`` through ``anomalib_fcdd.baselines``."""
    if wished is None:
        return BackboneChoice("default", pre_trained)
    if wished != "efficientnet_lite0" or not pre_trained:
        return BackboneChoice(wished, pre_trained)
    if _baselines_helper(model) is not None:
        return BackboneChoice(wished, pre_trained)
    return BackboneChoice(
        TIMM_EFFICIENTNET_LITE0,
        False,
        "anomalib_fcdd.baselines (offline EfficientNet-Lite0 weights) is not available; falling back to timm "
        f"{TIMM_EFFICIENTNET_LITE0} with RANDOM weights (pre_trained=False)",
    )


def _baselines_helper(model: str) -> Callable[..., Any] | None:
    """``anomalib_fcdd.baselines.build_<model>`` if the module exists, imported lazily."""
    try:
        from anomalib_fcdd import baselines  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(baselines, f"build_{model}", None)


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


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------
def _read_status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak host RSS (and CUDA allocation) of this process during a ``with`` block.

    On Linux the kernel's high-water mark is reset on entry (``/proc/self/clear_refs`` = 5) and read on exit (VmHWM),
    which is exact. Elsewhere the process-lifetime ``ru_maxrss`` is reported, an upper bound. The RSS on entry
    (mostly imported libraries) is kept as ``start_rss_mb``. Dataloader worker processes are not included (the CPU
    profiles use ``num_workers=0``).
    """

    def __init__(self) -> None:
        self.start_rss_mb = math.nan
        self.peak_rss_mb = math.nan
        self.peak_cuda_mb = math.nan
        self.method = ""
        self._reset = False

    def __enter__(self) -> PeakMemory:
        rss = _read_status_kib("VmRSS")
        self.start_rss_mb = rss / 1024 if rss is not None else math.nan
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = _read_status_kib("VmHWM") is not None
        except OSError:
            self._reset = False
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _read_status_kib("VmHWM") if self._reset else None
        if hwm is not None:
            self.peak_rss_mb, self.method = hwm / 1024, "vmhwm"
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
            self.peak_rss_mb, self.method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "maxrss"
        cuda = _cuda()
        if cuda is not None:
            self.peak_cuda_mb = cuda.max_memory_allocated() / 2**20


def _cuda() -> Any:
    """``torch.cuda`` when a GPU is usable, else None."""
    import torch

    return torch.cuda if torch.cuda.is_available() else None


#: Fields the recorder keeps from every test batch.
RECORDED_FIELDS = ("pred_score", "gt_label", "anomaly_map", "gt_mask")


def make_test_recorder() -> Any:
    """A Lightning callback that keeps the raw test outputs and times the test loop.

    Timing runs from the start of the test loop to the end of its last batch: loading, pre-processing and the forward
    pass, but not the metric computation (AUPRO's is slow on CPU and says nothing about the model's speed).
    """
    from lightning.pytorch.callbacks import Callback

    class TestRecorder(Callback):
        def __init__(self) -> None:
            self.images = 0
            self.start = math.nan
            self.end = math.nan
            self.outputs: dict[str, list[Any]] = {name: [] for name in RECORDED_FIELDS}

        def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.images, self.start = 0, time.perf_counter()
            self.outputs = {name: [] for name in RECORDED_FIELDS}

        def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any) -> None:
            cuda = _cuda()
            if cuda is not None:
                cuda.synchronize()
            self.end = time.perf_counter()
            self.images += int(batch.image.shape[0])
            for name in RECORDED_FIELDS:
                value = getattr(outputs, name, None)
                if value is not None:
                    self.outputs[name].append(value.detach().to("cpu"))

        @property
        def images_per_second(self) -> float:
            elapsed = self.end - self.start
            return self.images / elapsed if elapsed > 0 else math.nan

    return TestRecorder()


def _to_unit_interval(values: Any) -> Any:
    """Strictly increasing affine map of ``values`` onto [0, 1] in float64 (constant input -> zeros).

    Rank-based metrics are invariant to it, and inside [0, 1] torchmetrics applies no sigmoid.
    """
    import torch

    values = values.to(dtype=torch.float64)
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else values * 0


def compute_metrics(outputs: dict[str, list[Any]]) -> dict[str, float]:
    """Image AUROC and pixel AUROC, AP (anomalib's ``AUPR``) and AUPRO (FPR limit 0.3) from raw test outputs.

    anomalib's own metric classes are used on the whole test set at once, after mapping the raw scores onto [0, 1]
    (:func:`_to_unit_interval`). A metric that cannot be computed (no masks, a single class) is NaN.
    """
    import torch
    from anomalib.metrics import AUPR, AUPRO, AUROC

    joined = {name: torch.cat(parts) for name, parts in outputs.items() if parts}
    results = {column: math.nan for column in ANOMALIB_METRICS.values()}
    if "pred_score" in joined and "gt_label" in joined:
        image = SimpleNamespace(
            pred_score=_to_unit_interval(joined["pred_score"].flatten()), gt_label=joined["gt_label"].flatten().int()
        )
        results["image_auroc"] = _safe_compute(AUROC(fields=["pred_score", "gt_label"]), image)
    if "anomaly_map" in joined and "gt_mask" in joined:
        masks = joined["gt_mask"].reshape(joined["anomaly_map"].shape[0], *joined["gt_mask"].shape[-2:]).int()
        maps = _to_unit_interval(joined["anomaly_map"]).reshape(masks.shape)
        pixels = SimpleNamespace(anomaly_map=maps, gt_mask=masks)
        results["pixel_auroc"] = _safe_compute(AUROC(fields=["anomaly_map", "gt_mask"]), pixels)
        results["pixel_ap"] = _safe_compute(AUPR(fields=["anomaly_map", "gt_mask"]), pixels)
        results["pixel_aupro"] = _safe_compute(AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3), pixels)
    return results


def _safe_compute(metric: Any, batch: Any) -> float:
    try:
        metric.update(batch)
        return float(metric.compute())
    except Exception as error:  # torchmetrics raises various types for degenerate inputs
        logger.warning("%s could not be computed: %s", type(metric).__name__, error)
        return math.nan


def _checkpoint_size_mb(engine: Any, run_dir: Path) -> float:
    """Size of a Lightning checkpoint of the trained model (what one would reload or deploy).

    Written explicitly after training: the engine's own ModelCheckpoint only saves on a validation or a train-epoch
    end it is scheduled for, and with validation off and several epochs per validation interval (FCDD) it never does.
    """
    path = run_dir / "artefact.ckpt"
    engine.trainer.save_checkpoint(path)
    return path.stat().st_size / 2**20 if path.is_file() else math.nan


# ---------------------------------------------------------------------------------------------------------------------
# Running one job
# ---------------------------------------------------------------------------------------------------------------------
def run_job(job: Job, profile: Profile, work_dir: Path, keep_artefacts: bool = False) -> Row:
    """Train and test one job with a fresh ``Engine``; return its CSV row."""
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    run_dir = work_dir / "runs" / job.slug()
    shutil.rmtree(run_dir, ignore_errors=True)  # left over from an interrupted attempt
    seed_everything(job.seed, workers=True, verbose=False)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    with PeakMemory() as memory:
        datamodule = build_datamodule(job, profile)
        model = build_model(job, profile)
        recorder = make_test_recorder()
        engine = Engine(
            default_root_dir=run_dir,
            accelerator=accelerator,
            devices=1,
            max_epochs=_max_epochs(job, profile),
            logger=False,
            callbacks=[recorder],
            enable_progress_bar=False,
            enable_model_summary=False,
            **({} if profile.validate_each_epoch else {"limit_val_batches": 0}),
        )
        started = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        train_time = time.perf_counter() - started
        artefact_mb = _checkpoint_size_mb(engine, run_dir)
        started = time.perf_counter()
        engine.test(model=model, datamodule=datamodule, verbose=False)
        metrics = compute_metrics(recorder.outputs)
        test_time = time.perf_counter() - started
    row = _job_row(job, profile, datamodule)
    row.update({column: _fmt(value) for column, value in metrics.items()})
    row.update(
        train_time_s=_fmt(train_time),
        test_time_s=_fmt(test_time),
        test_throughput_ips=_fmt(recorder.images_per_second),
        rss_start_mb=_fmt(memory.start_rss_mb),
        peak_rss_mb=_fmt(memory.peak_rss_mb),
        peak_cuda_mb=_fmt(memory.peak_cuda_mb),
        artefact_mb=_fmt(artefact_mb),
        device=_device_name(accelerator),
        rss_method=memory.method,
    )
    if not keep_artefacts:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def _max_epochs(job: Job, profile: Profile) -> int:
    if job.method.model == "fcdd":
        return profile.fcdd.epochs * profile.fcdd.passes_per_epoch
    return 1


def _job_row(job: Job, profile: Profile, datamodule: Any) -> Row:
    """Key, configuration and metadata columns of a finished job (metrics and costs are added by the caller)."""
    import anomalib
    import torch

    train = datamodule.train_data.samples
    fcdd = job.method.model == "fcdd"
    image_size = profile.fcdd.image_size if fcdd else profile.baselines.image_size
    row: Row = dict(zip(KEY_COLUMNS, job.key(), strict=True))
    row.update(
        image_size=str(image_size if image_size is not None else "default"),
        epochs=str(profile.fcdd.epochs) if fcdd else "",
        passes_per_epoch=str(profile.fcdd.passes_per_epoch) if fcdd else "",
        train_batch_size=str(profile.fcdd.train_batch_size if fcdd else profile.baselines.train_batch_size),
        n_train=str(len(train)),
        n_train_anomalous=str(_training_anomalies(datamodule)),
        n_test=str(len(datamodule.test_data)),
        profile=profile.name,
        backbone_note=job.backbone.note,
        anomalib_version=anomalib.__version__,
        torch_version=torch.__version__,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return row


def _training_anomalies(datamodule: Any) -> int:
    """Real anomalies available to training: a separate pool (``MVTecFewAnomalies.anomaly_data``) or train rows."""
    pool = getattr(datamodule, "anomaly_data", None)
    if pool is not None:
        return len(pool.samples)
    return int((datamodule.train_data.samples.label_index != 0).sum())


def _device_name(accelerator: str) -> str:
    if accelerator == "gpu":
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _fmt(value: Any) -> str:
    """Numbers as short text; missing or NaN as an empty cell (read back as NaN)."""
    if value is None:
        return ""
    number = float(value.item() if hasattr(value, "item") else value)
    return "" if math.isnan(number) else f"{number:.6g}"


# ---------------------------------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------------------------------
class ResultStore:
    """An append-only CSV of finished runs with a fixed header, safe against crashes and concurrent workers.

    Every row is written with one ``write`` on an ``O_APPEND`` descriptor under an exclusive ``flock`` and then
    ``fsync``-ed, so a row is either completely on disk or (crash mid-write) a truncated last line, which
    :meth:`repair` drops before the next run starts.
    """

    def __init__(self, path: Path, columns: Sequence[str] = COLUMNS, key_columns: Sequence[str] = KEY_COLUMNS) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self.key_columns = tuple(key_columns)

    def repair(self) -> int:
        """Drop a truncated last line, malformed and duplicate rows; return how many lines were dropped.

        Raises:
            ValueError: the file's header is not this store's column set (an older layout: move the file away).
        """
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0
        data = self.path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        dropped = 0
        if not text.endswith("\n"):
            cut = text.rfind("\n") + 1
            logger.warning("%s: dropping a truncated last line %r (its run will be repeated).", self.path, text[cut:])
            text, dropped = text[:cut], 1
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            self._rewrite([])
            return dropped
        if tuple(rows[0]) != self.columns:
            raise ValueError(
                f"{self.path} has columns {rows[0][:4]}..., not this runner's; move it away or pass another --output."
            )
        kept, seen = [], set()
        for fields in rows[1:]:
            if len(fields) != len(self.columns):
                dropped += 1
                logger.warning("%s: dropping a malformed row %s", self.path, fields[:8])
                continue
            key = self._key(dict(zip(self.columns, fields, strict=True)))
            if key in seen:
                dropped += 1
                logger.warning("%s: dropping a duplicate row for %s", self.path, key)
                continue
            seen.add(key)
            kept.append(fields)
        if dropped:
            self._rewrite(kept)
        return dropped

    def rows(self) -> list[Row]:
        """The complete rows on disk (a truncated last line is ignored, not repaired)."""
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8", errors="replace")
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            return []
        return [dict(zip(header, fields, strict=True)) for fields in reader if len(fields) == len(header)]

    def done_keys(self) -> set[Key]:
        """Keys of the runs already on disk."""
        return {self._key(row) for row in self.rows()}

    def append(self, row: Row) -> None:
        """Append one row atomically (header first if the file is new or empty), flushed to disk."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"Row has columns outside the fixed set: {sorted(unknown)}")
        line = _csv_line([_clean(row.get(column, "")) for column in self.columns])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked_append(self.path) as fd:
            payload = line if os.fstat(fd).st_size else _csv_line(self.columns) + line
            os.write(fd, payload.encode("utf-8"))
            os.fsync(fd)

    def _key(self, row: Row) -> Key:
        return tuple(row[column] for column in self.key_columns)

    def _rewrite(self, rows: list[list[str]]) -> None:
        """Replace the file atomically (temporary file, fsync, rename) with the header and ``rows``."""
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, encoding="utf-8", newline="") as f:
            f.write(_csv_line(self.columns) + "".join(_csv_line(fields) for fields in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, self.path)


def _csv_line(fields: Iterable[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(list(fields))
    return buffer.getvalue()


def _clean(value: str) -> str:
    """One physical line per row: newlines in free text would break the truncated-line rule."""
    return str(value).replace("\r", " ").replace("\n", " ")


@contextlib.contextmanager
def _locked_append(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(ImportError):
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------
JobRunner = Callable[[Job], Row]
AfterRow = Callable[[Row], None]


@dataclass
class RunSummary:
    """What a call of :func:`run_jobs` did."""

    finished: int = 0
    skipped: int = 0
    failed: int = 0


def run_jobs(
    jobs: Sequence[Job],
    store: ResultStore,
    runner: JobRunner,
    failures: ResultStore | None = None,
    after_row: AfterRow | None = None,
    fail_fast: bool = False,
    show_progress: bool = True,
) -> RunSummary:
    """Run the jobs whose keys are not in ``store`` yet, appending each row as soon as it exists.

    A job that raises is logged (and recorded in ``failures``) and the grid goes on, unless ``fail_fast``; it has no
    row, so the next invocation retries it. ``after_row`` runs after each row is on disk; whatever it raises
    propagates (tests use it to simulate an interruption).
    """
    summary = RunSummary()
    done = store.done_keys()
    pending = [job for job in jobs if job.key() not in done]
    summary.skipped = len(jobs) - len(pending)
    if summary.skipped:
        logger.info("Resuming: %d of %d runs already in %s.", summary.skipped, len(jobs), store.path)
    with _progress(len(pending), show_progress) as advance:
        for job in pending:
            advance(_describe(job))
            try:
                row = runner(job)
            except Exception as error:
                summary.failed += 1
                logger.exception("Run %s failed.", _describe(job))
                if failures is not None:
                    failures.append(_failure_row(job, error))
                if fail_fast:
                    raise
                continue
            store.append(row)
            summary.finished += 1
            logger.info("Finished %s: %s", _describe(job), {c: row.get(c, "") for c in METRIC_COLUMNS})
            if after_row is not None:
                after_row(row)
        advance(None)
    return summary


def _failure_row(job: Job, error: BaseException) -> Row:
    row: Row = dict(zip(KEY_COLUMNS, job.key(), strict=True))
    row["error"] = f"{type(error).__name__}: {error}"[:2000]
    row["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def _describe(job: Job) -> str:
    loss = "" if job.method.loss == NOT_APPLICABLE else f"/{job.method.loss}"
    setting = "/semi" if job.method.setting == SEMI_SUPERVISED else ""
    return f"{job.method.model}{loss}{setting} {job.source.dataset}/{job.source.category} seed {job.seed}"


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str | None], None]]:
    """A rich progress bar; ``advance(text)`` marks the previous job done and shows the next (None: finish)."""
    if not enabled or total == 0:
        yield lambda text: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("benchmark", total=total)
        started = [False]

        def advance(text: str | None) -> None:
            if started[0]:
                progress.advance(task)
            started[0] = True
            if text is not None:
                progress.update(task, description=text)

        yield advance


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m benchmarks.run``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="offline", help="full, offline or smoke (benchmarks/profiles.py)")
    parser.add_argument("--mvtec-root", help=f"MVTec-AD folder (default: ${MVTEC_ROOT_ENV}, else ../shared/data/...)")
    parser.add_argument(
        "--extra-root",
        action="append",
        default=[],
        type=Path,
        help="a folder of MVTec-layout categories to add (repeatable; profiles with demo data only)",
    )
    parser.add_argument("--output", type=Path, help="results folder (default benchmarks/results/<profile>)")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and generated data (default: a temp folder)")
    parser.add_argument("--seeds", help="comma-separated seeds overriding the profile's")
    parser.add_argument("--devices", help="comma-separated GPU ids: one worker process per id, pinned to it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "i/n", set by --devices for its children
    parser.add_argument("--dry-run", action="store_true", help="print the job list and exit")
    parser.add_argument("--limit", type=int, help="run at most this many pending jobs")
    parser.add_argument("--keep-artefacts", action="store_true", help="keep each run's checkpoint folder")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing run")
    parser.add_argument("--no-report", action="store_true", help="do not write README.md and the CD diagrams")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """A resolved invocation: the profile, where things go, and the full (deterministic) job list."""

    profile: Profile
    output: Path
    work_dir: Path
    jobs: list[Job]
    missing: list[str]


def make_plan(args: argparse.Namespace, generate: bool = True) -> Plan:
    """Resolve profile, paths, data sources and backbones into the job list."""
    profile = get_profile(args.profile)
    if args.seeds:
        profile = replace(profile, seeds=tuple(int(seed) for seed in args.seeds.split(",")))
    output = args.output or RESULTS_ROOT / profile.name
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / "anomalib-fcdd-benchmark" / profile.name
    extra_roots = [Path(root).expanduser() for root in args.extra_root]
    if extra_roots and not profile.include_demo:
        logger.warning("--extra-root is ignored by profile %r (it has a fixed category list).", profile.name)
        extra_roots = []
    sources, missing = resolve_sources(
        profile, resolve_mvtec_root(args.mvtec_root), extra_roots, work_dir, generate, include_missing=not generate
    )
    for note in missing:
        logger.warning("Skipped: %s.", note)
    jobs = build_jobs(profile, sources, resolve_backbones(profile))
    return Plan(profile=profile, output=output, work_dir=work_dir, jobs=jobs, missing=missing)


def print_plan(plan: Plan, store: ResultStore, devices: Sequence[str] = ()) -> None:
    """The job list with each job's state, the missing data and the worker split (``--dry-run``)."""
    done = store.done_keys()
    print(f"profile {plan.profile.name}: {plan.profile.description}")
    print(f"results: {store.path}   work dir: {plan.work_dir}")
    for note in plan.missing:
        print(f"MISSING: {note}")
    print("\t".join(("#", "state", *KEY_COLUMNS, *(["worker"] if devices else []))))
    counts = {"done": 0, "pending": 0, "no-data": 0}
    for index, job in enumerate(plan.jobs):
        state = "done" if job.key() in done else "pending"
        if job.source.dataset == MVTEC_DATASET and not (job.source.root / job.source.category).is_dir():
            state = "no-data"
        counts[state] += 1
        worker = [f"{index % len(devices)} (CUDA_VISIBLE_DEVICES={devices[index % len(devices)]})"] if devices else []
        print("\t".join((str(index), state, *job.key(), *worker)))
    print(
        f"{len(plan.jobs)} jobs: {counts['done']} done, {counts['pending']} pending, {counts['no-data']} without data "
        "(a real run skips those)"
    )


def launch_workers(devices: Sequence[str], argv: Sequence[str]) -> int:
    """One child process per device, pinned with ``CUDA_VISIBLE_DEVICES``; each takes every n-th job of the list.

    The split is over the full job list (not the pending one), so it does not depend on what other workers have
    finished meanwhile; all workers append to the same locked CSV. Returns the worst exit code.
    """
    base = [arg for arg in _strip_option(argv, "--devices") if arg != "--dry-run"]
    children = []
    for index, device in enumerate(devices):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
        command = [sys.executable, "-m", "benchmarks.run", *base, "--worker", f"{index}/{len(devices)}", "--no-report"]
        logger.info("Worker %d on device %s: %s", index, device, " ".join(command))
        children.append(subprocess.Popen(command, env=env, cwd=REPO_ROOT))
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def _strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    result, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            result.append(arg)
    return result


def _worker_share(jobs: list[Job], worker: str | None) -> list[Job]:
    if not worker:
        return jobs
    index, count = (int(part) for part in worker.split("/"))
    return jobs[index::count]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: plan, then dry-run, fan out over devices, or run this process's share of the grid."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    plan = make_plan(args, generate=not args.dry_run)
    store = ResultStore(plan.output / "results.csv")
    devices = [device.strip() for device in args.devices.split(",")] if args.devices else []
    if args.dry_run:
        print_plan(plan, store, devices)
        return 0
    if not args.worker:
        store.repair()
    code = launch_workers(devices, argv) if devices else _run_share(plan, store, args)
    if not args.no_report and not args.worker:
        from .report import write_report

        write_report(plan.output, profile=plan.profile)
    return code


def _run_share(plan: Plan, store: ResultStore, args: argparse.Namespace) -> int:
    jobs = _worker_share(plan.jobs, args.worker)
    done = store.done_keys()
    pending = [job for job in jobs if job.key() not in done]
    if args.limit is not None:
        pending = pending[: args.limit]
    failures = ResultStore(plan.output / "failures.csv", FAILURE_COLUMNS, (*KEY_COLUMNS, "finished_at"))
    summary = run_jobs(
        pending,
        store,
        runner=lambda job: run_job(job, plan.profile, plan.work_dir, args.keep_artefacts),
        failures=failures,
        fail_fast=args.fail_fast,
        show_progress=not args.worker and sys.stderr.isatty(),
    )
    logger.info("Done: %d finished, %d failed; results in %s", summary.finished, summary.failed, store.path)
    return 1 if summary.failed else 0


def _quiet_libraries() -> None:
    """Lightning and anomalib log a banner per Engine; one run per Engine makes that noise dominate the log."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "anomalib", "torch.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*but have no logger configured.*")


if __name__ == "__main__":
    sys.exit(main())
