"""The benchmark runner: job grid, one atomically written file per run, resuming, and a two-run grid end to end."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is a top-level package next to src/, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import jobs, measuring, run, storing  # noqa: E402
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


def _fake_jobs(count: int) -> list[jobs.Job]:
    source = jobs.CategorySource("synthetic", Path("/nowhere"), "c")
    backbone = jobs.BackboneChoice("b", False)
    return [jobs.Job(Method("padim"), backbone, source, seed) for seed in range(count)]


def _fake_row(job: jobs.Job) -> jobs.Row:
    row = dict(zip(jobs.KEY_COLUMNS, job.key(), strict=True))
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
    sources = [jobs.CategorySource("mvtec_ad", Path("/x"), name) for name in ("bottle", "cable")]
    backbones = {method: jobs.BackboneChoice("b", True) for method in FULL.methods}
    grid = jobs.build_jobs(FULL, sources, backbones)
    assert len(grid) == 8 * 2 * 6
    assert len({job.key() for job in grid}) == len(grid)
    assert [job.seed for job in grid[:16]] == [0] * 16  # every method and category of seed 0 first


def test_worker_split_covers_every_job_once() -> None:
    grid = _fake_jobs(10)
    shares = [run._worker_share(grid, f"{index}/3") for index in range(3)]
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
    monkeypatch.setenv(jobs.MVTEC_ROOT_ENV, str(tmp_path / "env"))
    assert jobs.resolve_mvtec_root(None) == tmp_path / "env"
    assert jobs.resolve_mvtec_root(str(tmp_path / "flag")) == tmp_path / "flag"
    monkeypatch.delenv(jobs.MVTEC_ROOT_ENV)
    monkeypatch.chdir(tmp_path)
    assert jobs.resolve_mvtec_root(None) == jobs.DEFAULT_MVTEC_ROOT
    (tmp_path / "datasets" / "MVTecAD").mkdir(parents=True)  # where the README's commands put it
    assert jobs.resolve_mvtec_root(None).resolve() == tmp_path / "datasets" / "MVTecAD"


def test_devices_this_machine_lacks_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    run.check_devices(["0", "1"])
    with pytest.raises(SystemExit, match=r"--devices 0,1,2,3: this machine has 2 CUDA device\(s\), so 2,3 cannot"):
        run.check_devices(["0", "1", "2", "3"])


def test_missing_roots_are_skipped_with_a_note(tmp_path: Path) -> None:
    profile = get_profile("offline")
    (tmp_path / "extra" / "tex" / "train" / "good").mkdir(parents=True)
    sources, missing = jobs.resolve_sources(
        profile, tmp_path / "none", [tmp_path / "extra", tmp_path / "empty"], tmp_path
    )
    assert ("extra", "tex") in {(source.dataset, source.category) for source in sources}
    assert any("bottle" in note for note in missing)
    assert any("empty" in note for note in missing)


# ---------------------------------------------------------------------------------------------------------------------
# The result files
# ---------------------------------------------------------------------------------------------------------------------
def test_store_writes_one_file_per_run_and_a_table_with_one_header(tmp_path: Path) -> None:
    store = storing.ResultStore(tmp_path / "runs")
    grid = _fake_jobs(2)
    for job in grid:
        store.add(job.slug(), _fake_row(job))
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == sorted(f"{j.slug()}.json" for j in grid)
    assert store.done_keys() == {job.key() for job in grid}
    lines = store.write_table(tmp_path / "results.csv").read_text().splitlines()
    assert lines[0] == ",".join(jobs.COLUMNS) and len(lines) == 3
    assert [line.split(",")[jobs.COLUMNS.index("pixel_auroc")] for line in lines[1:]] == ["0.5", "0.5"]
    with pytest.raises(KeyError, match="fixed set"):
        store.add("x", {"surprise": "1"})


def test_a_crash_mid_write_leaves_no_partial_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = storing.ResultStore(tmp_path / "runs")
    first, second = _fake_jobs(2)
    store.add(first.slug(), _fake_row(first))

    def crash(source: str, target: str) -> None:
        raise KeyboardInterrupt  # killed between writing the temporary file and renaming it

    monkeypatch.setattr(storing.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.add(second.slug(), _fake_row(second))
    monkeypatch.undo()
    assert store.done_keys() == {first.key()}  # the half-written run is not counted, so it runs again
    assert [path.suffix for path in (tmp_path / "runs").iterdir()].count(".tmp") == 1
    store.add(second.slug(), _fake_row(second))
    assert store.done_keys() == {first.key(), second.key()}


def test_rewriting_a_run_replaces_its_file(tmp_path: Path) -> None:
    store = storing.ResultStore(tmp_path / "runs")
    job = _fake_jobs(1)[0]
    store.add(job.slug(), _fake_row(job))
    store.add(job.slug(), {**_fake_row(job), "pixel_auroc": "0.75"})
    assert [row["pixel_auroc"] for row in store.rows()] == ["0.75"]
    assert os.listdir(tmp_path / "runs") == [f"{job.slug()}.json"]


def test_failed_job_is_recorded_and_retried_next_time(tmp_path: Path) -> None:
    store, failures = storing.result_stores(tmp_path)
    grid = _fake_jobs(3)

    def flaky(job: jobs.Job) -> jobs.Row:
        if job.seed == 1:
            raise RuntimeError("boom\nsecond line")
        return _fake_row(job)

    summary = run.run_jobs(grid, store, flaky, failures=failures, show_progress=False)
    assert (summary.finished, summary.failed) == (2, 1)
    assert failures.rows()[0]["error"] == "RuntimeError: boom\nsecond line"
    summary = run.run_jobs(grid, store, _fake_row, show_progress=False)
    assert (summary.finished, summary.skipped) == (1, 2)
    with pytest.raises(RuntimeError):
        run.run_jobs(grid, storing.ResultStore(tmp_path / "fresh"), flaky, fail_fast=True, show_progress=False)


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
    metrics = measuring.compute_metrics(outputs)
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))  # 8/9, not 0.5
    flat_masks, flat_maps = masks.flatten().numpy(), maps.flatten().numpy()
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-6)
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-6)
    assert 0.0 < metrics["pixel_aupro"] <= 1.0
    no_masks = measuring.compute_metrics({**half, "anomaly_map": [], "gt_mask": []})
    assert math.isnan(no_masks["pixel_auroc"]) and no_masks["image_auroc"] == pytest.approx(8 / 9)


# ---------------------------------------------------------------------------------------------------------------------
# End to end on generated data
# ---------------------------------------------------------------------------------------------------------------------
def test_two_run_grid_resumes_after_an_interruption(tmp_path: Path) -> None:
    run._quiet_libraries()
    sources, missing = jobs.resolve_sources(TINY, tmp_path / "no-mvtec", [], tmp_path / "work")
    assert missing == []
    grid = jobs.build_jobs(TINY, sources, jobs.resolve_backbones(TINY))
    assert [job.method.model for job in grid] == ["fcdd", "padim"]
    store = storing.ResultStore(tmp_path / "results" / "runs")
    calls: list[str] = []

    def runner(job: jobs.Job) -> jobs.Row:
        calls.append(job.method.model)
        return measuring.run_job(job, TINY, tmp_path / "work")

    def interrupt(row: jobs.Row) -> None:
        raise InterruptedRunError

    with pytest.raises(InterruptedRunError):
        run.run_jobs(grid, store, runner, after_row=interrupt, show_progress=False)
    assert len(store.rows()) == 1

    summary = run.run_jobs(grid, store, runner, show_progress=False)
    assert (summary.skipped, summary.finished) == (1, 1)
    rows = store.rows()
    assert len(rows) == 2 and len({tuple(row[c] for c in jobs.KEY_COLUMNS) for row in rows}) == 2
    assert list(rows[0]) == list(jobs.COLUMNS)
    for row in rows:
        for metric in jobs.METRIC_COLUMNS:
            assert 0.0 <= float(row[metric]) <= 1.0, (row["model"], metric)
        for cost in ("train_time_s", "test_throughput_ips", "peak_rss_mb", "artefact_mb"):
            assert float(row[cost]) > 0, (row["model"], cost)
        assert row["pre_trained"] == "False" and row["image_size"] == "64" and row["n_test"] == "8"
    assert not (tmp_path / "work" / "runs" / grid[0].slug()).exists()  # artefacts removed after measuring

    (store.folder / f"{grid[1].slug()}.json").unlink()  # as if the second run had crashed before its file was in
    summary = run.run_jobs(grid, store, runner, show_progress=False)
    assert (summary.skipped, summary.finished) == (1, 1)
    assert len(store.rows()) == 2
    assert calls == ["fcdd", "padim", "padim"]


def test_command_line_runs_and_reports(tmp_path: Path) -> None:
    arguments = ["--profile", "smoke", "--seeds", "0", "--limit", "1"]
    arguments += ["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    assert run.main(arguments) == 0
    assert len(storing.ResultStore(tmp_path / "out" / "runs").rows()) == 1
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 2  # header + the run
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "profile `smoke`" in readme and "## Mean over categories" in readme


def test_models_option_keeps_only_those_models_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--profile", "smoke", "--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    everything = run.make_plan(run.parse_args(arguments), generate=False).jobs
    fcdd_only = run.make_plan(run.parse_args([*arguments, "--models", "fcdd"]), generate=False).jobs
    assert fcdd_only and all(job.method.model == "fcdd" for job in fcdd_only)
    assert [job for job in everything if job.method.model == "fcdd"] == fcdd_only
    with pytest.raises(SystemExit, match="--models vit: profile 'smoke' runs fcdd,padim,patchcore"):
        run.make_plan(run.parse_args([*arguments, "--models", "fcdd,vit"]), generate=False)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="--devices 0,1 needs two CUDA devices (refused on fewer)")
def test_parallel_workers_fill_one_results_folder(tmp_path: Path) -> None:
    """``--devices`` fans out to pinned worker processes, each writing its runs' files."""
    arguments = ["--profile", "smoke", "--seeds", "0", "--devices", "0,1"]
    arguments += ["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    assert run.main(arguments) == 0
    rows = storing.ResultStore(tmp_path / "out" / "runs").rows()
    assert len(rows) == 16 and len({tuple(row[c] for c in jobs.KEY_COLUMNS) for row in rows}) == 16


def test_full_resolution_pixel_auroc_matches_sklearn_on_upsampled_maps(tmp_path: Path) -> None:
    """Independent computation: upsample by hand (np.repeat), read the masks, sklearn's exact AUROC."""
    import numpy as np
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    maps, images, masks, truth, scores = [], [], [], [], []
    for index, (height, width) in enumerate([(64, 48), (32, 32), (96, 64)]):  # 4x, 2x and 6x/4x the 16 x 16 map
        low = rng.random((16, 12 if index == 0 else 16)).astype(np.float32)
        image = tmp_path / f"{index}.png"
        Image.fromarray(np.zeros((height, width), dtype=np.uint8)).save(image)
        mask = np.zeros((height, width), dtype=bool)
        mask_path = ""
        if index != 1:  # the middle image is "good": no mask file
            mask[height // 4 : height // 2, width // 3 :] = True
            mask_path = str(tmp_path / f"{index}_mask.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        up = np.repeat(np.repeat(low, height // low.shape[0], axis=0), width // low.shape[1], axis=1)
        maps.append(torch_tensor(low))
        images.append(str(image))
        masks.append(mask_path)
        truth.append(mask.ravel())
        scores.append(up.ravel())
    expected = roc_auc_score(np.concatenate(truth), np.concatenate(scores))
    assert measuring.full_resolution_pixel_auroc(maps, images, masks) == pytest.approx(expected, abs=1e-4)


def torch_tensor(array: object) -> object:
    import torch

    return torch.as_tensor(array)
