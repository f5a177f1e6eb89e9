"""Training-data throughput: anomalib's per-epoch ``DataLoader`` against the ``ContinuousPassLoader``, side by side.

Both decode the same MVTec-AD category to FCDD's 240 px training size in ``--num-workers`` processes, at the same batch
size, for ``--passes`` passes each, alternating round by round so that machine noise hits both alike. No model runs:
this is the rate at which the data can arrive, the ceiling of training speed on a fast accelerator. A plain
``DataLoader`` drains and restarts its workers at every pass, and at batch 128 one worker decodes a whole batch while
the others wait for the next pass; the continuous loader keeps every worker decoding.

    python -m benchmarks.bench_loading [--mvtec-root DIR] [--category bottle] [--batch-size 128] [--num-workers N]
        [--passes 5] [--rounds 2]

Appends a section to ``benchmarks/results/loading.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_inference import default_mvtec_root

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "loading.md"
LOADERS = {"DataLoader (per epoch)": False, "ContinuousPassLoader": True}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mvtec-root", type=Path, default=default_mvtec_root())
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--passes", type=int, default=5, help="passes per loader and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def training_datamodule(args: argparse.Namespace, continuous: bool) -> Any:
    """The category's training set, decoded and resized to 240 px with nearest neighbour as FCDD trains on it."""
    from torchvision.transforms.v2 import InterpolationMode, Resize

    from anomalib_fcdd.data import MVTec

    datamodule = MVTec(
        root=args.mvtec_root,
        category=args.category,
        train_batch_size=args.batch_size,
        num_workers=args.num_workers,
        continuous_passes=continuous,
        train_augmentations=Resize((240, 240), interpolation=InterpolationMode.NEAREST),
    )
    datamodule.setup("fit")
    return datamodule


def seconds_per_pass(args: argparse.Namespace, continuous: bool) -> tuple[list[float], int]:
    """Wall time of each of ``args.passes`` passes from a fresh loader (the first one includes starting the workers),
    and the number of images per pass."""
    datamodule = training_datamodule(args, continuous)
    loader = datamodule.train_dataloader()
    expected = len(datamodule.train_data)
    times = []
    for _ in range(args.passes):
        started = time.perf_counter()
        images = sum(len(batch.image) for batch in loader)
        times.append(time.perf_counter() - started)
        if images != expected:
            raise RuntimeError(f"a pass gave {images} images, expected {expected}")
    datamodule.teardown("fit")
    return times, expected


def main(argv: list[str] | None = None) -> int:
    """Time both loaders and append the comparison to the results file."""
    args = parse_args(argv)
    if not (args.mvtec_root / args.category / "train" / "good").is_dir():
        print(f"No MVTec-AD category at {args.mvtec_root / args.category}; pass --mvtec-root.", file=sys.stderr)
        return 2
    from benchmarks.bench_training import append_section, machine

    times: dict[str, list[float]] = {name: [] for name in LOADERS}
    images = 0
    for _ in range(args.rounds):
        for name, continuous in LOADERS.items():
            pass_times, images = seconds_per_pass(args, continuous)
            times[name] += pass_times
    command = " ".join(["python -m benchmarks.bench_loading", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"## {args.category}, batch {args.batch_size}, {args.num_workers} workers",
        "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- {images} training images per pass, {args.passes} passes x {args.rounds} rounds per loader, alternating",
        "",
        "| loader | s per pass (median) | images/s | first pass (s, incl. worker start) |",
        "|---|---|---|---|",
    ]
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        first = statistics.mean(values[index] for index in range(0, len(values), args.passes))
        lines.append(f"| {name} | {medians[name]:.3f} | {images / medians[name]:.0f} | {first:.2f} |")
    plain, continuous = medians.values()
    lines += ["", f"ContinuousPassLoader delivers {plain / continuous:.2f}x the images per second.", ""]
    text = "\n".join(lines)
    append_section(args.output, "Training-data throughput", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
