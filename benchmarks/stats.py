"""The paper's statistics on benchmark rows: per-category means over seeds, pairwise Wilcoxon signed-rank tests across
categories with Holm's correction at alpha = 10 %, average ranks and critical-difference (CD) diagrams (paper sec. 5,
Fig. 3).

Choices (stated here because the paper does not state all of them):

* **Blocks are categories.** Each category is trained and tested on its own, so it is one paired observation per
  method: the mean over seeds. Only categories where *every* compared method has a value are used (a complete block
  design); dropped categories are reported.
* **Two-sided** ``scipy.stats.wilcoxon`` with ``zero_method="wilcox"``: a category where two methods tie exactly
  carries no information about which is better and is discarded (Wilcoxon's original rule, scipy's default), so the
  effective sample size is the number of non-zero differences. ``method="auto"``: exact null distribution for up to
  50 distinct non-zero differences, exhaustive permutations when there are ties (n <= 13), normal approximation
  beyond. Two methods with no non-zero difference at all get p = 1.
* **Holm's step-down** over all pairs of one metric (``statsmodels`` ``multipletests(method="holm")``).
  A pair is significantly different when its Holm-adjusted p < alpha.
* **Small samples.** With n non-zero differences the smallest two-sided p a signed-rank test can give is
  2 / 2**n (every difference with the same sign): n = 4 gives 0.125, so nothing with fewer than 5 categories can be
  significant at 10 %, and after Holm over m pairs the bar is 2 / 2**n <= 0.1 / m. :func:`min_two_sided_p` reports
  that floor next to every p-value.
* **Ranks**: 1 = best (highest score) within a category, ties share the average rank; the CD diagram plots the mean
  rank over categories and joins methods whose pairwise difference is not significant (maximal cliques).
* **Standard deviations** are sample standard deviations over seeds (ddof = 1); a single seed gives none.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

logger = logging.getLogger(__name__)

ALPHA = 0.10
ZERO_METHOD = "wilcox"
MVTEC_DATASET = "mvtec_ad"

#: CSV metric column -> display name. All are higher-is-better.
METRICS = {
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_aupro": "pixel AUPRO",
    "image_auroc": "image AUROC",
    "pixel_auroc_full": "pixel AUROC at full resolution",
}
KEY_COLUMNS = ("model", "loss", "setting", "backbone", "pre_trained", "dataset", "category", "seed")
MODEL_NAMES = {"fcdd": "FCDD", "padim": "PaDiM", "patchcore": "PatchCore"}
SETTING_NAMES = {"unsupervised": "unsup", "semi-supervised": "semi"}


# ---------------------------------------------------------------------------------------------------------------------
# Loading and labelling
# ---------------------------------------------------------------------------------------------------------------------
def load_results(path: str | Path) -> pd.DataFrame:
    """The rows of a results CSV with ``method`` and ``block`` labels added (empty frame if there is no file)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=[*KEY_COLUMNS, "method", "block"])
    frame = pd.read_csv(path, dtype={column: str for column in KEY_COLUMNS}, keep_default_na=False, na_values=[""])
    for metric in METRICS:  # files written before a metric existed: NaN (shown as missing)
        if metric not in frame:
            frame[metric] = float("nan")
    return label_rows(frame)


def label_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``method`` (what is compared) and ``block`` (the category a paired observation belongs to)."""
    frame = frame.copy()
    frame["method"] = method_labels(frame)
    frame["block"] = [
        category if dataset == MVTEC_DATASET else f"{dataset}/{category}"
        for dataset, category in zip(frame["dataset"], frame["category"], strict=True)
    ]
    return frame


def method_label(model: str, loss: str, setting: str, pre_trained: bool | str) -> str:
    """A short display name, e.g. ``FCDD pixel_balanced (unsup)``; random-weight runs are marked as such."""
    name = MODEL_NAMES.get(model, model)
    if model == "fcdd":
        name = f"{name} {loss} ({SETTING_NAMES.get(setting, setting)})"
    if str(pre_trained) == "False":
        name += " [random init]"
    return name


def method_labels(frame: pd.DataFrame) -> pd.Series:
    """:func:`method_label` per row, with the backbone appended where one label covers several backbones."""
    if frame.empty:
        return pd.Series([], dtype=str, index=frame.index)
    base = pd.Series(
        [
            method_label(m, loss, s, p)
            for m, loss, s, p in zip(frame["model"], frame["loss"], frame["setting"], frame["pre_trained"], strict=True)
        ],
        index=frame.index,
    )
    backbones_per_label = frame.groupby(base)["backbone"].nunique()
    ambiguous = set(backbones_per_label[backbones_per_label > 1].index)
    return pd.Series(
        [
            f"{label} {{{bb}}}" if label in ambiguous else label
            for label, bb in zip(base, frame["backbone"], strict=True)
        ],
        index=frame.index,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Descriptive statistics
# ---------------------------------------------------------------------------------------------------------------------
def seed_summary(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, sample std (ddof = 1) and number of seeds per (method, block)."""
    grouped = frame.dropna(subset=[metric]).groupby(["method", "block"])[metric]
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n_seeds": grouped.count()})


def paired_table(frame: pd.DataFrame, metric: str, methods: Sequence[str] | None = None) -> tuple[pd.DataFrame, list]:
    """Blocks x methods table of per-block means over seeds, complete blocks only; also the dropped blocks."""
    summary = seed_summary(frame, metric)["mean"].unstack("method")
    if methods is not None:
        summary = summary.reindex(columns=list(methods))
    complete = summary.dropna(axis=0, how="any")
    dropped = sorted(set(summary.index) - set(complete.index))
    if dropped:
        logger.warning("%s: blocks without a value for every method are left out of the tests: %s", metric, dropped)
    return complete.sort_index(), dropped


def cross_category_summary(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per method: mean over blocks of the per-block means, and mean over blocks of the per-block stds.

    The second column is the paper's "cross-category average standard deviation" (its Tables 3 and 6).
    """
    summary = seed_summary(frame, metric)
    grouped = summary.groupby(level="method")
    return pd.DataFrame(
        {"mean": grouped["mean"].mean(), "mean_std": grouped["std"].mean(), "n_blocks": grouped["mean"].count()}
    )


def average_ranks(table: pd.DataFrame, higher_is_better: bool = True) -> pd.Series:
    """Mean over blocks of each method's rank within the block (1 = best; ties share the average rank)."""
    ranks = table.rank(axis=1, ascending=not higher_is_better, method="average")
    return ranks.mean(axis=0).sort_values()


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------
def min_two_sided_p(n_nonzero: int) -> float:
    """The smallest two-sided p-value a signed-rank test on ``n_nonzero`` differences can reach: 2 / 2**n."""
    return min(1.0, 2.0 / 2**n_nonzero) if n_nonzero > 0 else 1.0


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (statsmodels), in the input order."""
    from statsmodels.stats.multitest import multipletests

    p_values = np.asarray(p_values, dtype=float)
    if p_values.size == 0:
        return p_values
    return multipletests(p_values, alpha=ALPHA, method="holm")[1]


@dataclass
class Pairwise:
    """All pairwise tests of one metric.

    Attributes:
        pairs: one row per pair: a, b, n, n_nonzero, median_diff (a - b), statistic, p, p_holm, p_floor,
            significant (p_holm < alpha), better (the method with the higher median, if significant).
        p_matrix: symmetric methods x methods matrix of Holm-adjusted p-values, 1 on the diagonal.
    """

    pairs: pd.DataFrame
    p_matrix: pd.DataFrame
    n_blocks: int
    alpha: float
    notes: list[str] = field(default_factory=list)


def wilcoxon_pair(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """Two-sided signed-rank test of ``a`` vs ``b``: (statistic, p, number of non-zero differences)."""
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    nonzero = int(np.count_nonzero(differences))
    if nonzero == 0:
        return float("nan"), 1.0, 0
    result = scipy_stats.wilcoxon(a, b, zero_method=ZERO_METHOD, alternative="two-sided", method="auto")
    return float(result.statistic), float(result.pvalue), nonzero


def pairwise_wilcoxon(table: pd.DataFrame, alpha: float = ALPHA) -> Pairwise:
    """Wilcoxon signed-rank for every pair of columns of ``table`` (blocks x methods), Holm-corrected together."""
    methods = list(table.columns)
    records = []
    for a, b in itertools.combinations(methods, 2):
        statistic, p, nonzero = wilcoxon_pair(table[a].to_numpy(), table[b].to_numpy())
        records.append(
            {
                "a": a,
                "b": b,
                "n": len(table),
                "n_nonzero": nonzero,
                "median_diff": float(np.median(table[a] - table[b])) if len(table) else float("nan"),
                "statistic": statistic,
                "p": p,
                "p_floor": min_two_sided_p(nonzero),
            }
        )
    pairs = pd.DataFrame(
        records, columns=["a", "b", "n", "n_nonzero", "median_diff", "statistic", "p", "p_floor"]
    ).astype({"p": float})
    pairs["p_holm"] = holm(pairs["p"].to_numpy())
    pairs["significant"] = pairs["p_holm"] < alpha
    pairs["better"] = [
        (row.a if row.median_diff > 0 else row.b) if row.significant else "" for row in pairs.itertuples()
    ]
    matrix = pd.DataFrame(1.0, index=methods, columns=methods)
    for row in pairs.itertuples():
        matrix.loc[row.a, row.b] = matrix.loc[row.b, row.a] = row.p_holm
    return Pairwise(pairs=pairs, p_matrix=matrix, n_blocks=len(table), alpha=alpha, notes=power_notes(pairs, alpha))


def power_notes(pairs: pd.DataFrame, alpha: float) -> list[str]:
    """Plain-language warnings when the sample cannot produce a significant result."""
    if pairs.empty:
        return []
    notes = []
    m = len(pairs)
    best_floor = float(pairs["p_floor"].min())
    if best_floor >= alpha:
        notes.append(
            f"With at most {int(pairs['n_nonzero'].max())} non-zero paired differences the smallest attainable "
            f"two-sided p-value is {best_floor:.4g} >= alpha = {alpha:g}: no pair can be significant, whatever the "
            "data. Read the p-values as descriptive only."
        )
    elif min(1.0, best_floor * m) >= alpha:
        notes.append(
            f"Holm over {m} pairs needs an unadjusted p <= {alpha / m:.4g} for the first rejection, below the "
            f"smallest attainable p ({best_floor:.4g}): no pair can be significant after correction."
        )
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# Critical-difference diagrams
# ---------------------------------------------------------------------------------------------------------------------
def cd_diagram(ranks: pd.Series, p_matrix: pd.DataFrame, alpha: float, stem: Path, title: str) -> list[Path]:
    """Draw the CD diagram (scikit-posthocs) and save ``stem.png`` and ``stem.svg``; returns the paths.

    Methods whose Holm-adjusted p >= alpha are joined by a bar, as in the paper's Fig. 3.
    """
    import matplotlib

    matplotlib.use("Agg")
    import scikit_posthocs as sp
    from matplotlib import pyplot as plt

    if len(ranks) < 2:
        raise ValueError("A CD diagram needs at least two methods.")
    matrix = p_matrix.loc[ranks.index, ranks.index].fillna(1.0)
    height = 1.4 + 0.35 * len(ranks)
    figure, axis = plt.subplots(figsize=(10, height))
    sp.critical_difference_diagram(
        ranks,
        matrix,
        alpha=alpha,
        ax=axis,
        label_fmt_left="{label} ({rank:.2f})",
        label_fmt_right="({rank:.2f}) {label}",
    )
    axis.set_xlim(0.9, len(ranks) + 0.1)  # the whole rank scale, 1 .. number of methods
    axis.set_xticks(range(1, len(ranks) + 1))
    axis.set_title(title, fontsize=10, pad=24)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    figure.savefig(paths[0], dpi=150, bbox_inches="tight")  # labels sit outside the axes
    figure.savefig(paths[1], bbox_inches="tight")
    plt.close(figure)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Everything for one metric
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class MetricAnalysis:
    """The statistics of one metric over one set of methods (what a report section shows)."""

    metric: str
    table: pd.DataFrame
    dropped: list
    ranks: pd.Series | None
    pairwise: Pairwise | None
    figures: list[Path]
    notes: list[str]


def analyse_metric(
    frame: pd.DataFrame,
    metric: str,
    figure_dir: Path | None = None,
    alpha: float = ALPHA,
    tag: str = "",
    methods: Sequence[str] | None = None,
) -> MetricAnalysis:
    """Paired table, ranks, pairwise tests and (if ``figure_dir``) the CD diagram of ``metric``.

    Degenerate inputs give an analysis with notes instead of an error: no data, a single method (nothing to
    compare), no category with every method.
    """
    notes: list[str] = []
    if metric not in frame or frame[metric].dropna().empty:
        return MetricAnalysis(metric, pd.DataFrame(), [], None, None, [], [f"No {metric} values."])
    present = set(seed_summary(frame, metric).index.get_level_values("method"))
    order = [method for method in methods if method in present] if methods is not None else None
    table, dropped = paired_table(frame, metric, order)
    if dropped:
        notes.append(f"Left out (not every method has a value): {', '.join(map(str, dropped))}.")
    if len(present) < 2:
        notes.append("Only one method has values: nothing to compare, no test and no CD diagram.")
        return MetricAnalysis(metric, table, dropped, None, None, [], notes)
    if table.empty:
        notes.append("No category has a value for every method: no paired test is possible.")
        return MetricAnalysis(metric, table, dropped, None, None, [], notes)
    ranks = average_ranks(table)
    pairwise = pairwise_wilcoxon(table, alpha)
    notes.extend(pairwise.notes)
    figures: list[Path] = []
    if figure_dir is not None:
        title = (
            f"{METRICS.get(metric, metric)}{tag}: average rank over {len(table)} categories (1 = best); bars join "
            f"methods not significantly different\n(two-sided Wilcoxon signed-rank, Holm, alpha = {alpha:g})"
        )
        stem = figure_dir / f"cd_{metric}{_slug(tag)}"
        figures = cd_diagram(ranks, pairwise.p_matrix, alpha, stem, title)
    return MetricAnalysis(metric, table, dropped, ranks, pairwise, figures, notes)


def _slug(text: str) -> str:
    """``" (semi)"`` -> ``"_semi"``; empty text -> empty suffix."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return f"_{slug}" if slug else ""
