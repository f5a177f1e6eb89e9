"""Measuring one run: fit and test with a fresh ``Engine``, timing, peak memory, artefact size and the metrics.

:func:`fit_and_test` is the one "build, fit, test, time" helper every benchmark script uses.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .building import build_datamodule, build_model
from .jobs import ANOMALIB_METRICS, KEY_COLUMNS, Job, Row
from .profiles import Profile

logger = logging.getLogger("benchmarks.measuring")


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
#: Per-image paths kept for the paper's full-resolution pixel AUROC (:func:`full_resolution_pixel_auroc`); the mask
#: paths come from the test set's samples, since anomalib's collation drops a batch's mask paths if one is missing.
RECORDED_PATHS = ("image_path",)


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
            self.paths: dict[str, list[str]] = {name: [] for name in RECORDED_PATHS}

        def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.images, self.start = 0, time.perf_counter()
            self.outputs = {name: [] for name in RECORDED_FIELDS}
            self.paths = {name: [] for name in RECORDED_PATHS}

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
            for name in RECORDED_PATHS:
                paths = getattr(batch, name, None)
                self.paths[name] += [str(path) if path else "" for path in (paths or [""] * batch.image.shape[0])]

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


def full_resolution_pixel_auroc(
    maps: Sequence[Any], image_paths: Sequence[str], mask_paths: Sequence[str], bins: int = 1 << 16
) -> float:
    """Pixel AUROC at each image's original resolution, the paper's protocol (its sec. 4).

    Every ``h x w`` anomaly map is nearest-upsampled to its image's original size and compared with the original mask
    (all zeros where an image has none). The pixels are counted into ``bins`` equal-width score bins over the maps'
    global range, so memory is the maps at model resolution plus one image at a time; the AUROC of the binned counts
    (ties within a bin count half) differs from the exact one by far less than a point at 65,536 bins.
    """
    import numpy as np
    import torch
    from PIL import Image

    stacked = [torch.as_tensor(m, dtype=torch.float64).reshape(m.shape[-2:]) for m in maps]
    low, high = min(float(m.min()) for m in stacked), max(float(m.max()) for m in stacked)
    scale = (bins - 1) / (high - low) if high > low else 0.0
    positives = np.zeros(bins, dtype=np.int64)
    negatives = np.zeros(bins, dtype=np.int64)
    for anomaly_map, image_path, mask_path in zip(stacked, image_paths, mask_paths, strict=True):
        if mask_path:
            mask = np.asarray(Image.open(mask_path).convert("L")) > 127
        else:
            with Image.open(image_path) as image:
                mask = np.zeros(image.size[::-1], dtype=bool)
        upsampled = torch.nn.functional.interpolate(anomaly_map[None, None], size=mask.shape, mode="nearest")[0, 0]
        indices = ((upsampled - low) * scale).round().long().numpy().ravel()
        flat = mask.ravel()
        positives += np.bincount(indices[flat], minlength=bins)
        negatives += np.bincount(indices[~flat], minlength=bins)
    if positives.sum() == 0 or negatives.sum() == 0:
        return math.nan
    below = np.concatenate([[0], np.cumsum(negatives)[:-1]])  # negatives scored strictly below each bin
    wins = (positives * below).sum() + 0.5 * (positives * negatives).sum()
    return float(wins / (positives.sum() * negatives.sum()))


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
@dataclass
class FitTestResult:
    """What :func:`fit_and_test` measured."""

    metrics: dict[str, float]
    train_time_s: float
    test_time_s: float
    test_throughput_ips: float
    artefact_mb: float
    memory: PeakMemory
    accelerator: str


def fit_and_test(
    model: Any,
    datamodule: Any,
    run_dir: Path,
    max_epochs: int,
    validate: bool = False,
    accelerator: str | None = None,
    callbacks: Sequence[Any] = (),
) -> FitTestResult:
    """Fit ``model`` and test it with a fresh ``Engine`` in ``run_dir``; time both, record memory and the metrics.

    The metrics are computed here from the raw test outputs (:func:`compute_metrics`), so give the model
    ``post_processor=raw_score_post_processor()`` and ``evaluator=False`` (:func:`~.building.build_model` does).
    """
    import torch
    from anomalib.engine import Engine

    accelerator = accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    recorder = make_test_recorder()
    with PeakMemory() as memory:
        engine = Engine(
            default_root_dir=run_dir,
            accelerator=accelerator,
            devices=1,
            max_epochs=max_epochs,
            logger=False,
            callbacks=[recorder, *callbacks],
            enable_progress_bar=False,
            enable_model_summary=False,
            **({} if validate else {"limit_val_batches": 0}),
        )
        started = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        train_time = time.perf_counter() - started
        artefact_mb = _checkpoint_size_mb(engine, run_dir)
        started = time.perf_counter()
        engine.test(model=model, datamodule=datamodule, verbose=False)
        metrics = compute_metrics(recorder.outputs)
        if recorder.outputs["anomaly_map"] and all(recorder.paths["image_path"]):
            samples = datamodule.test_data.samples
            masks = {
                str(image): str(mask or "") for image, mask in zip(samples.image_path, samples.mask_path, strict=True)
            }
            metrics["pixel_auroc_full"] = full_resolution_pixel_auroc(
                [m for batch in recorder.outputs["anomaly_map"] for m in batch],
                recorder.paths["image_path"],
                [masks.get(path, "") for path in recorder.paths["image_path"]],
            )
        test_time = time.perf_counter() - started
    return FitTestResult(
        metrics=metrics,
        train_time_s=train_time,
        test_time_s=test_time,
        test_throughput_ips=recorder.images_per_second,
        artefact_mb=artefact_mb,
        memory=memory,
        accelerator=accelerator,
    )


def run_job(job: Job, profile: Profile, work_dir: Path, keep_artefacts: bool = False) -> Row:
    """Build, fit and test one job (:func:`fit_and_test`); return its row."""
    from lightning.pytorch import seed_everything

    run_dir = work_dir / "runs" / job.slug()
    shutil.rmtree(run_dir, ignore_errors=True)  # left over from an interrupted attempt
    seed_everything(job.seed, workers=True, verbose=False)
    datamodule = build_datamodule(job, profile)
    model = build_model(job, profile)
    result = fit_and_test(model, datamodule, run_dir, _max_epochs(model), profile.validate_each_epoch)
    row = _job_row(job, profile, datamodule, model)
    row.update({column: _fmt(value) for column, value in result.metrics.items()})
    row.update(
        train_time_s=_fmt(result.train_time_s),
        test_time_s=_fmt(result.test_time_s),
        test_throughput_ips=_fmt(result.test_throughput_ips),
        rss_start_mb=_fmt(result.memory.start_rss_mb),
        peak_rss_mb=_fmt(result.memory.peak_rss_mb),
        peak_cuda_mb=_fmt(result.memory.peak_cuda_mb),
        artefact_mb=_fmt(result.artefact_mb),
        device=_device_name(result.accelerator),
        rss_method=result.memory.method,
    )
    if not keep_artefacts:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def _max_epochs(model: Any) -> int:
    """FCDD's budget as the model resolved it (the profile's or the backbone's default); one pass for the others."""
    return model.trainer_arguments.get("max_epochs", 1) if hasattr(model, "passes_per_epoch") else 1


def _job_row(job: Job, profile: Profile, datamodule: Any, model: Any) -> Row:
    """Key, configuration and metadata columns of a finished job (metrics and costs are added by the caller)."""
    import anomalib
    import torch

    train = datamodule.train_data.samples
    fcdd = job.method.model == "fcdd"
    image_size = profile.fcdd.image_size if fcdd else profile.baselines.image_size
    row: Row = dict(zip(KEY_COLUMNS, job.key(), strict=True))
    row.update(
        image_size=str(image_size if image_size is not None else "default"),
        epochs=str(model.epochs) if fcdd else "",
        passes_per_epoch=str(model.passes_per_epoch) if fcdd else "",
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
