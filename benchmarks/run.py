"""Run a benchmark grid (models x categories x seeds), one anomalib ``Engine`` per run, one result file per run.

Usage (from the repository root)::

    python -m benchmarks.run --profile smoke
    python -m benchmarks.run --profile offline [--mvtec-root DIR] [--extra-root DIR ...]
    python -m benchmarks.run --profile full --mvtec-root DIR --devices 0,1,2,3
    python -m benchmarks.run --profile full --dry-run

The concerns live in their own modules: :mod:`.jobs` (the grid and its data), :mod:`.building` (model and
datamodule of one run), :mod:`.measuring` (fit, test, time, metrics), :mod:`.storing` (one atomically written file per
finished run, so an interrupted grid resumes where it stopped) and :mod:`.report`. This module is the loop and the
command line. Why not ``anomalib benchmark``: its ``collect`` builds the CSV columns from the first job's keys and
raises ``KeyError`` when models have different init arguments, losing every row; here the column set is fixed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from .jobs import (
    KEY_COLUMNS,
    METRIC_COLUMNS,
    MVTEC_DATASET,
    MVTEC_ROOT_ENV,
    REPO_ROOT,
    RESULTS_ROOT,
    Job,
    Row,
    build_jobs,
    resolve_backbones,
    resolve_mvtec_root,
    resolve_sources,
)
from .measuring import run_job
from .profiles import NOT_APPLICABLE, SEMI_SUPERVISED, Method, Profile, get_profile
from .storing import ResultStore, result_stores

logger = logging.getLogger("benchmarks.run")


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------
JobRunner = Callable[[Job], Row]
AfterRow = Callable[[Row], None]


@dataclass
class RunSummary:
    """What a call of :func:`run_jobs` did."""

    finished: int = 0
    skipped: int = 0
    failed: int = 0


def run_jobs(
    jobs: Sequence[Job],
    store: ResultStore,
    runner: JobRunner,
    failures: ResultStore | None = None,
    after_row: AfterRow | None = None,
    fail_fast: bool = False,
    show_progress: bool = True,
) -> RunSummary:
    """Run the jobs whose keys are not in ``store`` yet, storing each row as soon as it exists.

    A job that raises is logged (and recorded in ``failures``) and the grid goes on, unless ``fail_fast``; it has no
    row, so the next invocation retries it. ``after_row`` runs after each row is on disk; whatever it raises
    propagates (tests use it to simulate an interruption).
    """
    summary = RunSummary()
    done = store.done_keys()
    pending = [job for job in jobs if job.key() not in done]
    summary.skipped = len(jobs) - len(pending)
    if summary.skipped:
        logger.info("Resuming: %d of %d runs already in %s.", summary.skipped, len(jobs), store.folder)
    with _progress(len(pending), show_progress) as advance:
        for job in pending:
            advance(_describe(job))
            try:
                row = runner(job)
            except Exception as error:
                summary.failed += 1
                logger.exception("Run %s failed.", _describe(job))
                if failures is not None:
                    failures.add(job.slug(), _failure_row(job, error))
                if fail_fast:
                    raise
                continue
            store.add(job.slug(), row)
            summary.finished += 1
            logger.info("Finished %s: %s", _describe(job), {c: row.get(c, "") for c in METRIC_COLUMNS})
            if after_row is not None:
                after_row(row)
        advance(None)
    return summary


def _failure_row(job: Job, error: BaseException) -> Row:
    row: Row = dict(zip(KEY_COLUMNS, job.key(), strict=True))
    row["error"] = f"{type(error).__name__}: {error}"[:2000]
    row["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def _describe(job: Job) -> str:
    loss = "" if job.method.loss == NOT_APPLICABLE else f"/{job.method.loss}"
    setting = "/semi" if job.method.setting == SEMI_SUPERVISED else ""
    return f"{job.method.model}{loss}{setting} {job.source.dataset}/{job.source.category} seed {job.seed}"


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str | None], None]]:
    """A rich progress bar; ``advance(text)`` marks the previous job done and shows the next (None: finish)."""
    if not enabled or total == 0:
        yield lambda text: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("benchmark", total=total)
        started = [False]

        def advance(text: str | None) -> None:
            if started[0]:
                progress.advance(task)
            started[0] = True
            if text is not None:
                progress.update(task, description=text)

        yield advance


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m benchmarks.run``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="offline", help="full, offline or smoke (benchmarks/profiles.py)")
    parser.add_argument("--mvtec-root", help=f"MVTec-AD folder (default: ${MVTEC_ROOT_ENV}, else ../shared/data/...)")
    parser.add_argument(
        "--extra-root",
        action="append",
        default=[],
        type=Path,
        help="a folder of MVTec-layout categories to add (repeatable; profiles with demo data only)",
    )
    parser.add_argument("--output", type=Path, help="results folder (default benchmarks/results/<profile>)")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and generated data (default: a temp folder)")
    parser.add_argument("--seeds", help="comma-separated seeds overriding the profile's")
    parser.add_argument(
        "--models", help="comma-separated models to run (fcdd, padim, patchcore; default: the profile's methods)"
    )
    parser.add_argument("--devices", help="comma-separated GPU ids: one worker process per id, pinned to it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "i/n", set by --devices for its children
    parser.add_argument("--dry-run", action="store_true", help="print the job list and exit")
    parser.add_argument("--limit", type=int, help="run at most this many pending jobs")
    parser.add_argument("--keep-artefacts", action="store_true", help="keep each run's checkpoint folder")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing run")
    parser.add_argument("--no-report", action="store_true", help="do not write README.md and the CD diagrams")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """A resolved invocation: the profile, where things go, and the full (deterministic) job list."""

    profile: Profile
    output: Path
    work_dir: Path
    jobs: list[Job]
    missing: list[str]


def make_plan(args: argparse.Namespace, generate: bool = True) -> Plan:
    """Resolve profile, paths, data sources and backbones into the job list."""
    profile = get_profile(args.profile)
    if args.seeds:
        profile = replace(profile, seeds=tuple(int(seed) for seed in args.seeds.split(",")))
    if args.models:
        profile = replace(profile, methods=selected_methods(profile, args.models.split(",")))
    output = args.output or RESULTS_ROOT / profile.name
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / "anomalib-fcdd-benchmark" / profile.name
    extra_roots = [Path(root).expanduser() for root in args.extra_root]
    if extra_roots and not profile.include_demo:
        logger.warning("--extra-root is ignored by profile %r (it has a fixed category list).", profile.name)
        extra_roots = []
    sources, missing = resolve_sources(
        profile, resolve_mvtec_root(args.mvtec_root), extra_roots, work_dir, generate, include_missing=not generate
    )
    for note in missing:
        logger.warning("Skipped: %s.", note)
    jobs = build_jobs(profile, sources, resolve_backbones(profile))
    return Plan(profile=profile, output=output, work_dir=work_dir, jobs=jobs, missing=missing)


def selected_methods(profile: Profile, models: Sequence[str]) -> tuple[Method, ...]:
    """The profile's methods whose model is one of ``models``; a model the profile lacks stops the run in one line."""
    available = sorted({method.model for method in profile.methods})
    unknown = sorted(set(models) - set(available))
    if unknown:
        raise SystemExit(f"error: --models {','.join(unknown)}: profile {profile.name!r} runs {','.join(available)}.")
    return tuple(method for method in profile.methods if method.model in models)


def print_plan(plan: Plan, store: ResultStore, devices: Sequence[str] = ()) -> None:
    """The job list with each job's state, the missing data and the worker split (``--dry-run``)."""
    done = store.done_keys()
    print(f"profile {plan.profile.name}: {plan.profile.description}")
    print(f"results: {store.folder}   work dir: {plan.work_dir}")
    for note in plan.missing:
        print(f"MISSING: {note}")
    print("\t".join(("#", "state", *KEY_COLUMNS, *(["worker"] if devices else []))))
    counts = {"done": 0, "pending": 0, "no-data": 0}
    for index, job in enumerate(plan.jobs):
        state = "done" if job.key() in done else "pending"
        if job.source.dataset == MVTEC_DATASET and not (job.source.root / job.source.category).is_dir():
            state = "no-data"
        counts[state] += 1
        worker = [f"{index % len(devices)} (CUDA_VISIBLE_DEVICES={devices[index % len(devices)]})"] if devices else []
        print("\t".join((str(index), state, *job.key(), *worker)))
    print(
        f"{len(plan.jobs)} jobs: {counts['done']} done, {counts['pending']} pending, {counts['no-data']} without data "
        "(a real run skips those)"
    )


def check_devices(devices: Sequence[str]) -> None:
    """Stop with one line when ``--devices`` names GPUs this machine does not have (the runs would go to the CPU)."""
    import torch

    count = torch.cuda.device_count()
    missing = [device for device in devices if not device.isdigit() or int(device) >= count]
    if missing:
        raise SystemExit(
            f"error: --devices {','.join(devices)}: this machine has {count} CUDA device(s), so {','.join(missing)} "
            "cannot be used; drop --devices to run on the CPU."
        )


def launch_workers(devices: Sequence[str], argv: Sequence[str]) -> int:
    """One child process per device, pinned with ``CUDA_VISIBLE_DEVICES``; each takes every n-th job of the list.

    The split is over the full job list (not the pending one), so it does not depend on what other workers have
    finished meanwhile; each finished run is its own file, so workers never write the same one. Returns the worst
    exit code.
    """
    base = [arg for arg in _strip_option(argv, "--devices") if arg != "--dry-run"]
    children = []
    for index, device in enumerate(devices):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
        command = [sys.executable, "-m", "benchmarks.run", *base, "--worker", f"{index}/{len(devices)}", "--no-report"]
        logger.info("Worker %d on device %s: %s", index, device, " ".join(command))
        children.append(subprocess.Popen(command, env=env, cwd=REPO_ROOT))
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def _strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    result, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            result.append(arg)
    return result


def _worker_share(jobs: list[Job], worker: str | None) -> list[Job]:
    if not worker:
        return jobs
    index, count = (int(part) for part in worker.split("/"))
    return jobs[index::count]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: plan, then dry-run, fan out over devices, or run this process's share of the grid."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    plan = make_plan(args, generate=not args.dry_run)
    store, failures = result_stores(plan.output)
    devices = [device.strip() for device in args.devices.split(",")] if args.devices else []
    if devices and not args.dry_run:
        check_devices(devices)
    if args.dry_run:
        print_plan(plan, store, devices)
        return 0
    code = launch_workers(devices, argv) if devices else _run_share(plan, store, failures, args)
    if not args.worker:
        store.write_table(plan.output / "results.csv")
        failures.write_table(plan.output / "failures.csv")
    if not args.no_report and not args.worker:
        from .report import write_report

        write_report(plan.output, profile=plan.profile)
    return code


def _run_share(plan: Plan, store: ResultStore, failures: ResultStore, args: argparse.Namespace) -> int:
    jobs = _worker_share(plan.jobs, args.worker)
    done = store.done_keys()
    pending = [job for job in jobs if job.key() not in done]
    if args.limit is not None:
        pending = pending[: args.limit]
    summary = run_jobs(
        pending,
        store,
        runner=lambda job: run_job(job, plan.profile, plan.work_dir, args.keep_artefacts),
        failures=failures,
        fail_fast=args.fail_fast,
        show_progress=not args.worker and sys.stderr.isatty(),
    )
    logger.info("Done: %d finished, %d failed; results in %s", summary.finished, summary.failed, store.folder)
    return 1 if summary.failed else 0


def _quiet_libraries() -> None:
    """Lightning and anomalib log a banner per Engine; one run per Engine makes that noise dominate the log."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "anomalib", "torch.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*but have no logger configured.*")


if __name__ == "__main__":
    sys.exit(main())
