"""The demo's report folder: metrics (CSV, JSON), one figure per test image, loss curves and an index page.

Layout of ``<output>/``::

    index.md, index.html        summary table, loss curves, every test image grouped by category and defect type
    metrics.csv, metrics.json   image AUROC, pixel AUROC, pixel AP (AUPR), pixel AUPRO per category and their mean
    loss_curve.png              training loss per epoch, one line per category
    images/<category>/<defect>_<NNN>.png   image | ground truth | heatmap overlay
"""

from __future__ import annotations

import csv
import html
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .training import METRICS, CategoryResult, TestOutput

#: Column titles for the metric names.
METRIC_TITLES = {
    "image_AUROC": "image AUROC",
    "pixel_AUROC": "pixel AUROC",
    "pixel_AUPR": "pixel AP",
    "pixel_AUPRO": "pixel AUPRO",
}


@dataclass(frozen=True)
class ImageFigure:
    """One saved per-image figure, for the index."""

    category: str
    defect: str
    path: str  # relative to the report folder
    score: float


def _new_figure(width: float, height: float, dpi: int) -> Any:
    """A matplotlib figure that renders to files only: no pyplot, no GUI backend, no global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------
def metric_rows(results: Sequence[CategoryResult]) -> list[dict[str, Any]]:
    """One row per category plus a ``mean`` row (the mean of each metric over the categories)."""
    rows: list[dict[str, Any]] = [
        {"category": result.category, **{name: result.metrics.get(name, math.nan) for name in METRICS}}
        for result in results
    ]
    if rows:
        mean = {name: float(np.mean([row[name] for row in rows])) for name in METRICS}
        rows.append({"category": "mean", **mean})
    return rows


def write_metrics(results: Sequence[CategoryResult], output: Path, run_info: dict[str, Any]) -> None:
    """``metrics.csv`` (one row per category and the mean) and ``metrics.json`` (the same, plus run details)."""
    rows = metric_rows(results)
    with (output / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["category", *METRICS])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {key: (f"{value:.4f}" if isinstance(value, float) else value) for key, value in row.items()}
            )
    payload = {
        "run": run_info,
        "categories": {
            result.category: {
                "metrics": result.metrics,
                "train_loss_per_epoch": result.losses,
                "seconds": round(result.seconds, 1),
                "test_images": len(result.outputs),
                "checkpoint": result.checkpoint,
            }
            for result in results
        },
        "mean": rows[-1] if rows else {},
    }
    (output / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------
def heat_range(outputs: Sequence[TestOutput]) -> tuple[float, float]:
    """One colour scale per category: 0 to the 99.9th percentile of all its test maps, so images compare."""
    if not outputs:
        return 0.0, 1.0
    values = np.concatenate([output.anomaly_map.reshape(-1) for output in outputs])
    return 0.0, max(float(np.quantile(values, 0.999)), 1e-8)


def defect_name(output: TestOutput) -> str:
    """The defect type of a test image: its folder name (``good`` for normal images)."""
    return Path(output.image_path).parent.name


def save_figure(output: TestOutput, path: Path, value_range: tuple[float, float]) -> None:
    """Image | ground truth | heatmap over the image (with the ground-truth outline), as one PNG."""
    image, mask, heat = output.image, output.mask, output.anomaly_map
    figure = _new_figure(7.5, 2.7, 80)
    axes = figure.subplots(1, 3)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.04)  # fixed: no tight_layout pass
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title(f"{defect_name(output)}  (score {output.score:.3g})", fontsize=9)
    axes[1].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[1].set_title("ground truth", fontsize=9)
    axes[2].imshow(image, interpolation="nearest")
    axes[2].imshow(heat, cmap="jet", alpha=0.5, vmin=value_range[0], vmax=value_range[1], interpolation="nearest")
    if mask.any():
        axes[2].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    axes[2].set_title("FCDD heatmap", fontsize=9)
    for axis in axes:
        axis.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def save_figures(result: CategoryResult, output: Path) -> list[ImageFigure]:
    """One figure per test image of a category under ``images/<category>/``."""
    value_range = heat_range(result.outputs)
    shutil.rmtree(output / "images" / result.category, ignore_errors=True)  # no stale figures from earlier runs
    figures = []
    for item in result.outputs:
        relative = Path("images") / result.category / f"{defect_name(item)}_{Path(item.image_path).stem}.png"
        save_figure(item, output / relative, value_range)
        figures.append(ImageFigure(result.category, defect_name(item), relative.as_posix(), item.score))
    return figures


def save_loss_curve(results: Sequence[CategoryResult], path: Path) -> None:
    """Training loss per epoch, one line per category (log scale: the hypersphere loss spans decades)."""
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(6, 3.5, 100)
    axis = figure.subplots()
    for result in results:
        epochs = np.arange(1, len(result.losses) + 1)
        axis.plot(epochs, result.losses, marker="o", markersize=3, label=result.category)
    axis.set_xlabel("epoch (one pass over the training images)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("train_loss")
    if all(value > 0 for result in results for value in result.losses):
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title("FCDD training loss (pixel-balanced hypersphere loss)")
    figure.tight_layout()
    figure.savefig(path)


# ---------------------------------------------------------------------------------------------------------------------
# Index pages
# ---------------------------------------------------------------------------------------------------------------------
def _format(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _grouped(figures: Sequence[ImageFigure]) -> dict[str, dict[str, list[ImageFigure]]]:
    """Figures by category, then defect type (``good`` last), highest score first within a type."""
    grouped: dict[str, dict[str, list[ImageFigure]]] = {}
    for figure in figures:
        grouped.setdefault(figure.category, {}).setdefault(figure.defect, []).append(figure)
    for defects in grouped.values():
        for items in defects.values():
            items.sort(key=lambda item: -item.score)
    return {
        category: dict(sorted(defects.items(), key=lambda item: (item[0] == "good", item[0])))
        for category, defects in grouped.items()
    }


def index_markdown(rows: Sequence[dict[str, Any]], figures: Sequence[ImageFigure], run_info: dict[str, Any]) -> str:
    """``index.md``: metrics table, loss curve, then every figure by category and defect type."""
    lines = ["# FCDD demo report", "", _run_line(run_info), ""]
    lines += ["| category | " + " | ".join(METRIC_TITLES[name] for name in METRICS) + " |"]
    lines += ["|---|" + "---|" * len(METRICS)]
    lines += [f"| {row['category']} | " + " | ".join(_format(row[name]) for name in METRICS) + " |" for row in rows]
    lines += ["", "Files: [metrics.csv](metrics.csv), [metrics.json](metrics.json)", ""]
    lines += ["## Training loss", "", "![training loss](loss_curve.png)", ""]
    for category, defects in _grouped(figures).items():
        lines += [f"## {category}", ""]
        for defect, items in defects.items():
            lines += [f"### {category} / {defect} ({len(items)} images)", ""]
            lines += [f"![{category} {defect} score {item.score:.3g}]({item.path})" for item in items]
            lines += [""]
    return "\n".join(lines)


def index_html(rows: Sequence[dict[str, Any]], figures: Sequence[ImageFigure], run_info: dict[str, Any]) -> str:
    """``index.html``: the same content as ``index.md``, viewable in any browser without a Markdown renderer."""
    escape = html.escape
    head = "".join(f"<th>{escape(METRIC_TITLES[name])}</th>" for name in METRICS)
    body = "".join(
        f"<tr><td>{escape(str(row['category']))}</td>"
        + "".join(f"<td>{_format(row[name])}</td>" for name in METRICS)
        + "</tr>"
        for row in rows
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>FCDD demo report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img.fig{width:600px;margin:2px}</style>",
        "</head><body><h1>FCDD demo report</h1>",
        f"<p>{escape(_run_line(run_info))}</p>",
        f"<table><tr><th>category</th>{head}</tr>{body}</table>",
        "<p><a href='metrics.csv'>metrics.csv</a> &middot; <a href='metrics.json'>metrics.json</a></p>",
        "<h2>Training loss</h2><img src='loss_curve.png' alt='training loss'>",
    ]
    for category, defects in _grouped(figures).items():
        parts.append(f"<h2>{escape(category)}</h2>")
        for defect, items in defects.items():
            parts.append(f"<h3>{escape(category)} / {escape(defect)} ({len(items)} images)</h3>")
            parts += [
                f"<a href='{escape(item.path)}'><img class='fig' src='{escape(item.path)}'></a>" for item in items
            ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _run_line(run_info: dict[str, Any]) -> str:
    keys = ("dataset", "backbone", "pre_trained", "budget", "image_size", "seconds")
    return ", ".join(f"{key}: {run_info[key]}" for key in keys if key in run_info)


def write_report(results: Sequence[CategoryResult], output: Path, run_info: dict[str, Any]) -> list[ImageFigure]:
    """Write every report file into ``output`` and return the per-image figures."""
    output.mkdir(parents=True, exist_ok=True)
    write_metrics(results, output, run_info)
    save_loss_curve(results, output / "loss_curve.png")
    figures = [figure for result in results for figure in save_figures(result, output)]
    rows = metric_rows(results)
    (output / "index.md").write_text(index_markdown(rows, figures, run_info))
    (output / "index.html").write_text(index_html(rows, figures, run_info))
    return figures
