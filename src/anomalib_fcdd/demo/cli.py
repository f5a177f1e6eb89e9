"""``anomalib-fcdd demo``: build the offline texture dataset, train and test FCDD per category, write a report.

Everything runs offline on a CPU: the photos ship with scikit-image and the default backbone's ImageNet weights ship
with a pip package. ``--dataset`` points the same pipeline at any MVTec-layout folder instead.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

DEFAULT_DATA_ROOT = Path("datasets/fcdd_demo")
DEFAULT_OUTPUT = Path("demo_output")
#: The package's default backbone (ImageNet weights that load without network); fallback if it is not registered.
PREFERRED_BACKBONE = "efficientnet_lite0_multiscale"
FALLBACK_BACKBONE = "vgg11_bn"


def _categories(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one category, e.g. brick,grass")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """Command-line options (defaults finish the three textures in a few minutes on two CPU cores)."""
    from .dataset import TEXTURES, DemoDatasetConfig
    from .training import TrainSettings

    data, train = DemoDatasetConfig(), TrainSettings()
    result = argparse.ArgumentParser(
        prog="anomalib-fcdd demo",
        description="Offline FCDD demo: learn real texture photographs (scikit-image's brick, grass, gravel), find "
        "scratches, holes, stains, folds and foreign patches it never saw, and write a report with metrics, heatmaps "
        "and loss curves.",
    )
    where = result.add_argument_group("data")
    where.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="where to build the demo dataset")
    where.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="use this MVTec-layout folder instead of building the demo dataset (e.g. ../shared/data/mvtec_ad)",
    )
    where.add_argument(
        "--categories",
        type=_categories,
        default=None,
        help=f"comma-separated categories (default: {','.join(TEXTURES)}; with --dataset: every category found)",
    )
    where.add_argument("--crop-size", type=_positive, default=data.crop_size, help="side of the demo images")
    where.add_argument("--train-images", type=_positive, default=data.n_train, help="normal training crops each")
    fit = result.add_argument_group("training")
    fit.add_argument(
        "--epochs",
        type=_positive,
        default=train.epochs,
        help="passes over the training images (default: the backbone's budget, e.g. 500 steps)",
    )
    fit.add_argument(
        "--image-size",
        type=_positive,
        default=None,
        help=f"network input side (default: the crop size; {train.image_size} with --dataset)",
    )
    fit.add_argument("--batch-size", type=_positive, default=train.batch_size)
    fit.add_argument("--lr", type=float, default=train.lr, help="learning rate (default: the backbone's)")
    fit.add_argument(
        "--lr-decay",
        type=float,
        default=train.lr_decay,
        help="learning-rate factor per epoch, for backbones with the exponential schedule (default: the backbone's)",
    )
    fit.add_argument("--backbone", default=None, help=f"FCDD backbone (default {PREFERRED_BACKBONE})")
    fit.add_argument("--no-pretrained", action="store_true", help="random backbone weights (for quick tests)")
    fit.add_argument("--seed", type=int, default=data.seed, help="seed of the dataset build and of training")
    fit.add_argument("--threads", type=_positive, default=train.threads, help="torch intra-op threads")
    fit.add_argument("--num-workers", type=int, default=train.num_workers, help="DataLoader worker processes")
    out = result.add_argument_group("output")
    out.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="report folder")
    out.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's per-epoch progress bars")
    return result


def _quiet_libraries() -> None:
    """Hide library warnings and info lines that say nothing about the demo (deprecations, hardware banners).

    ``anomalib.engine`` is imported first: it imports ``lightning_fabric``, whose import resets its logger to INFO.
    """
    import anomalib.engine  # noqa: F401

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*(no logger configured|will override existing callbacks).*")
    # FCDD keeps its frozen BatchNorm layers in eval mode on purpose (docs/backbones.md)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning", "anomalib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_backbone() -> str:
    """The offline-pretrained backbone when this installation has it, else the paper's VGG."""
    from anomalib_fcdd.models.fcdd.backbones import BACKBONES

    return PREFERRED_BACKBONE if PREFERRED_BACKBONE in BACKBONES else FALLBACK_BACKBONE


def dataset_categories(root: Path) -> list[str]:
    """Categories of an MVTec-layout folder: subfolders with ``train/good``."""
    return sorted(path.name for path in root.iterdir() if (path / "train" / "good").is_dir()) if root.is_dir() else []


class DemoError(Exception):
    """A problem the user can fix from the command line; printed as one line, without a traceback."""


def resolve_data(args: argparse.Namespace, console: Any) -> tuple[Path, list[str]]:
    """The dataset root and categories: ``--dataset`` as given, or the demo textures (built if needed)."""
    from .dataset import TEXTURES, DemoDatasetConfig, build_demo_dataset

    if args.dataset is not None:
        if not Path(args.dataset).is_dir():
            raise DemoError(f"--dataset {args.dataset} does not exist (or is not a folder).")
        categories = args.categories or dataset_categories(args.dataset)
        if not categories:
            raise DemoError(f"No category folder with train/good found in {args.dataset}.")
        return args.dataset, categories
    categories = args.categories or list(TEXTURES)
    unknown = sorted(set(categories) - set(TEXTURES))
    if unknown:
        raise DemoError(f"Unknown demo textures {unknown}; choose from {','.join(TEXTURES)} (or use --dataset).")
    config = DemoDatasetConfig(crop_size=args.crop_size, n_train=args.train_images, seed=args.seed)
    with console.status(f"Building the demo dataset in {args.data_root} ..."):
        try:
            build_demo_dataset(args.data_root, categories, config)
        except ValueError as error:
            raise DemoError(str(error)) from error
    console.print(f"Dataset: {args.data_root} ({', '.join(categories)}; photo credits in CREDITS.txt there)")
    return args.data_root, categories


def settings_from(args: argparse.Namespace) -> Any:
    """Training settings from the parsed options."""
    from .training import TrainSettings

    return TrainSettings(
        backbone=args.backbone or default_backbone(),
        pre_trained=not args.no_pretrained,
        epochs=args.epochs,
        image_size=args.image_size or (args.crop_size if args.dataset is None else TrainSettings.image_size),
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        seed=args.seed,
        threads=args.threads,
        num_workers=args.num_workers,
        progress_bar=not args.no_progress_bar,
    )


def overall_progress(done: int, total: int, elapsed: float) -> str:
    """A short progress bar across categories with the elapsed time and a naive estimate of what is left."""
    width = 12
    filled = round(width * done / total)
    left = f", ~{elapsed / done * (total - done) / 60:.1f} min left" if done and done < total else ""
    return f"{'█' * filled}{'░' * (width - filled)} {done}/{total} done, {elapsed / 60:.1f} min{left}"


def summary_table(results: Sequence[Any], seconds: float) -> Any:
    """A rich table with the four metrics per category and their mean."""
    from rich.table import Table

    from .report import METRIC_TITLES, metric_rows
    from .training import METRICS

    table = Table(title=f"FCDD demo results ({seconds / 60:.1f} min)")
    table.add_column("category")
    for name in METRICS:
        table.add_column(METRIC_TITLES[name], justify="right")
    for row in metric_rows(results):
        style = "bold" if row["category"] == "mean" else None
        table.add_row(str(row["category"]), *(f"{row[name]:.3f}" for name in METRICS), style=style)
    return table


def metrics_line(result: Any) -> str:
    """One category's metrics and time, printed as soon as it is done."""
    from rich.markup import escape

    from .report import METRIC_TITLES

    values = ", ".join(f"{METRIC_TITLES[name]} {value:.3f}" for name, value in result.metrics.items())
    return f"[bold]{escape(result.category)}[/bold]: {values} ({result.seconds:.0f} s)"


def run(args: argparse.Namespace, console: Any) -> int:
    """The demo itself; returns the exit code."""
    from rich.markup import escape

    from .report import write_report
    from .training import budget_text, run_category

    start = time.perf_counter()
    root, categories = resolve_data(args, console)
    settings = settings_from(args)
    weights = "ImageNet" if settings.pre_trained else "random"
    console.print(
        f"FCDD: {settings.backbone} ({weights} weights), pixel-balanced hypersphere loss, confetti anomalies; "
        f"{budget_text(settings)} at {settings.image_size} px per category"
    )
    results = []
    for index, category in enumerate(categories):
        console.rule(
            f"[bold]{escape(category)}[/bold] {overall_progress(index, len(categories), time.perf_counter() - start)}"
        )
        results.append(run_category(root, category, settings, args.output / "checkpoints"))
        console.print(metrics_line(results[-1]))
    console.rule(overall_progress(len(categories), len(categories), time.perf_counter() - start))
    run_info = {"dataset": str(root), "categories": categories, **asdict(settings), "budget": budget_text(settings)}
    with console.status(f"Writing the report to {args.output} ..."):
        run_info["seconds"] = round(time.perf_counter() - start, 1)
        write_report(results, args.output, run_info)
    console.print(summary_table(results, time.perf_counter() - start))
    console.print(f"Report: {args.output / 'index.html'} (or index.md; metrics.csv, metrics.json, loss_curve.png)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anomalib-fcdd demo``; returns the process exit code."""
    args = parser().parse_args(list(argv) if argv is not None else None)
    _quiet_libraries()
    from rich.console import Console
    from rich.markup import escape

    from anomalib_fcdd.data import DatasetError
    from anomalib_fcdd.models.fcdd.backbones import WeightsError

    console = Console()
    try:
        return run(args, console)
    except (DemoError, DatasetError, WeightsError, FileExistsError) as error:
        console.print(f"[red]anomalib-fcdd demo: {escape(str(error))}[/red]")
        return 2
