"""One exported FCDD graph compiled with its batch open and with it fixed: throughput side by side, and where the time
goes (OpenVINO's per-layer counters, summed by op type).

FCDD's graphs are exported with batch, height and width open. ``deploy.runtime.with_fixed_batch`` fixes the batch
before compiling (``predict-openvino`` does, for batch 1); this script measures what that buys on the machine it runs
on. The compiled variants are timed in alternating rounds so that machine noise hits them alike; the median and range
over the rounds are reported. Timing needs no training, so the default model is exported with its ImageNet backbone and
untrained heads.

    python -m benchmarks.bench_openvino_batch [--variant openvino_fp16] [--rounds 5] [--seconds 1]
        [--output benchmarks/results/openvino_batch.md]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

OPEN = "batch, height, width open (as exported)"
FIXED_SIZE = "batch open, 224 x 224 fixed"
FIXED_BATCH = "batch fixed, height and width open (with_fixed_batch)"
#: How the exported graph is compiled, in the report's order.
VARIANTS = (OPEN, FIXED_SIZE, FIXED_BATCH)


def compile_variant(xml: Path, variant: str, batch: int, **config: str) -> Any:
    """An infer request for ``variant`` of the graph at ``xml``: as exported, with its height and width fixed to 224,
    or with its batch fixed to ``batch`` by the package's own ``with_fixed_batch``."""
    import openvino as ov

    from anomalib_fcdd.deploy.runtime import with_fixed_batch

    core = ov.Core()
    model = core.read_model(str(xml))
    if variant == FIXED_BATCH:
        with_fixed_batch(model, batch)
    elif variant == FIXED_SIZE:
        model.reshape({model.input(0): [-1, 3, 224, 224]})
    return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config}).create_infer_request()


def compile_variants(xml: Path, batch: int) -> dict[str, Any]:
    """One infer request per entry of :data:`VARIANTS`."""
    return {variant: compile_variant(xml, variant, batch) for variant in VARIANTS}


def throughput(request: Any, images: np.ndarray, seconds: float) -> float:
    """Images per second of ``request`` over at least ``seconds`` (``bench_inference.measure``)."""
    from benchmarks.bench_inference import measure

    return measure(lambda batch: request.infer({0: batch}), images, seconds)[0]


def profile(xml: Path, images: np.ndarray, variant: str, calls: int = 100) -> dict[str, float]:
    """Mean microseconds per call by ``op type / kernel``, from OpenVINO's per-layer counters."""
    request = compile_variant(xml, variant, len(images), PERF_COUNT="YES")
    for _ in range(10):
        request.infer({0: images})
    totals: collections.Counter[str] = collections.Counter()
    for _ in range(calls):
        request.infer({0: images})
        for layer in request.profiling_info:
            totals[f"{layer.node_type} / {layer.exec_type}"] += layer.real_time.total_seconds() * 1e6 / calls
    return dict(totals)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="openvino_fp16", help="export variant (deploy.export.VARIANTS)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per variant and round")
    parser.add_argument("--output", type=Path, default=None, help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)

    from anomalib_fcdd import FcddHsc
    from anomalib_fcdd.deploy import export_variant
    from anomalib_fcdd.deploy.runtime import machine, versions
    from benchmarks.bench_training import stand_in_memory

    rng = np.random.default_rng(0)
    lines = [
        "# One FCDD graph, batch open or fixed",
        "",
        f"Command: `python -m benchmarks.bench_openvino_batch {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
        f"Date: {machine().date}  ",
        f"Machine: {machine().describe()}; " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        f"`FcddHsc()` exported as `{args.variant}` (ImageNet backbone, untrained heads, a random stand-in memory: "
        "timing only), OpenVINO CPU "
        f"plugin at its default precision, synchronous calls. Images per second, median (range) of {args.rounds} "
        f"alternating rounds of {args.seconds:g} s each.",
        "",
        "| compiled as | " + " | ".join(f"batch {size}" for size in args.batch_sizes) + " |",
        "|---|" + "---|" * len(args.batch_sizes),
    ]
    with tempfile.TemporaryDirectory(prefix="bench_openvino_batch_") as scratch:
        xml = export_variant(stand_in_memory(FcddHsc()).eval(), args.variant, Path(scratch)).path
        rates: dict[str, dict[int, list[float]]] = {variant: {} for variant in VARIANTS}
        for size in args.batch_sizes:
            images = rng.random((size, 3, 224, 224), dtype=np.float32)
            requests = compile_variants(xml, size)
            for request in requests.values():
                request.infer({0: images})
            for round_index in range(args.rounds):
                order = list(requests.items())
                for name, request in order if round_index % 2 == 0 else reversed(order):
                    rates[name].setdefault(size, []).append(throughput(request, images, args.seconds))
        for name, by_size in rates.items():
            cells = [f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" for v in by_size.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        images = rng.random((1, 3, 224, 224), dtype=np.float32)
        lines += ["", "Where the time goes at batch 1 (per-layer counters, microseconds per call, largest first):", ""]
        lines += ["| op type / kernel | batch open | batch fixed |", "|---|---|---|"]
        open_profile = profile(xml, images, OPEN)
        fixed_profile = profile(xml, images, FIXED_BATCH)
        for key in sorted(open_profile, key=open_profile.get, reverse=True)[:10]:
            lines.append(f"| {key} | {open_profile[key]:.0f} | {fixed_profile.get(key, 0.0):.0f} |")
        lines.append(f"| sum of all layers | {sum(open_profile.values()):.0f} | {sum(fixed_profile.values()):.0f} |")
    text = "\n".join(lines) + "\n"
    if args.output is None:
        print(text)
    else:
        args.output.write_text(text)
        print(f"written to {args.output}")


if __name__ == "__main__":
    main()
