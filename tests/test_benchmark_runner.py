"""The benchmark runner: job grid, the crash-safe results file, resuming, and a two-run grid end to end."""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is a top-level package next to src/, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import run  # noqa: E402
from benchmarks.profiles import (  # noqa: E402
    ALL_METHODS,
    FULL,
    BaselineConfig,
    FcddBudget,
    Method,
    Profile,
    SyntheticData,
    get_profile,
)

TINY = Profile(
    name="test",
    description="two cheap runs on generated data",
    methods=(Method("fcdd", "pixel_balanced"), Method("padim")),
    seeds=(0,),
    synthetic=SyntheticData(categories=("synthetic_a",), n_train=12, n_test_good=4, n_test_defect=4, size=64),
    fcdd=FcddBudget(pre_trained=False, epochs=1, passes_per_epoch=1, train_batch_size=8, image_size=64),
    baselines=BaselineConfig(padim_backbone="resnet18", pre_trained=False, image_size=64, train_batch_size=8),
    eval_batch_size=8,
)


class InterruptedRunError(Exception):
    """Stands in for a kill -9 / Ctrl-C after a row reached the disk."""


def _fake_jobs(count: int) -> list[run.Job]:
    source = run.CategorySource("synthetic", Path("/nowhere"), "c")
    backbone = run.BackboneChoice("b", False)
    return [run.Job(Method("padim"), backbone, source, seed) for seed in range(count)]


def _fake_row(job: run.Job) -> run.Row:
    row = dict(zip(run.KEY_COLUMNS, job.key(), strict=True))
    row["pixel_auroc"] = "0.5"
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Profiles and the job grid
# ---------------------------------------------------------------------------------------------------------------------
def test_full_profile_is_the_papers_grid() -> None:
    assert len(FULL.mvtec_categories) == 15 and FULL.seeds == (0, 1, 2, 3, 4, 5)
    assert (FULL.fcdd.backbone, FULL.fcdd.pre_trained, FULL.fcdd.epochs, FULL.fcdd.passes_per_epoch) == (
        "vgg11_bn",
        True,
        50,
        10,
    )
    assert FULL.fcdd.train_batch_size == 128 and FULL.fcdd.anomalies_per_defect == 1
    assert FULL.baselines.padim_backbone is None and FULL.baselines.patchcore_backbone is None  # anomalib defaults
    assert len(ALL_METHODS) == 8
    with pytest.raises(KeyError, match="available"):
        get_profile("nope")
    with pytest.raises(ValueError):
        Method("padim", "pixel_balanced")


def test_jobs_are_seed_major_with_unique_keys() -> None:
    sources = [run.CategorySource("mvtec_ad", Path("/x"), name) for name in ("bottle", "cable")]
    backbones = {method: run.BackboneChoice("b", True) for method in FULL.methods}
    jobs = run.build_jobs(FULL, sources, backbones)
    assert len(jobs) == 8 * 2 * 6
    assert len({job.key() for job in jobs}) == len(jobs)
    assert [job.seed for job in jobs[:16]] == [0] * 16  # every method and category of seed 0 first


def test_worker_split_covers_every_job_once() -> None:
    jobs = _fake_jobs(10)
    shares = [run._worker_share(jobs, f"{index}/3") for index in range(3)]
    assert sorted(job.seed for share in shares for job in share) == list(range(10))
    assert run._strip_option(["--profile", "full", "--devices", "0,1", "--x"], "--devices") == [
        "--profile",
        "full",
        "--x",
    ]
    assert run._strip_option(["--devices=0,1", "--x"], "--devices") == ["--x"]


def test_dry_run_lists_the_full_grid_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run.main(["--profile", "full", "--dry-run", "--mvtec-root", str(tmp_path), "--output", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0
    assert "720 jobs: 0 done, 0 pending, 720 without data" in out
    assert out.count("\tno-data\t") == 720
    assert not (tmp_path / "o" / "results.csv").exists()


def test_mvtec_root_comes_from_flag_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(run.MVTEC_ROOT_ENV, str(tmp_path / "env"))
    assert run.resolve_mvtec_root(None) == tmp_path / "env"
    assert run.resolve_mvtec_root(str(tmp_path / "flag")) == tmp_path / "flag"
    monkeypatch.delenv(run.MVTEC_ROOT_ENV)
    assert run.resolve_mvtec_root(None) == run.DEFAULT_MVTEC_ROOT


def test_missing_roots_are_skipped_with_a_note(tmp_path: Path) -> None:
    profile = get_profile("offline")
    (tmp_path / "extra" / "tex" / "train" / "good").mkdir(parents=True)
    sources, missing = run.resolve_sources(
        profile, tmp_path / "none", [tmp_path / "extra", tmp_path / "empty"], tmp_path
    )
    assert ("extra", "tex") in {(source.dataset, source.category) for source in sources}
    assert any("bottle" in note for note in missing)
    assert any("empty" in note for note in missing)


# ---------------------------------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------------------------------
def test_store_appends_with_one_header_and_reads_back(tmp_path: Path) -> None:
    store = run.ResultStore(tmp_path / "r.csv")
    jobs = _fake_jobs(2)
    for job in jobs:
        store.append(_fake_row(job))
    lines = store.path.read_text().splitlines()
    assert lines[0] == ",".join(run.COLUMNS) and len(lines) == 3
    assert store.done_keys() == {job.key() for job in jobs}
    with pytest.raises(KeyError, match="fixed set"):
        store.append({"surprise": "1"})


def test_truncated_last_line_is_dropped_and_file_repaired(tmp_path: Path) -> None:
    store = run.ResultStore(tmp_path / "r.csv")
    jobs = _fake_jobs(3)
    for job in jobs:
        store.append(_fake_row(job))
    text = store.path.read_text()
    store.path.write_text(text[: text.rfind("\n", 0, len(text) - 1) + 9])  # the third row cut after 8 characters
    assert store.done_keys() == {jobs[0].key(), jobs[1].key()}  # reading ignores the partial line
    assert store.repair() == 1
    assert store.path.read_text().endswith("\n")
    assert len(store.rows()) == 2
    store.append(_fake_row(jobs[2]))  # appending after the repair gives a clean file
    assert [row["seed"] for row in store.rows()] == ["0", "1", "2"]


def test_repair_drops_malformed_and_duplicate_rows_and_rejects_other_headers(tmp_path: Path) -> None:
    store = run.ResultStore(tmp_path / "r.csv")
    job = _fake_jobs(1)[0]
    store.append(_fake_row(job))
    with store.path.open("a") as handle:
        handle.write("a,b,c\n")
    store.append(_fake_row(job))
    assert store.repair() == 2
    assert len(store.rows()) == 1
    other = tmp_path / "other.csv"
    other.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        run.ResultStore(other).repair()


def test_concurrent_appends_stay_whole_lines(tmp_path: Path) -> None:
    store = run.ResultStore(tmp_path / "r.csv")
    jobs = _fake_jobs(40)
    threads = [threading.Thread(target=store.append, args=(_fake_row(job),)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.repair() == 0
    assert len(store.rows()) == 40 and store.path.read_text().count(",".join(run.COLUMNS)) == 1


def test_failed_job_is_recorded_and_retried_next_time(tmp_path: Path) -> None:
    store = run.ResultStore(tmp_path / "r.csv")
    failures = run.ResultStore(tmp_path / "f.csv", run.FAILURE_COLUMNS, (*run.KEY_COLUMNS, "finished_at"))
    jobs = _fake_jobs(3)

    def flaky(job: run.Job) -> run.Row:
        if job.seed == 1:
            raise RuntimeError("boom\nsecond line")
        return _fake_row(job)

    summary = run.run_jobs(jobs, store, flaky, failures=failures, show_progress=False)
    assert (summary.finished, summary.failed) == (2, 1)
    assert failures.rows()[0]["error"] == "RuntimeError: boom second line"
    summary = run.run_jobs(jobs, store, _fake_row, show_progress=False)
    assert (summary.finished, summary.skipped) == (1, 2)
    with pytest.raises(RuntimeError):
        run.run_jobs(jobs, run.ResultStore(tmp_path / "fresh.csv"), flaky, fail_fast=True, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics from raw scores
# ---------------------------------------------------------------------------------------------------------------------
def test_metrics_on_large_raw_scores_match_sklearn() -> None:
    """Raw scores far outside [0, 1] (PaDiM's Mahalanobis distances) must not be squashed by a sigmoid."""
    import torch
    from sklearn.metrics import average_precision_score, roc_auc_score

    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 16, 16, dtype=torch.bool)
    masks[3:, 4:9, 5:11] = True
    maps = 300 + 50 * torch.rand(6, 16, 16, generator=generator) + 40 * masks  # all >> 17: sigmoid gives 1.0
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([250.0, 610.0, 300.0, 600.0, 900.0, 905.0])
    half = {"pred_score": [scores[:3], scores[3:]], "gt_label": [labels[:3], labels[3:]]}
    outputs = {**half, "anomaly_map": [maps[:3, None], maps[3:, None]], "gt_mask": [masks[:3], masks[3:]]}
    metrics = run.compute_metrics(outputs)
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))  # 8/9, not 0.5
    flat_masks, flat_maps = masks.flatten().numpy(), maps.flatten().numpy()
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-6)
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-6)
    assert 0.0 < metrics["pixel_aupro"] <= 1.0
    no_masks = run.compute_metrics({**half, "anomaly_map": [], "gt_mask": []})
    assert math.isnan(no_masks["pixel_auroc"]) and no_masks["image_auroc"] == pytest.approx(8 / 9)


# ---------------------------------------------------------------------------------------------------------------------
# End to end on generated data
# ---------------------------------------------------------------------------------------------------------------------
def test_two_run_grid_resumes_after_interruption_and_truncation(tmp_path: Path) -> None:
    run._quiet_libraries()
    sources, missing = run.resolve_sources(TINY, tmp_path / "no-mvtec", [], tmp_path / "work")
    assert missing == []
    jobs = run.build_jobs(TINY, sources, run.resolve_backbones(TINY))
    assert [job.method.model for job in jobs] == ["fcdd", "padim"]
    store = run.ResultStore(tmp_path / "results" / "results.csv")
    calls: list[str] = []

    def runner(job: run.Job) -> run.Row:
        calls.append(job.method.model)
        return run.run_job(job, TINY, tmp_path / "work")

    def interrupt(row: run.Row) -> None:
        raise InterruptedRunError

    with pytest.raises(InterruptedRunError):
        run.run_jobs(jobs, store, runner, after_row=interrupt, show_progress=False)
    assert len(store.rows()) == 1

    summary = run.run_jobs(jobs, store, runner, show_progress=False)
    assert (summary.skipped, summary.finished) == (1, 1)
    rows = store.rows()
    assert len(rows) == 2 and len({tuple(row[c] for c in run.KEY_COLUMNS) for row in rows}) == 2
    assert list(rows[0]) == list(run.COLUMNS)
    for row in rows:
        for metric in run.METRIC_COLUMNS:
            assert 0.0 <= float(row[metric]) <= 1.0, (row["model"], metric)
        for cost in ("train_time_s", "test_throughput_ips", "peak_rss_mb", "artefact_mb"):
            assert float(row[cost]) > 0, (row["model"], cost)
        assert row["pre_trained"] == "False" and row["image_size"] == "64" and row["n_test"] == "8"
    assert not (tmp_path / "work" / "runs" / jobs[0].slug()).exists()  # artefacts removed after measuring

    text = store.path.read_text()
    store.path.write_text(text[:-25])  # a crash while writing the second row
    assert store.repair() == 1
    summary = run.run_jobs(jobs, store, runner, show_progress=False)
    assert (summary.skipped, summary.finished) == (1, 1)
    assert len(store.rows()) == 2
    assert calls == ["fcdd", "padim", "padim"]


def test_command_line_runs_and_reports(tmp_path: Path) -> None:
    arguments = ["--profile", "smoke", "--seeds", "0", "--limit", "1"]
    arguments += ["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    assert run.main(arguments) == 0
    assert len(run.ResultStore(tmp_path / "out" / "results.csv").rows()) == 1
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "profile `smoke`" in readme and "## Mean over categories" in readme


@pytest.mark.slow
def test_parallel_workers_share_one_file(tmp_path: Path) -> None:
    """``--devices`` fans out to pinned worker processes that append to the same locked CSV."""
    arguments = ["--profile", "smoke", "--seeds", "0", "--devices", "0,1"]
    arguments += ["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    assert run.main(arguments) == 0
    rows = run.ResultStore(tmp_path / "out" / "results.csv").rows()
    assert len(rows) == 16 and len({tuple(row[c] for c in run.KEY_COLUMNS) for row in rows}) == 16
