"""What the default's four heads cost: training and inference speed of ``heads=1`` against ``heads=4``, side by side.

Both variants are the default ``FcddHsc()`` (``efficientnet_lite0_multiscale`` with its ImageNet weights, MLP head,
feature anomalies, AdamW) and differ only in ``heads``. Each lives in a process of its own; the parent lets them step
one at a time, round by round, so that machine noise hits them alike. A training step is the model's own
``training_step`` (confetti, augmentation, backbone, heads, loss with feature anomalies) plus backward and update, in
bf16 autocast where the CPU has native bf16 (what ``precision="auto"`` trains in); inference is the eval-mode forward
of the torch model. Figures are the median images/s over the rounds, with the lowest and highest.

    python -m benchmarks.bench_heads [--batch 16] [--rounds 15]

Appends a section to ``benchmarks/results/heads.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from anomalib.data import ImageBatch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(REPO))

from benchmarks.bench_training import (  # noqa: E402
    append_section,
    interleaved_timings,
    machine,
    serve_timings,
    stand_in_memory,
)

RESULTS = REPO / "benchmarks" / "results" / "heads.md"
HEADS = (1, 4)


def _worker(heads: int, batch: int, connection: Connection) -> None:
    """One variant: build, warm up, then time a training step or an inference call whenever the parent asks."""
    from anomalib_fcdd import FcddHsc
    from anomalib_fcdd.models.fcdd.acceleration import cpu_has_native_bf16

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train_images = torch.rand(batch, 3, 240, 240, generator=generator)
    test_images = torch.rand(batch, 3, 224, 224, generator=generator)
    model = stand_in_memory(FcddHsc(heads=heads, visualizer=False))
    channels = model.model.head[0].in_channels
    model.model.feature_noise.set_spread(torch.ones(channels))  # the scale does not change the cost
    model.model.train()
    optimizer = torch.optim.AdamW([p for p in model.model.parameters() if p.requires_grad], lr=1e-3)
    bf16 = cpu_has_native_bf16()

    def train() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.training_step(ImageBatch(image=train_images))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.model(test_images)

    serve_timings(connection, batch, train, infer, evaluate=model.model.eval)


def measure(batch: int, rounds: int) -> dict[int, dict[str, list[float]]]:
    """Images/s per round, for training and inference, of each variant (interleaved)."""
    return interleaved_timings({heads: (_worker, (heads, batch)) for heads in HEADS}, rounds)


def report(samples: dict[int, dict[str, list[float]]], batch: int, rounds: int, command: str) -> str:
    """Markdown section: one row per variant, and the ratio of the medians."""

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    lines = [
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Batch {batch}, {rounds} interleaved rounds; images/s, median (lowest-highest).",
        "",
        "| heads | training step img/s | inference img/s |",
        "|---|---|---|",
    ]
    lines += [f"| {heads} | {cell(s['train'])} | {cell(s['infer'])} |" for heads, s in samples.items()]
    ratio = {kind: statistics.median(samples[4][kind]) / statistics.median(samples[1][kind]) for kind in samples[1]}
    lines += ["", f"heads=4 / heads=1: training {ratio['train']:.2f}x, inference {ratio['infer']:.2f}x."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    samples = measure(args.batch, args.rounds)
    section = report(samples, args.batch, args.rounds, "python -m benchmarks.bench_heads " + " ".join(argv or []))
    print(section)
    append_section(args.output, "Four heads against one: speed", section)


if __name__ == "__main__":
    main(sys.argv[1:])
