"""Training time and memory with the training images kept in memory (the default) against decoding them every pass.

Each run is a fresh process that fits ``FcddHsc()`` (every default but the budget: ``--passes`` passes over the
category) through anomalib's ``Engine`` with this package's ``MVTec`` datamodule and 2 DataLoader workers, once with
``cache_mb`` at its default and once with ``cache_mb=0`` (``anomalib_fcdd/data/item_cache.py``). The two variants
alternate, round after round, so that machine noise hits them alike; the fit time covers filling the cache. Memory is
the peak over time of the summed PSS of the trainer and its workers (pages they share count once).

    python -m benchmarks.bench_data_cache [--mvtec-root DIR] [--category bottle] [--passes 8] [--rounds 3]
        [--output benchmarks/results/data_cache.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .bench_training import PSS_INTERVAL, _descendants, _pss_kib, append_section, machine
from .jobs import resolve_mvtec_root

RESULTS = Path(__file__).parent / "results" / "data_cache.md"
CHILD = """
import sys, time, warnings
warnings.filterwarnings("ignore")
from anomalib.engine import Engine
from anomalib_fcdd import FcddHsc
from anomalib_fcdd.data import MVTec
root, category, out, passes, cache_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
datamodule = MVTec(root=root, category=category, train_batch_size=16, num_workers=2, cache_mb=cache_mb)
model = FcddHsc(epochs=passes, passes_per_epoch=1, visualizer=False, evaluator=False)
engine = Engine(default_root_dir=out, logger=False, accelerator="cpu", enable_progress_bar=False, limit_val_batches=0)
start = time.perf_counter()
engine.fit(model, datamodule=datamodule)
print("FIT_SECONDS", time.perf_counter() - start)
"""
#: ``cache_mb`` of the two variants: the datamodules' default, and off.
VARIANTS = {"kept in memory (default)": 1024.0, "decoded every pass (cache_mb=0)": 0.0}


def fit(root: Path, category: str, workdir: Path, passes: int, cache_mb: float) -> tuple[float, float]:
    """Fit seconds and peak summed PSS (GiB) of one training in a fresh process."""
    command = [sys.executable, "-c", CHILD, str(root), category, str(workdir), str(passes), str(cache_mb)]
    peak = 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        while process.poll() is None:
            peak = max(peak, sum(_pss_kib(pid) for pid in [process.pid, *_descendants(process.pid)]))
            time.sleep(PSS_INTERVAL)
        stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the training (cache_mb={cache_mb}) failed:\n{stderr[-3000:]}")
    seconds = next(float(line.split()[1]) for line in stdout.splitlines() if line.startswith("FIT_SECONDS"))
    return seconds, peak / 2**20


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and append a section to ``--output`` (``benchmarks/results/data_cache.md``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mvtec-root", type=Path, default=resolve_mvtec_root(None))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--passes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fcdd_bench_data_cache"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.mvtec_root / args.category / "train" / "good").is_dir():
        print(f"No MVTec-AD category {args.category!r} under {args.mvtec_root}; pass --mvtec-root.", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    memory: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            seconds, gib = fit(args.mvtec_root, args.category, args.workdir, args.passes, VARIANTS[name])
            times[name].append(seconds)
            memory[name].append(gib)
            print(f"round {round_index + 1}: {name}: {seconds:.1f} s, {gib:.2f} GiB", flush=True)
    baseline = statistics.median(times["decoded every pass (cache_mb=0)"])
    rows = [
        f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) | "
        f"{baseline / statistics.median(values):.2f}x | {max(memory[name]):.2f} |"
        for name, values in times.items()
    ]
    command = "python -m benchmarks.bench_data_cache " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join(
        [
            f"`{command.strip()}`, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {machine()}.",
            f"FcddHsc() on MVTec-AD {args.category}, {args.passes} passes at batch 16, 2 DataLoader workers, "
            f"{args.rounds} rounds, variants alternating; fit time median (min-max) over the rounds.",
            "",
            "| training images | fit s | speed-up | peak PSS GiB |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    append_section(args.output, "Training images kept in memory", section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
