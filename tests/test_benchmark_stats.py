"""The benchmark statistics on small fixed tables, checked against hand computations and scipy called directly."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is a top-level package next to src/, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import report, stats  # noqa: E402

PAPER_CSV = REPO_ROOT / "benchmarks" / "paper_numbers.csv"


def _rows(values: dict[tuple[str, str], list[float]], metric: str = "pixel_auroc") -> pd.DataFrame:
    """A results frame: {(model/loss label, category): [value per seed]} -> one row per seed."""
    records = []
    for (method, category), seeds in values.items():
        model, _, loss = method.partition("/")
        for seed, value in enumerate(seeds):
            records.append(
                {
                    "model": model,
                    "loss": loss or "-",
                    "setting": "unsupervised",
                    "backbone": "b",
                    "pre_trained": "True",
                    "dataset": "mvtec_ad",
                    "category": category,
                    "seed": str(seed),
                    metric: value,
                }
            )
    return stats.label_rows(pd.DataFrame(records))


def _hand_holm(p_values: list[float]) -> list[float]:
    """Holm's step-down written out: sort, multiply the i-th smallest by (m - i), running max, cap at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


# ---------------------------------------------------------------------------------------------------------------------
# Descriptive statistics
# ---------------------------------------------------------------------------------------------------------------------
def test_seed_summary_matches_hand_means_and_sample_stds() -> None:
    frame = _rows(
        {("padim", "bottle"): [0.8, 0.9, 1.0], ("padim", "cable"): [0.5, 0.7], ("patchcore", "bottle"): [0.6]}
    )
    summary = stats.seed_summary(frame, "pixel_auroc")
    bottle = summary.loc[("PaDiM", "bottle")]
    assert bottle["mean"] == pytest.approx(0.9)
    assert bottle["std"] == pytest.approx(0.1)  # sqrt(((-.1)^2 + 0 + .1^2) / (3 - 1))
    assert summary.loc[("PaDiM", "cable"), "std"] == pytest.approx(math.sqrt(0.02))  # sqrt(2 * 0.1^2 / 1)
    assert math.isnan(summary.loc[("PatchCore", "bottle"), "std"])  # one seed: no std
    assert summary.loc[("PatchCore", "bottle"), "n_seeds"] == 1


def test_cross_category_summary_averages_means_and_stds() -> None:
    frame = _rows({("padim", "a"): [0.8, 1.0], ("padim", "b"): [0.4, 0.6]})
    summary = stats.cross_category_summary(frame, "pixel_auroc").loc["PaDiM"]
    assert summary["mean"] == pytest.approx((0.9 + 0.5) / 2)
    assert summary["mean_std"] == pytest.approx(math.sqrt(0.02))  # both categories have std sqrt(0.02)
    assert summary["n_blocks"] == 2


def test_paired_table_keeps_complete_categories_only() -> None:
    frame = _rows({("padim", "a"): [0.9], ("patchcore", "a"): [0.8], ("padim", "b"): [0.7]})
    table, dropped = stats.paired_table(frame, "pixel_auroc")
    assert list(table.index) == ["a"]
    assert dropped == ["b"]
    assert table.loc["a", "PaDiM"] == pytest.approx(0.9)


def test_average_ranks_give_one_to_the_best_and_share_ties() -> None:
    table = pd.DataFrame({"A": [0.9, 0.5, 0.7], "B": [0.8, 0.5, 0.9], "C": [0.1, 0.2, 0.3]}, index=["x", "y", "z"])
    ranks = stats.average_ranks(table)
    # x: A1 B2 C3; y: A,B tie -> 1.5 each, C3; z: B1 A2 C3
    assert ranks["A"] == pytest.approx((1 + 1.5 + 2) / 3)
    assert ranks["B"] == pytest.approx((2 + 1.5 + 1) / 3)
    assert ranks["C"] == pytest.approx(3.0)
    assert list(ranks.index) == ["A", "B", "C"]  # sorted best first


def test_method_labels_mark_random_weights_and_split_backbones() -> None:
    assert stats.method_label("fcdd", "pixel_balanced", "semi-supervised", "True") == "FCDD pixel_balanced (semi)"
    assert stats.method_label("padim", "-", "unsupervised", "False") == "PaDiM [random init]"
    frame = _rows({("padim", "a"): [0.9], ("patchcore", "a"): [0.8]})
    frame.loc[1, "backbone"] = "other"
    frame = stats.label_rows(frame)
    assert set(frame["method"]) == {"PaDiM", "PatchCore"}  # one backbone per label: no suffix
    twice = pd.concat([frame, frame.assign(model="padim", backbone="x")], ignore_index=True)
    labels = set(stats.label_rows(twice)["method"])
    assert {"PaDiM {b}", "PaDiM {x}"} <= labels


# ---------------------------------------------------------------------------------------------------------------------
# Tests and corrections
# ---------------------------------------------------------------------------------------------------------------------
def test_holm_matches_hand_step_down() -> None:
    p = [0.01, 0.04, 0.03, 0.2]
    # sorted 0.01*4 = 0.04; 0.03*3 = 0.09; 0.04*2 = 0.08 -> running max 0.09; 0.2*1 = 0.2
    expected = [0.04, 0.09, 0.09, 0.2]
    assert stats.holm(p) == pytest.approx(expected)
    assert stats.holm(p) == pytest.approx(_hand_holm(p))
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    assert stats.holm([]).size == 0


def test_wilcoxon_pair_equals_scipy_and_exact_small_sample_values() -> None:
    a = np.array([0.91, 0.85, 0.77, 0.95, 0.60, 0.88])
    b = np.array([0.90, 0.80, 0.70, 0.94, 0.50, 0.86])
    statistic, p, nonzero = stats.wilcoxon_pair(a, b)
    reference = scipy_stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    assert p == pytest.approx(reference.pvalue)
    assert statistic == pytest.approx(reference.statistic)
    assert nonzero == 6
    assert p == pytest.approx(2 / 2**6)  # all six differences positive: exact two-sided p = 2 / 64


def test_wilcoxon_zero_differences_are_discarded() -> None:
    a = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    b = np.array([0.4, 0.5, 0.6, 0.7, 0.8, 1.0])  # last pair ties exactly
    _, p, nonzero = stats.wilcoxon_pair(a, b)
    assert nonzero == 5
    assert p == pytest.approx(scipy_stats.wilcoxon(a[:5], b[:5]).pvalue)
    assert p == pytest.approx(2 / 2**5)


def test_identical_methods_get_p_one_and_no_test() -> None:
    values = np.array([0.1, 0.2, 0.3])
    statistic, p, nonzero = stats.wilcoxon_pair(values, values.copy())
    assert (p, nonzero) == (1.0, 0)
    assert math.isnan(statistic)


def test_min_two_sided_p_is_two_over_two_to_the_n() -> None:
    assert stats.min_two_sided_p(4) == pytest.approx(0.125)
    assert stats.min_two_sided_p(5) == pytest.approx(0.0625)
    assert stats.min_two_sided_p(0) == 1.0
    assert stats.min_two_sided_p(1) == 1.0


def _fixed_table() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    base = rng.uniform(0.80, 0.95, size=8)
    return pd.DataFrame(
        {"good": base + 0.03 + rng.uniform(0, 0.01, 8), "mid": base + rng.normal(0, 0.004, 8), "bad": base - 0.05},
        index=[f"c{i}" for i in range(8)],
    )


def test_pairwise_wilcoxon_against_scipy_and_hand_holm() -> None:
    table = _fixed_table()
    result = stats.pairwise_wilcoxon(table, alpha=0.10)
    raw = [scipy_stats.wilcoxon(table[r.a], table[r.b]).pvalue for r in result.pairs.itertuples()]
    assert list(result.pairs["p"]) == pytest.approx(raw)
    assert list(result.pairs["p_holm"]) == pytest.approx(_hand_holm(raw))
    assert list(result.pairs["significant"]) == [p < 0.10 for p in _hand_holm(raw)]
    matrix = result.p_matrix
    assert np.allclose(matrix.to_numpy(), matrix.to_numpy().T)
    assert np.allclose(np.diag(matrix.to_numpy()), 1.0)
    good_bad = result.pairs[(result.pairs.a == "good") & (result.pairs.b == "bad")].iloc[0]
    assert good_bad.significant and good_bad.better == "good"  # 8 positive differences: p = 2/256, Holm x3
    assert good_bad.p_holm == pytest.approx(3 * 2 / 2**8)
    assert result.n_blocks == 8
    assert result.notes == []


def test_power_notes_say_when_nothing_can_be_significant() -> None:
    table = _fixed_table().iloc[:4]
    result = stats.pairwise_wilcoxon(table, alpha=0.10)
    assert not result.pairs["significant"].any()
    assert result.notes and "0.125" in result.notes[0]
    holm_limited = stats.pairwise_wilcoxon(_fixed_table().iloc[:5], alpha=0.10)  # floor 0.0625, x3 pairs > 0.1
    assert holm_limited.notes and "Holm" in holm_limited.notes[0]


# ---------------------------------------------------------------------------------------------------------------------
# CD diagrams and degenerate inputs
# ---------------------------------------------------------------------------------------------------------------------
def _frame_from_table(table: pd.DataFrame) -> pd.DataFrame:
    models = {"good": "fcdd/pixel_balanced", "mid": "fcdd/per_image", "bad": "padim"}
    values = {(models[column], category): [table.loc[category, column]] for column in table for category in table.index}
    return _rows(values)


def test_cd_diagram_files_are_written(tmp_path: Path) -> None:
    frame = _frame_from_table(_fixed_table())
    analysis = stats.analyse_metric(frame, "pixel_auroc", tmp_path)
    assert {path.suffix for path in analysis.figures} == {".png", ".svg"}
    for path in analysis.figures:
        assert path.exists() and path.stat().st_size > 1000
    assert analysis.ranks is not None and analysis.ranks.index[0] == "FCDD pixel_balanced (unsup)"


def test_degenerate_inputs_give_notes_not_errors(tmp_path: Path) -> None:
    single = _rows({("padim", "a"): [0.9], ("padim", "b"): [0.8]})
    analysis = stats.analyse_metric(single, "pixel_auroc", tmp_path)
    assert analysis.pairwise is None and analysis.figures == []
    assert "Only one method" in analysis.notes[-1]
    disjoint = _rows({("padim", "a"): [0.9], ("patchcore", "b"): [0.8]})
    analysis = stats.analyse_metric(disjoint, "pixel_auroc", tmp_path)
    assert analysis.pairwise is None and "No category" in analysis.notes[-1]
    empty = stats.analyse_metric(single, "pixel_ap", tmp_path)
    assert empty.notes == ["No pixel_ap values."]
    with pytest.raises(ValueError, match="two methods"):
        stats.cd_diagram(pd.Series({"A": 1.0}), pd.DataFrame([[1.0]], ["A"], ["A"]), 0.1, tmp_path / "x", "t")


# ---------------------------------------------------------------------------------------------------------------------
# Paper numbers and the report
# ---------------------------------------------------------------------------------------------------------------------
def test_paper_numbers_reproduce_the_published_means() -> None:
    paper = pd.read_csv(PAPER_CSV)
    assert len(paper) == 15 * 2 * 2 * 2
    assert not paper.duplicated(["category", "setting", "loss", "metric"]).any()
    means = paper.groupby(["metric", "setting", "loss"])["mean"].mean()
    published = {  # the paper's sec. 5 tables, "mean" rows (AUROC 2 decimals, AP 1)
        ("pixel_auroc", "unsupervised", "per_image"): (92.50, 0.005),
        ("pixel_auroc", "unsupervised", "pixel_balanced"): (93.04, 0.005),
        ("pixel_auroc", "semi-supervised", "per_image"): (96.41, 0.005),
        ("pixel_auroc", "semi-supervised", "pixel_balanced"): (96.52, 0.005),
        ("pixel_ap", "semi-supervised", "per_image"): (51.4, 0.05),
        ("pixel_ap", "semi-supervised", "pixel_balanced"): (53.8, 0.05),
        ("pixel_ap", "unsupervised", "per_image"): (37.0, 0.05),
        ("pixel_ap", "unsupervised", "pixel_balanced"): (39.2, 0.05),
    }
    for key, (value, tolerance) in published.items():
        assert means[key] == pytest.approx(value, abs=tolerance), key


def test_report_has_tables_diagrams_and_paper_columns(tmp_path: Path) -> None:
    records = []
    rng = np.random.default_rng(0)
    for category in ("bottle", "cable", "grid", "tile", "wood", "zipper"):
        for seed in range(2):
            for model, loss, setting in (
                ("fcdd", "per_image", "unsupervised"),
                ("fcdd", "pixel_balanced", "unsupervised"),
                ("padim", "-", "unsupervised"),
            ):
                records.append(
                    {
                        "model": model,
                        "loss": loss,
                        "setting": setting,
                        "backbone": "efficientnet_lite0",
                        "pre_trained": "True",
                        "dataset": "mvtec_ad",
                        "category": category,
                        "seed": seed,
                        "image_size": 224,
                        "epochs": 4 if model == "fcdd" else None,
                        "passes_per_epoch": 2 if model == "fcdd" else None,
                        "train_batch_size": 16,
                        "n_train": 64,
                        "pixel_auroc": rng.uniform(0.8, 0.99),
                        "pixel_ap": rng.uniform(0.2, 0.6),
                        "pixel_aupro": rng.uniform(0.5, 0.9),
                        "image_auroc": rng.uniform(0.7, 1.0),
                        "train_time_s": 10.0,
                        "test_throughput_ips": 5.0,
                        "peak_rss_mb": 2000.0,
                        "artefact_mb": 12.5,
                        "profile": "offline",
                        "backbone_note": "",
                    }
                )
    pd.DataFrame(records).to_csv(tmp_path / "results.csv", index=False)
    readme = report.write_report(tmp_path).read_text()
    for heading in ("## Mean over categories", "## Statistical comparison", "## Per category", "## Compared with"):
        assert heading in readme
    assert "figures/cd_pixel_auroc.png" in readme
    assert (tmp_path / "figures" / "cd_pixel_ap.svg").stat().st_size > 0
    assert (tmp_path / "stats" / "pixel_auroc_pairwise.csv").exists()
    bottle = [line for line in readme.splitlines() if line.startswith("| bottle | pixel AUROC | unsupervised")]
    assert any("95.6 ± 0.4" in line and "baseline" in line for line in bottle)  # paper, per_image, unsup
    assert "2 / 2^n" in readme


def test_report_on_an_empty_folder_still_writes(tmp_path: Path) -> None:
    readme = report.write_report(tmp_path).read_text()
    assert "0 runs" in readme
