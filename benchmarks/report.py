"""Write ``README.md`` of a results folder: tables, CD diagrams, pairwise tests and the paper's numbers side by side.

Usage::

    python -m benchmarks.report benchmarks/results/offline

Reads ``results.csv`` (and ``failures.csv``) in the folder, writes ``README.md``, ``figures/cd_<metric>.{png,svg}``
and ``stats/<metric>_{per_category,pairwise}.csv``. It only reads rows, so it can be rerun at any time, also while a
grid is still running.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import stats
from .profiles import PROFILES, Profile

logger = logging.getLogger("benchmarks.report")

PAPER_NUMBERS = Path(__file__).resolve().parent / "paper_numbers.csv"
#: FCDD loss in this plugin -> the paper's column name (the paper's sec. 5 tables).
PAPER_LOSS_NAMES = {"per_image": "baseline", "pixel_balanced": "proposed"}
COST_COLUMNS = {
    "train_time_s": "train time (s)",
    "test_throughput_ips": "test throughput (img/s)",
    "peak_rss_mb": "peak host RSS (MiB)",
    "peak_cuda_mb": "peak CUDA (MiB)",
    "artefact_mb": "checkpoint (MiB)",
}
MODEL_ORDER = {"fcdd": 0, "padim": 1, "patchcore": 2}
LOSS_ORDER = {"fcdd": 0, "per_image": 1, "pixel_balanced": 2}
SETTING_ORDER = {"unsupervised": 0, "semi-supervised": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------------------------------------
def _pct(value: float, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def _num(value: float, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.1e}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; pipes inside cells are escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


def ordered_methods(frame: pd.DataFrame) -> list[str]:
    """FCDD unsupervised (eq. 4, per-image, pixel-balanced), FCDD semi-supervised, PaDiM, PatchCore, then others."""
    if frame.empty:
        return []
    first = frame.drop_duplicates("method").set_index("method")

    def sort_key(method: str) -> tuple:
        row = first.loc[method]
        return (
            SETTING_ORDER.get(row["setting"], 9),
            MODEL_ORDER.get(row["model"], 9),
            LOSS_ORDER.get(row["loss"], 9),
            method,
        )

    return sorted(first.index, key=sort_key)


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------
def overview_section(frame: pd.DataFrame, failures: pd.DataFrame, profile: Profile | None, folder: Path) -> str:
    """What was run: profile, counts, backbones, fall-backs."""
    lines = [f"# Benchmark results: profile `{profile.name if profile else '?'}`", ""]
    if profile is not None:
        lines += [profile.description, ""]
        lines += [f"Reproduce: `python -m benchmarks.run --profile {profile.name}` (see `benchmarks/RUNNER.md`).", ""]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f"Report written {stamp} from `{folder.name}/results.csv`: {len(frame)} runs")
    if not frame.empty:
        lines[-1] += (
            f", {frame['method'].nunique()} methods, {frame['block'].nunique()} categories "
            f"({', '.join(sorted(frame['block'].unique()))}), "
            f"seeds {sorted(int(seed) for seed in frame['seed'].unique())}."
        )
    if not failures.empty:
        lines.append(f"\n**{len(failures)} run(s) failed** and have no row (see `failures.csv`; rerun to retry).")
    if not frame.empty:
        backbones = frame.groupby("method")[["backbone", "pre_trained", "image_size"]].first()
        rows = [
            [
                method,
                backbones.loc[method, "backbone"],
                backbones.loc[method, "pre_trained"],
                backbones.loc[method, "image_size"],
            ]
            for method in ordered_methods(frame)
        ]
        lines += ["", markdown_table(["method", "backbone", "ImageNet weights", "input size"], rows)]
        notes = sorted({note for note in frame.get("backbone_note", pd.Series(dtype=str)).dropna() if note})
        for note in notes:
            lines.append(f"\n> **Fall-back:** {note}. Those rows are labelled `[random init]` below.")
    return "\n".join(lines)


def mean_section(frame: pd.DataFrame, methods: list[str]) -> str:
    """Mean over categories of the per-category means, with the mean per-category std in brackets (paper style)."""
    header = ["method", *(f"{name} %" for name in stats.METRICS.values()), *COST_COLUMNS.values()]
    summaries = {metric: stats.cross_category_summary(frame, metric) for metric in stats.METRICS}
    costs = frame.groupby("method")[[c for c in COST_COLUMNS if c in frame]].mean(numeric_only=True)
    rows = []
    for method in methods:
        cells = [method]
        for metric in stats.METRICS:
            summary = summaries[metric]
            if method in summary.index:
                cells.append(f"{_pct(summary.loc[method, 'mean'])} ({_pct(summary.loc[method, 'mean_std'])})")
            else:
                cells.append("–")
        for column in COST_COLUMNS:
            value = costs.loc[method, column] if column in costs and method in costs.index else float("nan")
            cells.append(_num(value, 2 if column == "artefact_mb" else 1))
        rows.append(cells)
    return "\n".join(
        [
            "## Mean over categories",
            "",
            "Metrics in %: mean over categories of the per-category mean over seeds; in brackets the mean over "
            "categories of the per-category standard deviation over seeds (the paper's Tables 3 and 6 report the "
            "same pair). Costs are means over all runs of a method.",
            "",
            markdown_table(header, rows),
        ]
    )


def per_category_section(frame: pd.DataFrame, methods: list[str]) -> str:
    """One table per metric: categories x methods, mean ± std over seeds in %."""
    parts = ["## Per category", "", "Mean ± standard deviation over seeds (ddof = 1), in %."]
    for metric, name in stats.METRICS.items():
        summary = stats.seed_summary(frame, metric)
        if summary.empty:
            continue
        blocks = sorted(summary.index.get_level_values("block").unique())
        rows = []
        for block in blocks:
            cells = [block]
            for method in methods:
                if (method, block) in summary.index:
                    entry = summary.loc[(method, block)]
                    std = "" if math.isnan(entry["std"]) else f" ± {_pct(entry['std'])}"
                    cells.append(f"{_pct(entry['mean'])}{std}")
                else:
                    cells.append("–")
            rows.append(cells)
        parts += ["", f"### {name}", "", markdown_table(["category", *methods], rows)]
    return "\n".join(parts)


def statistics_section(frame: pd.DataFrame, folder: Path, alpha: float, methods: list[str]) -> str:
    """CD diagram, pairwise table and power notes per metric; stats CSVs next to the README."""
    parts = [
        "## Statistical comparison",
        "",
        f"As in the paper (sec. 5, Fig. 3): per category the mean over seeds; pairwise two-sided Wilcoxon "
        f"signed-rank tests across categories (`scipy.stats.wilcoxon`, `zero_method='{stats.ZERO_METHOD}'`: exact "
        f"ties between two methods on a category are discarded), Holm's correction over all pairs of a metric, "
        f"alpha = {alpha:g}. In the CD diagrams methods are placed at their average rank (1 = best) and joined by a "
        "bar when not significantly different. `p floor` is the smallest p-value the test can reach with that many "
        "non-zero differences (2 / 2^n): when it is above alpha, no amount of effect can make the pair significant.",
    ]
    stats_dir = folder / "stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    for metric, name in stats.METRICS.items():
        analysis = stats.analyse_metric(frame, metric, folder / "figures", alpha, methods=methods)
        parts += ["", f"### {name}", ""]
        if not analysis.table.empty:
            analysis.table.to_csv(stats_dir / f"{metric}_per_category.csv")
        for figure in analysis.figures:
            if figure.suffix == ".png":
                relative = figure.relative_to(folder)
                parts += [
                    f"![CD diagram, {name}]({relative.as_posix()}) ([SVG]({relative.with_suffix('.svg').as_posix()}))",
                    "",
                ]
        if analysis.ranks is not None:
            ranks = ", ".join(f"{method} {rank:.2f}" for method, rank in analysis.ranks.items())
            parts += [f"Average ranks over {len(analysis.table)} categories: {ranks}.", ""]
        if analysis.pairwise is not None:
            pairs = analysis.pairwise.pairs
            pairs.to_csv(stats_dir / f"{metric}_pairwise.csv", index=False)
            rows = [
                [
                    row.a,
                    row.b,
                    str(row.n_nonzero),
                    f"{100 * row.median_diff:+.2f}",
                    _p(row.p),
                    _p(row.p_holm),
                    _p(row.p_floor),
                    f"yes ({row.better})" if row.significant else "no",
                ]
                for row in pairs.itertuples()
            ]
            header = ["A", "B", "n≠0", "median A−B (pp)", "p", "p Holm", "p floor", f"significant at {alpha:g}"]
            parts.append(markdown_table(header, rows))
        for note in analysis.notes:
            parts += ["", f"> {note}"]
    return "\n".join(parts)


def paper_section(frame: pd.DataFrame, paper_csv: Path = PAPER_NUMBERS) -> str:
    """Our FCDD per_image / pixel_balanced next to the paper's baseline / proposed, per MVTec-AD category present."""
    paper = pd.read_csv(paper_csv)
    ours = frame[(frame["model"] == "fcdd") & (frame["dataset"] == stats.MVTEC_DATASET)]
    ours = ours[ours["loss"].isin(PAPER_LOSS_NAMES)]
    parts = [
        "## Compared with the paper",
        "",
        "Published numbers: Bertoldo et al., 6 runs per cell, transcribed in `benchmarks/paper_numbers.csv` from "
        "the paper's sec. 5 tables (pixel AUROC, pixel AP). The paper's *baseline* is the loss run as "
        "`pixel-wise-averages-per-image` (this plugin's `per_image`), *proposed* is eq. (5) (`pixel_balanced`).",
    ]
    if ours.empty:
        parts += [
            "",
            "No FCDD `per_image`/`pixel_balanced` run on an MVTec-AD category yet: nothing to set side by side.",
        ]
    else:
        parts += ["", _paper_table(ours, paper)]
    parts += ["", _differences_text(frame)]
    return "\n".join(parts)


def _paper_table(ours: pd.DataFrame, paper: pd.DataFrame) -> str:
    rows = []
    for metric in ("pixel_auroc", "pixel_ap"):
        summary = ours.groupby(["category", "setting", "loss"])[metric].agg(["mean", "std", "count"])
        for (category, setting, loss), entry in summary.iterrows():
            published = paper[
                (paper["category"] == category)
                & (paper["setting"] == setting)
                & (paper["loss"] == loss)
                & (paper["metric"] == metric)
            ]
            paper_mean = float(published["mean"].iloc[0]) if len(published) else float("nan")
            paper_std = float(published["std"].iloc[0]) if len(published) else float("nan")
            mean = 100 * entry["mean"]
            std = "" if math.isnan(entry["std"]) else f" ± {100 * entry['std']:.1f}"
            rows.append(
                [
                    category,
                    stats.METRICS[metric],
                    setting,
                    f"{PAPER_LOSS_NAMES[loss]} (`{loss}`)",
                    f"{paper_mean:.1f} ± {paper_std:.1f}" if not math.isnan(paper_mean) else "–",
                    f"{mean:.1f}{std} (n={int(entry['count'])})",
                    f"{mean - paper_mean:+.1f}" if not math.isnan(paper_mean) else "–",
                ]
            )
    return markdown_table(["category", "metric", "setting", "loss", "paper (%)", "this run (%)", "Δ (pp)"], rows)


def _differences_text(frame: pd.DataFrame) -> str:
    """Why this run's numbers are not the paper's: what differs, from the rows themselves where possible."""
    fcdd = frame[frame["model"] == "fcdd"]
    lines = ["What differs from the paper's runs, and the expected direction:", ""]
    if not fcdd.empty:
        backbone = ", ".join(sorted(fcdd["backbone"].unique()))
        pre = ", ".join(sorted(fcdd["pre_trained"].unique()))
        epochs = ", ".join(sorted(fcdd["epochs"].dropna().astype(int).astype(str).unique()))
        passes = ", ".join(sorted(fcdd["passes_per_epoch"].dropna().astype(int).astype(str).unique()))
        n_train = ", ".join(sorted(fcdd["n_train"].dropna().astype(int).astype(str).unique()))
        batch = ", ".join(sorted(fcdd["train_batch_size"].dropna().astype(int).astype(str).unique()))
        lines += [
            f"- **Backbone**: here {backbone} (ImageNet weights: {pre}); paper: VGG-11-BN, ImageNet, frozen through "
            "the 3rd max-pool. A different receptive field (and upsampling kernel) changes the heatmaps' sharpness.",
            f"- **Training budget**: here {epochs} epoch(s) of {passes} pass(es), batch {batch}, {n_train} training "
            "images per run; paper: 50 epochs of 10 passes over all training images, batch 128. A short budget "
            "understates FCDD and can hide differences between the losses.",
        ]
    lines += [
        "- **Evaluation resolution**: anomalib computes pixel metrics at the model's input resolution (`input size` "
        "above), against masks resized with the images (nearest neighbour); the paper's AUROC used the original mask "
        "resolution (700-1024 px, nearest-upsampled heatmaps) and its AP a 224 x 224 re-evaluation. The runner also "
        "reports that protocol: `pixel AUROC at full resolution` upsamples each map (nearest) to its image's size.",
        "- **AUROC computation**: the paper's final AUROC interpolated the ROC onto 3000 thresholds; anomalib's is "
        "exact. anomalib's AUPR is the step-wise average precision, like sklearn's `average_precision_score` used "
        "for the paper's AP.",
        "- **Semi-supervised test set**: the training anomalies (one per defect type, chosen per seed) are removed "
        "from the test set here (`MVTecFewAnomalies(keep_in_test=False)`, as the paper's text says); the paper's "
        "code kept them, which inflates its semi-supervised numbers slightly.",
        "- **Seeds and sample size**: the paper ran 6 unseeded repetitions on 15 categories; fewer seeds give noisier "
        "means, and fewer categories give the Wilcoxon tests little or no power (see the p floor above).",
        "- **Scores**: metrics rank raw scores (normalisation and thresholding off, then a strictly increasing "
        "affine map onto [0, 1] over the test set), as the paper did; anomalib's default normalisation would clamp "
        "and tie the tails.",
    ]
    return "\n".join(lines)


def measurement_notes() -> str:
    """How the cost columns are measured (so nobody compares them with numbers measured differently)."""
    return "\n".join(
        [
            "## How costs are measured",
            "",
            "- **train time**: wall time of `Engine.fit` (data loading, training, PaDiM/PatchCore fitting).",
            "- **test throughput**: test images / time from the start of the test loop to the end of its last batch "
            "(loading, pre-processing, forward pass, recording the outputs; not the metric computation).",
            "- **peak host RSS**: the process's high-water mark during the run (Linux VmHWM reset before each run); it "
            "includes the ~1 GiB of imported libraries (`rss_start_mb` in the CSV is the level before the run). "
            "Dataloader worker processes are not counted. **peak CUDA**: `torch.cuda.max_memory_allocated`.",
            "- **checkpoint**: size of a Lightning checkpoint of the trained model, written after training "
            "(PatchCore's includes its memory bank, PaDiM's its per-position Gaussians).",
        ]
    )


# ---------------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------------
def write_report(folder: Path, profile: Profile | None = None, alpha: float = stats.ALPHA) -> Path:
    """Write ``folder/README.md`` (plus figures and stats CSVs) from ``folder/results.csv``; return its path."""
    folder = Path(folder)
    frame = stats.load_results(folder / "results.csv")
    failures_path = folder / "failures.csv"
    failures = pd.read_csv(failures_path) if failures_path.exists() and failures_path.stat().st_size else pd.DataFrame()
    if profile is None and not frame.empty and "profile" in frame:
        profile = PROFILES.get(str(frame["profile"].iloc[0]))
    methods = ordered_methods(frame)
    sections = [overview_section(frame, failures, profile, folder)]
    if not frame.empty:
        sections += [
            mean_section(frame, methods),
            statistics_section(frame, folder, alpha, methods),
            per_category_section(frame, methods),
        ]
    sections += [paper_section(frame) if not frame.empty else "", measurement_notes()]
    path = folder / "README.md"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(section for section in sections if section) + "\n", encoding="utf-8")
    logger.info("Report written to %s", path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.report FOLDER [--profile NAME]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a results folder holding results.csv")
    parser.add_argument("--profile", help="profile name for the description (default: from the CSV)")
    parser.add_argument("--alpha", type=float, default=stats.ALPHA)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profile = PROFILES.get(args.profile) if args.profile else None
    print(write_report(args.folder, profile=profile, alpha=args.alpha))
    return 0


if __name__ == "__main__":
    sys.exit(main())
