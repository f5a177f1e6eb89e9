"""Inference latency, throughput and artefact size of FCDD against anomalib's PaDiM and PatchCore, in one run.

Every model is measured the same way: the whole deployed pipeline (pre-processing, network, post-processing with
normalisation and thresholds) on the same 224 x 224 RGB input images, at batch 1 and 16, in

* torch eager fp32 and torch bf16 autocast (``AnomalibModule.forward`` under ``inference_mode``);
* OpenVINO (CPU plugin) on the artefacts anomalib exports: FP32, FP16 (fp16 weights), INT8 (nncf weight compression)
  and INT8_PTQ (nncf post-training quantisation calibrated on training images). The FP32 IR is run with
  ``INFERENCE_PRECISION_HINT=f32`` and, where the CPU default differs (bf16 on AMX/avx512_bf16 CPUs), at the default.

Models (``--models``): FCDD (``FcddHsc``) on the paper's VGG-11-BN, on EfficientNet-Lite0 and on the default
multi-scale EfficientNet-Lite0, and PaDiM and PatchCore built by ``anomalib_fcdd.baselines`` (EfficientNet-Lite0 with
offline ImageNet weights), all with a 224 x 224 network input. FCDD's weights do not change its speed, so it is
fitted for one pass on 8 images (enough for thresholds); PaDiM and PatchCore are fitted on ``--train-images`` training
images, because PatchCore's memory bank -- and so its speed and size -- grows with them and with ``--coreset-ratio``
(the offline accuracy benchmark's PatchCore: the full training set, 209 images on bottle, at 0.01). Results go to
``benchmarks/README.md`` (section "Inference"; ``--json`` also writes the raw numbers).

Every row is timed in ``--rounds`` rounds that visit the rows in alternating order (forward, then backward), so that
a machine that speeds up or slows down during the run touches every row alike; a row's figure is its median over the
rounds, with the range beside it. Ratios between rows (the goal table) are taken within each round, then summarised.

    .venv/bin/python benchmarks/bench_inference.py [--models ...] [--seconds 3] [--rounds 5] [--train-images 209]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python benchmarks/...py): make the benchmarks package importable
    sys.path.insert(0, str(REPO))
README = REPO / "benchmarks" / "README.md"
SECTION = "## Inference"
OV_VARIANTS = ("openvino_fp32", "openvino_fp16", "openvino_int8", "openvino_int8_ptq")
DEFAULT_MODELS = (
    "fcdd_vgg11_bn",
    "fcdd_efficientnet_lite0",
    "fcdd_efficientnet_lite0_multiscale",
    "padim",
    "patchcore",
)
#: Models whose anomalib export has a fixed batch dimension (see :func:`export_openvino`).
STATIC_BATCH_MODELS = {"patchcore", "patchcore_wrn50"}
ARGS = argparse.Namespace(
    seconds=2.0,
    rounds=3,
    coreset_ratio=0.1,
    batch_sizes=[1, 16],
    input_size=224,
    category="bottle",
    ov_default_precision="f32",
)
#: The package's default model and the throughput goal it is held to against PatchCore (issue 16).
DEFAULT_FCDD = "fcdd_efficientnet_lite0_multiscale"
THROUGHPUT_GOAL = 2.0

logger = logging.getLogger("bench_inference")


@dataclass
class Row:
    """One measured (model, runtime) pair."""

    model: str
    runtime: str
    artefact: str
    size_mb: float | None
    throughput: dict[int, float]  # batch size -> images/s, median over the rounds
    latency_ms: float | None  # median batch-1 latency
    rounds: dict[int, list[float]] = field(default_factory=dict)  # batch size -> images/s of each round, in order


@dataclass
class Candidate:
    """A (model, runtime) pair ready to time: one callable per batch size."""

    model: str
    runtime: str
    artefact: str
    size_mb: float | None
    runners: dict[int, Callable[[np.ndarray], Any]]


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def _resized_copy(source: Path, target: Path, size: int, nearest: bool = False) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
        image.resize((size, size), method).save(target)


def prepare_data(source: Path | None, root: Path, category: str, n_train: int, size: int = 256) -> Path:
    """A downsized MVTec-layout copy: ``n_train`` training images and a small test set (for thresholds).

    Downsizing only saves image decoding time during fitting; every graph resizes its input itself.
    """
    from anomalib_fcdd.data import make_synthetic_mvtec

    if source is None:
        make_synthetic_mvtec(root, category, n_train=n_train, n_test_good=4, n_test_defect=4, size=size, seed=0)
        return root / category
    target = root / category
    for path in sorted((source / "train" / "good").glob("*.png"))[:n_train]:
        _resized_copy(path, target / "train" / "good" / path.name, size)
    for folder in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.png"))[: 4 if folder.name == "good" else 2]:
            _resized_copy(path, target / "test" / folder.name / path.name, size)
            mask = source / "ground_truth" / folder.name / f"{path.stem}_mask.png"
            if mask.is_file():
                _resized_copy(mask, target / "ground_truth" / folder.name / mask.name, size, nearest=True)
    return target


def input_batch(source: Path | None, size: int, count: int = 16) -> np.ndarray:
    """``count x 3 x size x size`` float32 RGB in [0, 1]: test images of the category, or seeded noise without it."""
    if source is None:
        return np.random.default_rng(0).random((count, 3, size, size), dtype=np.float32)
    files = sorted((source / "test").rglob("*.png"))
    picked = [files[i * len(files) // count] for i in range(count)]
    images = []
    for path in picked:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        images.append(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(images)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
def build_model(name: str, input_size: int) -> Any:
    """The benchmarked model, untrained."""
    from anomalib_fcdd import FcddHsc
    from anomalib_fcdd.baselines import build_baseline

    if name == "fcdd_vgg11_bn":
        return FcddHsc(backbone="vgg11_bn", pre_trained=False, image_size=input_size, epochs=1, passes_per_epoch=1)
    if name in {"fcdd_efficientnet_lite0", "fcdd_efficientnet_lite0_multiscale"}:
        backbone = name.removeprefix("fcdd_")
        return FcddHsc(backbone=backbone, image_size=input_size, epochs=1, passes_per_epoch=1)
    if name == "fcdd_efficientnet_lite0_multiscale_1head":  # the ablation of the default's four heads
        return FcddHsc(
            backbone="efficientnet_lite0_multiscale", heads=1, image_size=input_size, epochs=1, passes_per_epoch=1
        )
    if name == "fcdd_efficientnet_lite0_multiscale_max":  # the default before its memory image score (the heads' peak)
        return FcddHsc(
            backbone="efficientnet_lite0_multiscale",
            image_score="max",
            image_size=input_size,
            epochs=1,
            passes_per_epoch=1,
        )
    if name == "padim":
        return build_baseline(name, image_size=input_size)
    if name == "patchcore":
        return build_baseline(name, image_size=input_size, coreset_sampling_ratio=ARGS.coreset_ratio)
    if name == "patchcore_wrn50":  # anomalib's default backbone; random weights (timing only, no offline weights)
        from anomalib.models import Patchcore

        return Patchcore(pre_trained=False, pre_processor=Patchcore.configure_pre_processor((input_size, input_size)))
    raise ValueError(f"Unknown model {name!r}.")


def fit(model: Any, data_root: Path, category: str, work: Path) -> Any:
    """Fit with anomalib's Engine (thresholds and, for the baselines, their statistics/memory bank)."""
    from anomalib.engine import Engine

    from anomalib_fcdd.data import MVTec

    datamodule = MVTec(root=data_root, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = Engine(
        default_root_dir=work,
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=datamodule)
    return datamodule


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------
def measure(run: Callable[[np.ndarray], Any], batch: np.ndarray, seconds: float) -> tuple[float, float]:
    """``(images/s, median ms per call)`` of ``run(batch)``: one warm-up call, then calls for at least ``seconds``.

    A call slower than ``seconds`` (emulated bf16 on CPUs without it) is timed once, to keep the run short.
    """
    run(batch)
    timings: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or not timings:
        tick = time.perf_counter()
        run(batch)
        timings.append(time.perf_counter() - tick)
    return len(batch) * len(timings) / sum(timings), 1000 * float(np.median(timings))


def torch_runner(model: Any, bf16: bool) -> Callable[[np.ndarray], Any]:
    """Eager ``AnomalibModule.forward`` (pre-processor, network, post-processor), optionally under bf16 autocast."""
    model = model.eval().cpu()

    def run(batch: np.ndarray) -> Any:
        images = torch.from_numpy(batch)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), context:
            return model(images)

    return run


def measure_rows(candidates: list[Candidate], batch: np.ndarray, rounds: int) -> list[Row]:
    """Time every candidate at every batch size in ``rounds`` rounds, visiting the candidates forward in even rounds and
    backward in odd ones (so drift in the machine's speed hits early and late rows alike); median over the rounds."""
    rates: list[dict[int, list[float]]] = [{size: [] for size in c.runners} for c in candidates]
    latencies: list[list[float]] = [[] for _ in candidates]
    for index in range(rounds):
        order = range(len(candidates)) if index % 2 == 0 else reversed(range(len(candidates)))
        for position in order:
            candidate = candidates[position]
            for batch_size, run in candidate.runners.items():
                images, ms = measure(run, batch[:batch_size], ARGS.seconds)
                rates[position][batch_size].append(images)
                if batch_size == 1:
                    latencies[position].append(ms)
        logger.info("round %d of %d timed", index + 1, rounds)
    rows = []
    for candidate, rate, latency in zip(candidates, rates, latencies, strict=True):
        median = {size: float(np.median(values)) for size, values in rate.items()}
        logger.info("%-24s %-26s %s", candidate.model, candidate.runtime, {b: round(v, 1) for b, v in median.items()})
        rows.append(
            Row(
                candidate.model,
                candidate.runtime,
                candidate.artefact,
                candidate.size_mb,
                median,
                float(np.median(latency)) if latency else None,
                rate,
            )
        )
    return rows


def export_openvino(model: Any, name: str, variant: str, root: Path, datamodule: Any) -> dict[int, Any]:
    """The variant's artefact for every batch size (one shared dynamic-shape artefact, or one static per size).

    anomalib 2.7's PatchCore export fixes the batch dimension (torch.export specialises it to the example batch of 2),
    so for such models a fully static graph is exported per batch size at the benchmark's input size.
    """
    from anomalib_fcdd.deploy import export_variant

    if name not in STATIC_BATCH_MODELS:
        artefact = export_variant(model, variant, root, datamodule=datamodule, calibration_images=64)
        return dict.fromkeys(ARGS.batch_sizes, artefact)
    return {
        size: export_variant(
            model,
            variant,
            root / f"batch{size}",
            input_size=(ARGS.input_size, ARGS.input_size),
            datamodule=datamodule,
            calibration_images=64,
            onnx_kwargs={"dynamic_shapes": ({0: size},)},
        )
        for size in ARGS.batch_sizes
    }


def prepare_model(name: str, data: dict[str, Path], work: Path) -> list[Candidate]:
    """Fit and export one model; a candidate for every runtime (timed later, interleaved with the other models')."""
    from anomalib_fcdd.deploy import export_variant
    from anomalib_fcdd.deploy.runtime import OpenVINOModel

    torch.manual_seed(0)
    model = build_model(name, ARGS.input_size)
    started = time.perf_counter()
    datamodule = fit(model, data["fcdd" if name.startswith("fcdd") else "full"], ARGS.category, work / name / "fit")
    logger.info("%s fitted in %.0f s", name, time.perf_counter() - started)
    export_root = work / name / "export"
    pickled = export_variant(model, "torch", export_root)
    candidates = [
        Candidate(name, f"torch {kind}", "torch", pickled.size_mb, dict.fromkeys(ARGS.batch_sizes, run))
        for kind, run in (("fp32", torch_runner(model, False)), ("bf16 autocast", torch_runner(model, True)))
    ]
    for variant in OV_VARIANTS:
        artefacts = export_openvino(model, name, variant, export_root, datamodule)
        precisions = ["default"]
        if variant == "openvino_fp32":
            precisions = ["f32", "default"] if ARGS.ov_default_precision != "f32" else ["f32"]
        size_mb = max(a.size_mb for a in artefacts.values())
        for precision in precisions:
            # Each batch size gets the graph compiled for it (deploy.runtime.with_fixed_batch), as predict-openvino does
            # for its single images; anomalib's PatchCore graphs are static already.
            runners = {size: OpenVINOModel(a.path, precision, batch_size=size) for size, a in artefacts.items()}
            executed = next(iter(runners.values())).execution_precision
            label = f"OpenVINO {variant.removeprefix('openvino_').upper()} ({executed})"
            candidates.append(Candidate(name, label, variant, size_mb, runners))
        if variant == "openvino_fp16" and name not in STATIC_BATCH_MODELS:  # the same graph with its batch left open
            runners = {size: OpenVINOModel(a.path, "default") for size, a in artefacts.items()}
            label = f"OpenVINO FP16 ({runners[ARGS.batch_sizes[0]].execution_precision}), dynamic batch"
            candidates.append(Candidate(name, label, variant, size_mb, runners))
    return candidates


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def targets(rows: list[Row], batch_sizes: list[int]) -> list[str]:
    """The issue's targets: FCDD OpenVINO INT8 >= 3x PatchCore OpenVINO FP32 throughput, >= 10x smaller artefact."""
    reference = [r for r in rows if r.model.startswith("patchcore") and r.runtime.startswith("OpenVINO FP32")]
    lines = []
    for ref in reference:
        for model in sorted({r.model for r in rows if r.model.startswith("fcdd")}):
            for prefix in ("OpenVINO INT8 (", "OpenVINO INT8_PTQ"):
                for batch_size in batch_sizes:
                    row = next((r for r in rows if r.model == model and r.runtime.startswith(prefix)), None)
                    if row is None:
                        continue
                    speed = row.throughput[batch_size] / ref.throughput[batch_size]
                    size = (ref.size_mb or 0) / (row.size_mb or 1)
                    verdict = "met" if speed >= 3 and size >= 10 else "NOT met"
                    lines.append(
                        f"- {model} {row.runtime} vs {ref.model} {ref.runtime}, batch {batch_size}: "
                        f"{speed:.2f}x throughput (target 3x), {size:.1f}x smaller (target 10x): **{verdict}**"
                    )
    return lines


def _round_ratio(row: Row, reference: Row, batch_size: int) -> str:
    """``median (min-max)`` of ``row``'s throughput over ``reference``'s, taken within each round (both rows timed in
    the same pass over the machine), with the verdict against :data:`THROUGHPUT_GOAL`."""
    ratios = [a / b for a, b in zip(row.rounds[batch_size], reference.rounds[batch_size], strict=True)]
    median = float(np.median(ratios))
    verdict = "met" if median >= THROUGHPUT_GOAL else "NOT met"
    return f"{median:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) {verdict}"


def throughput_goal(rows: list[Row], batch_sizes: list[int], model: str = DEFAULT_FCDD) -> list[str]:
    """Issue 16's goal, a table: each OpenVINO artefact of the default FCDD against PatchCore's artefact of the same
    kind (same export variant, same executed precision) and against PatchCore's fastest OpenVINO artefact at that
    batch size, the stricter reading. Goal: at least :data:`THROUGHPUT_GOAL` times the throughput."""
    patchcore = {r.runtime: r for r in rows if r.model == "patchcore" and r.runtime.startswith("OpenVINO")}
    fcdd = [r for r in rows if r.model == model and r.runtime.startswith("OpenVINO") and "dynamic" not in r.runtime]
    if not patchcore or not fcdd:
        return []
    lines = [
        f"| {model} | size (MB) | batch | / PatchCore's same artefact | / PatchCore's fastest |",
        "|---|---|---|---|---|",
    ]
    for batch_size in batch_sizes:
        fastest = max(patchcore.values(), key=lambda r: r.throughput[batch_size])
        for row in fcdd:
            same = patchcore.get(row.runtime)
            cells = [
                row.runtime,
                f"{row.size_mb:.2f}" if row.size_mb is not None else "-",
                str(batch_size),
                _round_ratio(row, same, batch_size) if same is not None else "-",
                f"{_round_ratio(row, fastest, batch_size)} ({fastest.runtime.removeprefix('OpenVINO ')})",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _rate(images_per_second: float) -> str:
    """One decimal, or two significant digits below 1 img/s (so a very slow row does not read as 0.0)."""
    return f"{images_per_second:.1f}" if images_per_second >= 1 else f"{images_per_second:.2g}"


def _cell(row: Row, batch_size: int) -> str:
    """The median rate, with the range over the rounds where there were several."""
    values = row.rounds.get(batch_size, [])
    if len(values) < 2:
        return _rate(row.throughput[batch_size])
    return f"{_rate(row.throughput[batch_size])} ({_rate(min(values))}-{_rate(max(values))})"


def markdown(rows: list[Row], args: Any, info: Any, versions: dict[str, str], command: str, notes: list[str]) -> str:
    """The README section."""
    batch_sizes = args.batch_sizes
    header = "| model | runtime | artefact | size (MB) | " + " | ".join(f"img/s @{b}" for b in batch_sizes)
    header += " | latency @1 (ms) |"
    lines = [
        SECTION,
        "",
        f"Command: `{command}`  ",
        f"Date: {info.date}  ",
        f"Machine: {info.describe()}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        f"Whole deployed pipeline (resize, normalisation, network, anomaly map, score normalisation, thresholds) on "
        f"{args.input_size}x{args.input_size} RGB inputs (MVTec-AD {args.category} test images, resized), network "
        f"input {args.input_size}x{args.input_size} for every model. Each figure: images / wall time over at least "
        f"{args.seconds:g} s after one warm-up call (a call slower than that is timed once), median (range) over "
        f"{args.rounds} round(s) that visit the rows in alternating order; synchronous calls, all "
        f"cores (torch: {torch.get_num_threads()} threads). Size = files of the artefact on disk (torch: the pickled "
        "module). OpenVINO rows name the precision the CPU plugin executed in. anomalib's PatchCore export fixes the "
        "batch dimension, so PatchCore gets one static-shape artefact per batch size.",
        "",
        header,
        "|" + "---|" * (5 + len(batch_sizes)),
    ]
    for row in rows:
        cells = [row.model, row.runtime, row.artefact, f"{row.size_mb:.2f}" if row.size_mb is not None else "-"]
        cells += [_cell(row, b) for b in batch_sizes]
        cells.append(f"{row.latency_ms:.1f}" if row.latency_ms is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets (issue 6):", "", *(targets(rows, batch_sizes) or ["- no PatchCore/FCDD pair measured"])]
    goal = throughput_goal(rows, batch_sizes) or [f"- {DEFAULT_FCDD} or patchcore not measured"]
    lines += [
        "",
        f"Throughput goal (issue 16: at least {THROUGHPUT_GOAL:g}x PatchCore's; ratios taken within each round, "
        "median (range)):",
        "",
        *goal,
    ]
    if notes:
        lines += ["", "Notes:", "", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = README, section: str = SECTION) -> None:
    """Replace the ``section`` heading's part of ``path`` (up to the next ``## `` heading), or append it."""
    current = path.read_text() if path.is_file() else "# Benchmarks\n"
    lines = current.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == section), None)
    if start is None:
        path.write_text(current.rstrip("\n") + "\n\n" + text)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + text + ("\n" + rest if rest else ""))


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.jobs import resolve_mvtec_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), help=f"default: {' '.join(DEFAULT_MODELS)}"
    )
    parser.add_argument("--mvtec-root", type=Path, default=resolve_mvtec_root(None))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per measurement")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over all rows, in alternating order (median and range reported)"
    )
    parser.add_argument("--train-images", type=int, default=16, help="training images for PaDiM/PatchCore")
    parser.add_argument(
        "--coreset-ratio",
        type=float,
        default=0.1,
        help="PatchCore's coreset sampling ratio (the offline accuracy benchmark fits the full training set at 0.01)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers as JSON here")
    parser.add_argument("--note", action="append", default=[], help="extra note for the README section")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep exports here (default: a temp folder)")
    parser.add_argument("--no-readme", action="store_true", help="print the section instead of writing README.md")
    return parser.parse_args(argv)


@contextlib.contextmanager
def work_folder(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    folder = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def default_ov_precision() -> str:
    """The precision OpenVINO's CPU plugin runs in when not told (``f32``, or ``bf16`` on AMX/avx512_bf16 CPUs)."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def precision_notes() -> list[str]:
    """What this CPU does by default: OpenVINO's inference precision and whether torch's bf16 is native."""
    from anomalib_fcdd.models.fcdd.acceleration import cpu_has_native_bf16

    default = ARGS.ov_default_precision
    native = cpu_has_native_bf16()
    return [
        f"OpenVINO CPU default inference precision on this machine: {default}"
        + (" (so the FP32 IR is also shown at that default)." if default != "f32" else "; no separate default row."),
        "torch bf16 autocast: " + ("native bf16 on this CPU." if native else "no native bf16 on this CPU (emulated)."),
    ]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the README section (and the raw numbers with ``--json``)."""
    args = parse_args(argv)
    ARGS.__dict__.update(vars(args))
    ARGS.ov_default_precision = default_ov_precision()
    os.environ.setdefault("TQDM_DISABLE", "1")  # PatchCore's coreset selection reports every step
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("anomalib", "lightning", "lightning.pytorch", "torch", "nncf", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from anomalib_fcdd.deploy.runtime import machine, versions

    arguments = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/bench_inference.py", *arguments])
    source = args.mvtec_root / args.category
    source = source if (source / "train").is_dir() else None
    notes = [] if source else [f"MVTec-AD {args.category} not found under {args.mvtec_root}: generated images used."]
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with work_folder(args.work_dir) as work:
        data = {
            "fcdd": prepare_data(source, work / "data_fcdd", args.category, 8).parent,
            "full": prepare_data(source, work / "data_full", args.category, args.train_images).parent,
        }
        batch = input_batch(source, args.input_size, max(args.batch_sizes))
        candidates = [candidate for name in args.models for candidate in prepare_model(name, data, work)]
        rows = measure_rows(candidates, batch, args.rounds)
    notes += precision_notes()
    notes.append(
        "PaDiM and PatchCore use EfficientNet-Lite0 features (anomalib_fcdd.baselines, offline ImageNet weights), "
        f"fitted on {args.train_images} training images (PatchCore coreset ratio {args.coreset_ratio:g}, so a memory "
        f"bank of about {int(args.train_images * (args.input_size // 8) ** 2 * args.coreset_ratio)} patches; "
        "PatchCore's speed falls as its memory bank grows). FCDD is fitted for one pass on 8 images: its memory has a "
        "fixed size, so its speed and size do not depend on training."
    )
    notes.append(
        f"Whole run: {time.perf_counter() - started:.0f} s; 1-minute load average {load_before:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} logical CPUs (other work on the machine slows "
        "every figure alike; compare rows of one run)."
    )
    notes += args.note
    info, found = machine(), versions()
    text = markdown(rows, args, info, found, command, notes)
    if args.json is not None:
        payload = {"command": command, "machine": asdict(info), "versions": found, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if not args.no_readme:
        write_section(text)
    print(text)


if __name__ == "__main__":
    main()
