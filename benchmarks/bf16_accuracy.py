"""Does bf16 cost accuracy? The same FCDD training run twice, in fp32 and in bf16 autocast, same seed and budget.

Each run trains ``FcddHsc`` on an MVTec-AD category through anomalib's Engine (``precision="32-true"`` and
``precision="bf16-mixed"``; everything else identical, including the seed, so confetti, augmentation and batch order
are the same draws) and tests it with anomalib's evaluator (pixel AUROC / AP / AUPRO, image AUROC). Confetti
synthesis, augmentation, the upsampler and the loss run in fp32 in both, so the two runs see identical training images
and the difference measured is that of the network's bf16 convolutions and of their gradients.

    .venv/bin/python -m benchmarks.bf16_accuracy [--backbone efficientnet_lite0] [--epochs 3] [--passes-per-epoch 5]

Appends a section to ``benchmarks/results/bf16_accuracy.md`` (one per backbone and budget).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from benchmarks.jobs import resolve_mvtec_root

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bf16_accuracy.md"
PRECISIONS = ("32-true", "bf16-mixed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mvtec-root", type=Path, default=resolve_mvtec_root(None), help="default: $FCDD_MVTEC_ROOT, datasets/MVTecAD"
    )
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--pre-trained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--epochs", type=int, default=3, help="paper epochs")
    parser.add_argument("--passes-per-epoch", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def train_and_test(args: argparse.Namespace, precision: str, work: Path) -> dict[str, Any]:
    """One fit + test at ``precision`` (:func:`benchmarks.measuring.fit_and_test`); the metrics and the fit time."""
    from benchmarks.building import raw_score_post_processor
    from benchmarks.export_accuracy import seeded_model_and_data
    from benchmarks.measuring import fit_and_test

    model, datamodule = seeded_model_and_data(
        args, precision=precision, visualizer=False, evaluator=False, post_processor=raw_score_post_processor()
    )
    result = fit_and_test(model, datamodule, work / precision, args.epochs * args.passes_per_epoch, accelerator="cpu")
    return {"fit_seconds": result.train_time_s, **result.metrics}


def main(argv: list[str] | None = None) -> int:
    """Run both precisions and append the comparison to the results file."""
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    if not (args.mvtec_root / args.category / "train" / "good").is_dir():
        print(f"error: no MVTec-AD category at {args.mvtec_root / args.category}; pass --mvtec-root.", file=sys.stderr)
        return 2
    from benchmarks.bench_training import append_section, machine

    with tempfile.TemporaryDirectory(prefix="fcdd_bf16_") as scratch:
        runs = {precision: train_and_test(args, precision, Path(scratch)) for precision in PRECISIONS}
    fp32, bf16 = runs["32-true"], runs["bf16-mixed"]
    drop = 100 * (fp32["pixel_auroc"] - bf16["pixel_auroc"])
    command = " ".join(["python -m benchmarks.bf16_accuracy", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"## {args.category}, {args.backbone} ({'ImageNet' if args.pre_trained else 'random init'}), "
        f"{args.epochs} epochs x {args.passes_per_epoch} passes, batch {args.batch_size}, seed {args.seed}",
        "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        "",
        "| precision | fit (s) | pixel AUROC | pixel AP | pixel AUPRO | image AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for precision, run in runs.items():
        lines.append(
            f"| {precision} | {run['fit_seconds']:.0f} | {run['pixel_auroc']:.4f} | {run['pixel_ap']:.4f} "
            f"| {run['pixel_aupro']:.4f} | {run['image_auroc']:.4f} |"
        )
    verdict = "within" if drop <= 0.5 else "NOT within"
    lines += [
        "",
        f"bf16 vs fp32 pixel AUROC: {-drop:+.2f} points ({verdict} the 0.5-point budget); "
        f"fit time x{fp32['fit_seconds'] / bf16['fit_seconds']:.2f} faster in bf16.",
        "",
    ]
    text = "\n".join(lines)
    append_section(args.output, "bf16 vs fp32 training accuracy", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
