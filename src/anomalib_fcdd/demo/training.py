"""Train and test FCDD on one category through anomalib's ``Engine``, keeping what the report needs.

The report needs more than ``Engine.test`` returns: the training loss of every epoch and the raw anomaly map of every
test image. Two small Lightning callbacks collect them while the engine runs, so nothing is computed twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

#: Test metrics of FCDD's evaluator that the report shows, in order.
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPR", "pixel_AUPRO")


@dataclass(frozen=True)
class TrainSettings:
    """FCDD and trainer settings for one demo run (see ``anomalib-fcdd demo --help``).

    ``backbone`` is the package's default, and every training option left at ``None`` takes that backbone's own
    default (``docs/backbones.md``): the demo shows the model a user gets from ``FcddHsc()``. ``epochs`` replaces the
    backbone's budget by that many passes over the training images. ``threads = 1``: the network's tensors are small,
    and a second intra-op thread on a busy two-core machine made training several times slower, not faster (measured
    in docs/demo_results.md).
    """

    backbone: str = "efficientnet_lite0_multiscale"
    pre_trained: bool = True
    epochs: int | None = None
    image_size: int = 160
    batch_size: int = 16
    lr: float | None = None
    lr_decay: float | None = None
    seed: int = 0
    threads: int = 1
    num_workers: int = 0
    progress_bar: bool = True


@dataclass
class TestOutput:
    """One test image as the network saw it (after resizing), its ground truth and the raw model output."""

    image_path: str
    label: int
    score: float
    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W bool
    anomaly_map: np.ndarray  # H x W float32


@dataclass
class CategoryResult:
    """Everything the report shows for one category."""

    category: str
    metrics: dict[str, float]
    losses: list[float]
    outputs: list[TestOutput] = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: str | None = None


class LossHistory(Callback):
    """Records the epoch mean of the logged ``train_loss`` after every training epoch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Read the value FCDD logged with ``on_epoch=True``."""
        del pl_module
        value = trainer.callback_metrics.get("train_loss")
        if value is not None:
            self.losses.append(float(value))


class TestOutputCollector(Callback):
    """Copies every test image, mask, raw anomaly map and score before anomalib's post-processor normalises them.

    Callbacks given to the ``Engine`` run before the model's own (pre/post-processor, evaluator), so ``outputs`` holds
    the resized inputs and the network's raw values here. Masks come from the batch, not from ``mask_path``: anomalib
    drops the paths of a batch that mixes normal and defective images.
    """

    def __init__(self) -> None:
        self.outputs: list[TestOutput] = []

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        """Store one entry per image of the batch."""
        del trainer, pl_module, batch, batch_idx, args
        images = outputs.image.detach().float().cpu()
        height, width = images.shape[-2:]
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        maps = outputs.anomaly_map.detach().float().cpu().reshape(-1, height, width).numpy()
        masks = torch.zeros(len(images), height, width, dtype=torch.bool)
        if outputs.gt_mask is not None:
            masks = torch.as_tensor(outputs.gt_mask).detach().cpu().reshape(-1, height, width).bool()
        scores = outputs.pred_score.detach().float().cpu().reshape(-1).tolist()
        labels = torch.as_tensor(outputs.gt_label).reshape(-1).tolist()
        for index, score in enumerate(scores):
            self.outputs.append(
                TestOutput(
                    image_path=str(outputs.image_path[index]),
                    label=int(labels[index]),
                    score=float(score),
                    image=pixels[index],
                    mask=masks[index].numpy(),
                    anomaly_map=maps[index],
                )
            )


def build_model(settings: TrainSettings) -> Any:
    """``FcddHsc`` with the paper's proposed loss and confetti, at the demo's image size; no anomalib visualizer.

    Options the user did not give stay unset, so the backbone's defaults apply. ``--epochs`` sets
    ``passes_per_epoch = 1``: every epoch is one pass over the training images.
    """
    from anomalib_fcdd import FcddHsc

    chosen = {"lr": settings.lr, "lr_decay": settings.lr_decay, "epochs": settings.epochs}
    options = {name: value for name, value in chosen.items() if value is not None}
    if settings.epochs is not None:
        options["passes_per_epoch"] = 1
    return FcddHsc(
        backbone=settings.backbone,
        pre_trained=settings.pre_trained,
        loss="pixel_balanced",
        image_size=settings.image_size,
        visualizer=False,
        **options,
    )


def budget_text(settings: TrainSettings) -> str:
    """The training budget in words, as the model will run it: ``500 steps of 16 images (...)`` or ``20 epochs``."""
    from anomalib_fcdd.models.fcdd.backbones import training_defaults

    if settings.epochs is not None:
        return f"{settings.epochs} epochs"
    defaults = training_defaults(settings.backbone)
    if defaults.steps is not None and defaults.min_passes:
        above = defaults.steps * settings.batch_size // defaults.min_passes
        return (
            f"{defaults.steps} steps of {settings.batch_size} images ({defaults.min_passes} passes over more than "
            f"{above} training images, at most {defaults.max_steps} steps)"
        )
    if defaults.steps is not None:
        return f"{defaults.steps} steps of {settings.batch_size} images"
    return f"{defaults.epochs * defaults.passes_per_epoch} epochs"


def build_datamodule(root: Path, category: str, settings: TrainSettings) -> Any:
    """This package's checked ``MVTec`` datamodule (no download; validation set = test set, anomalib's default)."""
    from anomalib_fcdd.data import MVTec

    return MVTec(
        root=root,
        category=category,
        train_batch_size=settings.batch_size,
        eval_batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        seed=settings.seed,
    )


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads and restore the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_category(root: Path, category: str, settings: TrainSettings, work_dir: Path) -> CategoryResult:
    """Fit and test FCDD on ``root/category``; checkpoints go under ``work_dir``."""
    with torch_threads(settings.threads):
        return _run_category(root, category, settings, work_dir)


def _run_category(root: Path, category: str, settings: TrainSettings, work_dir: Path) -> CategoryResult:
    from anomalib.engine import Engine

    start = time.perf_counter()
    seed_everything(settings.seed, workers=True, verbose=False)
    model = build_model(settings)
    datamodule = build_datamodule(root, category, settings)
    history, collector = LossHistory(), TestOutputCollector()
    engine = Engine(
        default_root_dir=work_dir,
        logger=False,
        accelerator="cpu",
        devices=1,
        callbacks=[history, collector],
        enable_progress_bar=settings.progress_bar,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule, verbose=False)
    metrics = {name: float(results[0][name]) for name in METRICS if name in results[0]}
    checkpoint = engine.trainer.checkpoint_callback
    path = checkpoint.best_model_path or checkpoint.last_model_path if checkpoint is not None else None
    return CategoryResult(
        category=category,
        metrics=metrics,
        losses=history.losses,
        outputs=collector.outputs,
        seconds=time.perf_counter() - start,
        checkpoint=path or None,
    )
