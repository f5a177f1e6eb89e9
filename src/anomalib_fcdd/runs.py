"""Run folders that are never left broken: what ``anomalib-fcdd`` does around anomalib's results folders.

anomalib's Engine writes a run to ``<default_root_dir>/<Model>/<Data>/<category>/`` (the *category folder*): ``fit``
and ``train`` create the next ``vN`` there and move the ``latest`` symlink to it before anything runs; ``test``,
``validate`` and ``predict`` write into ``latest`` as it stands (``Engine._setup_workspace`` resolves
``<category folder>/latest`` and hands it to the Trainer as ``default_root_dir``). Three things go wrong with that:

* A run that fails before it trains (missing backbone weights, a zero training budget) leaves ``latest`` pointing
  at an empty ``vN``.
* A run that crashes or is interrupted half-way looks like any finished run.
* ``test``/``predict`` in a category folder without ``latest`` resolve the missing link to the plain path, so the
  Trainer creates a *real directory* called ``latest``; every later ``fit``/``train`` there then crashes with
  ``IsADirectoryError``, because ``create_versioned_dir`` removes the old link with ``Path.unlink``.

:class:`RunFolder` wraps one CLI run: before it, a real ``latest`` directory is renamed to the next ``vN`` (kept, with a
symlink to it), and ``test``/``validate``/``predict`` in a fresh folder get a ``vN`` of their own through anomalib's
``create_versioned_dir``, so ``latest`` is always a link. After a failure, a run folder the run created is deleted if
no batch ran, and otherwise marked with ``FAILED.txt`` or ``INTERRUPTED.txt`` (the reason inside); either way
``latest`` goes back to where it pointed before. ``latest`` thus always names the last run that finished, which is
what the README's ``latest/weights/lightning/model.ckpt`` commands need; the failed run stays on disk and the error
names it. :class:`RunWatch` is the Lightning callback that tells whether a batch ran, and where the outputs went.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from .errors import UserInputError

logger = logging.getLogger(__name__)
_VERSION = re.compile(r"^v(\d+)$")
LATEST = "latest"
FAILED_MARK = "FAILED.txt"
INTERRUPTED_MARK = "INTERRUPTED.txt"
METRICS_FILE = "metrics.json"


class NothingTrainedError(UserInputError):
    """``fit``/``train`` ended without a single training batch (a zero budget): there is no model to keep."""


def category_folder(default_root_dir: str | Path, model: Any, datamodule: Any) -> Path | None:
    """The folder the Engine puts ``vN`` and ``latest`` in, as ``Engine._setup_workspace`` builds it.

    ``None`` when the data is not a datamodule with a ``name`` (plain dataloaders): the Engine then names the folder
    from the dataloader, and this module stays out of the way.
    """
    name = getattr(datamodule, "name", None)
    if not isinstance(name, str) or not name or model is None:
        return None
    category = getattr(datamodule, "category", None)
    return Path(default_root_dir) / model.name / name / ("" if category is None else str(category))


def versions(folder: Path) -> dict[int, Path]:
    """The ``vN`` directories of a category folder, by number."""
    if not folder.is_dir():
        return {}
    found = {}
    for child in folder.iterdir():
        match = _VERSION.match(child.name)
        if match and child.is_dir() and not child.is_symlink():
            found[int(match.group(1))] = child
    return found


def next_version(folder: Path) -> Path:
    """The ``vN`` that anomalib's ``create_versioned_dir`` would create next."""
    numbers = versions(folder)
    return folder / f"v{max(numbers) + 1 if numbers else 0}"


def point_latest(folder: Path, target: str | Path | None) -> None:
    """Make ``latest`` a symlink to ``target`` (atomically), or remove it when ``target`` is ``None``."""
    latest = folder / LATEST
    if target is None:
        if latest.is_symlink():
            latest.unlink()
        return
    temporary = folder / f".{LATEST}.{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(target, target_is_directory=True)
    os.replace(temporary, latest)


def repair_latest(folder: Path) -> Path | None:
    """Turn a real ``latest`` directory (left by ``test``/``predict`` of earlier versions) into a ``vN`` plus a link.

    Returns the ``vN`` it became, or ``None`` when ``latest`` was fine. Windows keeps anomalib's own fallback (a
    directory holding ``.version_pointer``), which anomalib replaces itself.
    """
    latest = folder / LATEST
    if sys.platform.startswith("win") or latest.is_symlink() or not latest.is_dir():
        return None
    if (latest / ".version_pointer").exists():
        return None
    target = next_version(folder)
    latest.rename(target)
    point_latest(folder, target.resolve())
    logger.warning(
        "%s was a directory, not a link (left by a test or predict run in a fresh folder); it is now %s, and "
        "latest points at it.",
        latest,
        target.name,
    )
    return target


class RunWatch(Callback):
    """Whether a run got as far as a batch, how it ended, and where its checkpoint, metrics and heatmaps are.

    It also writes the test metrics to ``metrics.json`` in the run folder: anomalib prints them but saves them
    nowhere unless a logger is configured.
    """

    def __init__(self) -> None:
        self.started = False
        self.trained = False
        self.exception: BaseException | None = None
        self.run_dir: Path | None = None
        self.checkpoint: Path | None = None
        self.metrics: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.run_dir = Path(trainer.default_root_dir)

    def on_train_batch_start(self, *args: Any) -> None:
        self.started = self.trained = True

    def on_validation_batch_start(self, *args: Any) -> None:
        self.started = True

    def on_test_batch_start(self, *args: Any) -> None:
        self.started = True

    def on_predict_batch_start(self, *args: Any) -> None:
        self.started = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.trained:
            raise NothingTrainedError(
                f"the run ended before its first training step (max_epochs={trainer.max_epochs}, "
                f"max_steps={trainer.max_steps}), so there is no model to test or keep. Give a positive budget: "
                "--model.epochs N (FCDD's paper epochs) or, without it, --trainer.max_epochs N."
            )
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        if best:
            self.checkpoint = Path(best)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.run_dir is None or not trainer.is_global_zero:
            return
        values = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
        self.metrics = self.run_dir / METRICS_FILE
        self.metrics.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.exception = exception

    def heatmaps(self) -> Path | None:
        """anomalib's ImageVisualizer writes the overlays to ``<run folder>/images``."""
        images = None if self.run_dir is None else self.run_dir / "images"
        return images if images is not None and images.is_dir() else None

    def summary(self, checkpoint: str | Path | None = None) -> str | None:
        """One line naming the checkpoint, the metrics file and the heatmap folder, or ``None`` before a run."""
        checkpoint = self.checkpoint or (Path(checkpoint) if checkpoint else None)
        parts = [
            f"{label} {path}"
            for label, path in (("checkpoint", checkpoint), ("metrics", self.metrics), ("heatmaps", self.heatmaps()))
            if path is not None
        ]
        return f"anomalib-fcdd: results: {'; '.join(parts)}" if parts else None


class RunFolder:
    """Keeps one category folder consistent around one CLI run (see the module docstring)."""

    def __init__(self, folder: Path, creates_version: bool) -> None:
        self.folder = folder
        self.creates_version = creates_version
        self.previous: str | None = None
        self.before: set[str] = set()

    def prepare(self) -> None:
        """Repair ``latest``, remember where it points, and give a fresh folder's evaluation run a ``vN``."""
        repair_latest(self.folder)
        latest = self.folder / LATEST
        self.previous = os.readlink(latest) if latest.is_symlink() else None
        self.before = {path.name for path in versions(self.folder).values()}
        if not self.creates_version and self.previous is None:
            from anomalib.utils.path import create_versioned_dir

            create_versioned_dir(self.folder)

    def new_run(self) -> Path | None:
        """The ``vN`` this run created, if any."""
        fresh = [path for path in versions(self.folder).values() if path.name not in self.before]
        return max(fresh, key=lambda path: int(path.name[1:])) if fresh else None

    def failed(self, exception: BaseException, watch: RunWatch) -> str:
        """Delete or mark the run's own folder, put ``latest`` back; returns a sentence saying what was done."""
        run = self.new_run()
        point_latest(self.folder, self.previous)
        back = f"latest still points at {Path(self.previous).name}" if self.previous else "there is no latest run"
        if run is None:
            return back
        if not watch.started:
            shutil.rmtree(run, ignore_errors=True)
            return f"nothing ran, so {run} was removed; {back}"
        interrupted = isinstance(exception, KeyboardInterrupt) or isinstance(watch.exception, KeyboardInterrupt)
        mark = run / (INTERRUPTED_MARK if interrupted else FAILED_MARK)
        cause = watch.exception if watch.exception is not None and interrupted else exception
        reason = "interrupted (Ctrl-C)" if interrupted else f"{type(cause).__name__}: {cause}"
        mark.write_text(f"This run did not finish: {reason}\n")
        return f"the unfinished run {run} is marked with {mark.name}; {back}"
