"""Training and inference speed of FCDD, and peak host memory of a full-category training, measured side by side.

Variants, all on the same network (VGG-11-BN cut, 224 x 224), batch and machine, each in a process of its own and
interleaved step by step, round by round, so that machine noise hits them alike:

* ``reference-like``: fp32, NCHW, eager, the 62 x 62 upsampling kernel applied in one 2-D transposed convolution,
  BatchNorm layers run as such (a fresh output each) -- the reference's kind of step;
* ``default``: this package's default (``precision="auto"``: bf16 autocast where the hardware has native bf16, else
  fp32; ``accelerate=True``: channels-last memory layout and BatchNorm folded into the convolutions at inference; the
  upsampling kernel applied as two 1-D passes);
* one row per speed trick with that trick alone switched off, so each one's gain is measured on its own;
* ``bf16 forced``: bf16 autocast even where it is emulated, to show what ``auto`` avoids.

A training step is the package's full step: confetti synthesis and augmentation on the batch, forward, loss, backward,
SGD update. The memory figures come from a child process that trains one epoch on a real MVTec-AD category through
anomalib's Engine (image decoding in DataLoader workers) and reports its fit time and peak memory.

    python -m benchmarks.bench_training [--batch 16] [--rounds 3] [--mvtec-root DIR] [--category bottle]
        [--memory-batches 16 128]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from anomalib.data import ImageBatch

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.models.fcdd.acceleration import native_bf16_cpu_flags, resolve_precision
from anomalib_fcdd.models.fcdd.map_fusion import CalibrationSample
from benchmarks.jobs import resolve_mvtec_root

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "training.md"
README_SECTION = "## Training and inference speed, memory"


@dataclass
class Variant:
    """One way of running the same network."""

    name: str
    bf16: bool
    accelerate: bool
    separable_upsampling: bool = True
    fold_batchnorm: bool = True


def machine() -> str:
    """CPU model and core count (and GPU when present)."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    flags = native_bf16_cpu_flags()
    bf16 = f"native bf16: {', '.join(sorted(flags))}" if flags else "no native bf16"
    return f"{model}, {os.cpu_count()} cores ({bf16}), torch {torch.__version__}{gpu}"


def append_section(path: Path, title: str, section: str) -> None:
    """Append one run's Markdown ``section`` to the results file ``path``, starting it with ``# title`` if new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "" if path.exists() else f"# {title}\n\n"
    with path.open("a") as handle:
        handle.write(header + section.rstrip("\n") + "\n\n")


def stand_in_memory(model: FcddHsc, pool: int = 5000) -> FcddHsc:
    """Give an untrained model's memory (``image_score="memory"`` and ``fused_map``, the defaults) random vectors of
    its full size, and the fused map spreads measured on random vectors, so timings include its distances and the
    fused map; a trained model builds both from the training images instead."""
    net = model.model
    memory = net.memory
    if memory is not None and not memory.ready:
        training = net.training
        with torch.no_grad():
            features = net.eval().backbone_features(torch.zeros(1, 3, 64, 64))
            width = memory.memory_features(features).shape[1]
        net.train(training)
        generator = torch.Generator().manual_seed(0)
        memory.fit(torch.randn(max(pool, memory.size), width, generator=generator))
        if net.map_fusion is not None:
            sample = CalibrationSample(
                torch.randn(pool, features.shape[1], generator=generator), torch.randn(pool, width, generator=generator)
            )
            net.calibrate_map(sample)
    return model


def build(variant: Variant) -> FcddHsc:
    """A FcddHsc with fixed min-max constants, so no data pass is needed (its memory a random stand-in)."""
    torch.manual_seed(0)
    model = FcddHsc(pre_trained=False, minmax="bottle", accelerate=variant.accelerate, visualizer=False)
    stand_in_memory(model)
    for upsampler in (model.model.upsampler, model.model.map_upsampler):  # training's and the output map's
        upsampler.separable = variant.separable_upsampling
    if not variant.fold_batchnorm:  # this trick alone off: the seam hands back the backbone as it is
        model.model.acceleration.backbone = lambda features, training: features
    model.model.train()
    return model


def train_step(model: FcddHsc, optimizer: torch.optim.Optimizer, images: torch.Tensor, bf16: bool) -> None:
    """The model's own ``training_step`` (confetti, augmentation, forward, loss), then backward and SGD update."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.training_step(ImageBatch(image=images))["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def infer(model: FcddHsc, images: torch.Tensor, bf16: bool) -> None:
    """Eval-mode forward of the torch model."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.model(images)


def inference_macs_per_image(size: int = 224) -> float:
    """Multiply-accumulates of the convolutions of one eval forward pass (hooks count ``out * C_in/groups * k^2``)."""
    model = build(Variant("count", False, False)).model.eval()
    total = 0

    def count(layer: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = layer.weight.shape[2] * layer.weight.shape[3]
        total += output.numel() * (layer.in_channels // layer.groups) * kernel

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(torch.rand(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return float(total)


def serve_timings(
    connection: Connection,
    batch: int,
    train: Callable[[], None],
    infer: Callable[[], None],
    evaluate: Callable[[], None],
) -> None:
    """The child's side of :func:`interleaved_timings`: warm up, say ``ready``, then time a ``train`` step or an
    ``infer`` call whenever the parent asks, and send back images/s, until ``stop``. ``evaluate`` switches the model
    to eval mode before the first (untimed, warm-up) inference."""
    train()  # warm-up (oneDNN primitive creation)
    connection.send("ready")
    evaluating = False
    while (command := connection.recv()) != "stop":
        if command == "infer" and not evaluating:
            evaluate()
            infer()  # warm-up
            evaluating = True
        start = time.perf_counter()
        train() if command == "train" else infer()
        connection.send(batch / (time.perf_counter() - start))


def interleaved_timings(
    workers: Mapping[Hashable, tuple[Callable[..., None], tuple[Any, ...]]], rounds: int
) -> dict[Hashable, dict[str, list[float]]]:
    """Images/s of every round, for training then inference, of each variant (``name -> (target, args)``).

    Each variant lives in a process of its own (``target(*args, connection)``, which calls :func:`serve_timings`):
    the heap one variant's steps leave behind would otherwise shape the next one's allocations. The parent lets them
    step one at a time, round by round, so that machine noise hits them alike.
    """
    context = multiprocessing.get_context("spawn")
    processes = {}
    for name, (target, args) in workers.items():
        parent_end, child_end = context.Pipe()
        process = context.Process(target=target, args=(*args, child_end), daemon=True)
        process.start()
        processes[name] = (process, parent_end)
    samples: dict[Hashable, dict[str, list[float]]] = {name: {"train": [], "infer": []} for name in processes}

    def reply(name: Hashable) -> Any:
        process, connection = processes[name]
        try:
            return connection.recv()
        except EOFError:
            process.join(timeout=10)
            raise RuntimeError(
                f"the process timing {name!r} ended early (exit code {process.exitcode}); its error is printed above"
            ) from None

    try:
        for name in processes:
            reply(name)  # "ready": built and warmed up
        for kind in ("train", "infer"):
            for _ in range(rounds):
                for name, (_, connection) in processes.items():
                    connection.send(kind)
                    samples[name][kind].append(reply(name))
        for _, connection in processes.values():
            connection.send("stop")
    finally:
        for process, _ in processes.values():
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    return samples


def _variant_process(variant: Variant, batch: int, connection: Connection) -> None:
    """One variant in a process of its own (:func:`serve_timings`)."""
    generator = torch.Generator().manual_seed(0)
    train_images = torch.rand(batch, 3, 240, 240, generator=generator)
    test_images = torch.rand(batch, 3, 224, 224, generator=generator)
    model = build(variant)
    optimizer = torch.optim.SGD([p for p in model.model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    serve_timings(
        connection,
        batch,
        train=lambda: train_step(model, optimizer, train_images, variant.bf16),
        infer=lambda: infer(model, test_images, variant.bf16),
        evaluate=model.model.eval,
    )


def measure(variants: list[Variant], batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """Images/s for training and inference per variant: the best of ``rounds`` interleaved rounds."""
    samples = interleaved_timings({v.name: (_variant_process, (v, batch)) for v in variants}, rounds)
    return {name: {kind: max(values) for kind, values in kinds.items()} for name, kinds in samples.items()}


CHILD = """
import resource, sys, time, warnings
warnings.filterwarnings("ignore")
from anomalib.engine import Engine
from anomalib_fcdd import FcddHsc
from anomalib_fcdd.data import MVTec
root, category, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
datamodule = MVTec(root=root, category=category, train_batch_size=batch, eval_batch_size=min(batch, 32), num_workers=2)
model = FcddHsc(pre_trained=False, epochs=1, passes_per_epoch=1, visualizer=False)
engine = Engine(default_root_dir=out, logger=False, accelerator="cpu", enable_progress_bar=False)
start = time.perf_counter()
engine.fit(model, datamodule=datamodule)
print("FIT_SECONDS", time.perf_counter() - start)
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print("PEAK_CHILDREN_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
#: Seconds between two samples of the training processes' PSS (taken from this process, not the trained one).
PSS_INTERVAL = 0.25


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (DataLoader workers), from ``/proc/<pid>/task/*/children``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _pss_kib(pid: int) -> int:
    """Proportional set size of ``pid``: each page it shares with others counts by its share, so sums add up."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def full_category_memory(root: Path, category: str, workdir: Path, batch: int = 16) -> dict[str, float]:
    """Fit time and peak memory (GiB) of one pass over a category: RSS of the trainer and of its largest worker, and
    the peak over time of the summed PSS of the trainer and all its workers (``nan`` where ``/proc`` has no PSS)."""
    command = [sys.executable, "-c", CHILD, str(root), category, str(workdir), str(batch)]
    peak_pss = 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + 3600
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the memory run (batch {batch}) took over an hour")
            peak_pss = max(peak_pss, sum(_pss_kib(pid) for pid in [process.pid, *_descendants(process.pid)]))
            time.sleep(PSS_INTERVAL)
        stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the memory run (batch {batch}) failed:\n{stderr[-3000:]}")
    values = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in {"FIT_SECONDS", "PEAK_RSS_KB", "PEAK_CHILDREN_RSS_KB"}:
            values[key] = float(value)
    return {
        "fit_seconds": values["FIT_SECONDS"],
        "main_gib": values["PEAK_RSS_KB"] / 2**20,
        "worker_gib": values["PEAK_CHILDREN_RSS_KB"] / 2**20,
        "total_pss_gib": peak_pss / 2**20 if peak_pss else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and write ``benchmarks/results/training.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mvtec-root", type=Path, default=resolve_mvtec_root(None))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--memory-batches", type=int, nargs="+", default=[16, 128], help="training batch sizes of the memory runs"
    )
    parser.add_argument(
        "--include-emulated-bf16", action="store_true", help="also time bf16 where it is emulated (very slow)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--readme", action=argparse.BooleanOptionalAction, default=True, help="also update benchmarks/README.md"
    )
    args = parser.parse_args(argv)

    auto = resolve_precision("auto", "cpu") == "bf16-mixed"
    precision = "bf16" if auto else "fp32"
    variants = [
        Variant("reference-like (fp32, NCHW, 2-D upsampling kernel, BN unfolded)", False, False, False),
        Variant(f"default ({precision}, accelerate: channels-last + BN folded at inference)", auto, True),
        Variant(f"default without BN folding ({precision}, channels-last)", auto, True, fold_batchnorm=False),
        Variant(f"default without accelerate ({precision}, NCHW, BN unfolded)", auto, False),
        Variant(f"default with the 2-D upsampling kernel ({precision}, accelerate)", auto, True, False),
    ]
    if auto:
        variants.append(Variant("default in fp32 (accelerate)", False, True))
    elif args.include_emulated_bf16:
        variants.append(Variant("bf16 forced (emulated here), accelerate", True, True))
    speeds = measure(variants, args.batch, args.rounds)
    base = speeds[variants[0].name]
    lines = [
        "# Training and inference speed, and memory",
        "",
        f"- command: `python -m benchmarks.bench_training {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- batch {args.batch}, 240 px training input (augmented to 224), 224 px inference, best of {args.rounds}",
        "",
        "| variant | train img/s | × reference | inference img/s | × eager fp32 | inference conv GMAC/s |",
        "|---|---|---|---|---|---|",
    ]
    macs = inference_macs_per_image()
    for variant in variants:
        s = speeds[variant.name]
        lines.append(
            f"| {variant.name} | {s['train']:.2f} | {s['train'] / base['train']:.2f} | {s['infer']:.2f} "
            f"| {s['infer'] / base['infer']:.2f} | {s['infer'] * macs / 1e9:.0f} |"
        )
    lines += ["", f"Convolutions of one 224 x 224 inference pass: {macs / 1e9:.2f} GMAC."]
    if not args.skip_memory and (args.mvtec_root / args.category).is_dir():
        workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "fcdd_bench_memory"
        lines += [
            "",
            f"Full-category training ({args.category}, one pass and one validation, 2 workers, through Engine; batch "
            "128 is the paper's, validation batch 32 there). A worker's RSS counts the pages it shares with the "
            "process it was forked from; the whole run's host memory is the peak of its processes' summed PSS (shared "
            f"pages counted once), sampled every {PSS_INTERVAL} s from outside:",
            "",
            "| batch | fit s | peak RSS main (GiB) | peak RSS largest worker (GiB) | peak PSS, all processes (GiB) |",
            "|---|---|---|---|---|",
        ]
        for batch in args.memory_batches:
            memory = full_category_memory(args.mvtec_root, args.category, workdir, batch)
            lines.append(
                f"| {batch} | {memory['fit_seconds']:.1f} | {memory['main_gib']:.2f} | {memory['worker_gib']:.2f} "
                f"| {memory['total_pss_gib']:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    if args.readme:
        from benchmarks.bench_inference import write_section

        body = text.split("\n", 1)[1]  # the file's own title becomes the README section heading
        write_section(f"{README_SECTION}\n{body}", section=README_SECTION)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
