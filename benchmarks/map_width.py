"""How wide the output map's Gaussian should be: one training, its map scored with several sigmas.

Trains ``FcddHsc()`` with every default on one MVTec-layout category (seed 0), then upsamples the *same* fused
low-resolution map of every test image (heads plus memory, :mod:`anomalib_fcdd.models.fcdd.map_fusion`) as a weighted
mean of Gaussians of each ``--stds`` sigma (``ReceptiveFieldUpsampler(normalized=True)``, what ``map_gauss_std``
chooses) and reports pixel AUROC, pixel AP and AUPRO (FPR limit 0.3) over all pixels of the 224 x 224 maps against the
masks resized alike. Only the output map changes with the sigma: training and the memory's image score keep
``gauss_std``.

    python -m benchmarks.map_width --mvtec-root ../shared/data/mvtec_ad --category bottle --stds 4,6,8,10,12

Appends a section to ``benchmarks/results/map_width.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "map_width.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.jobs import resolve_mvtec_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mvtec-root", type=Path, default=resolve_mvtec_root(None), help="MVTec-layout root")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--stds", default="4,6,8,10,12", help="comma-separated sigmas of the output map's Gaussian")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fcdd_map_width"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.stds = [float(value) for value in args.stds.split(",")]
    if any(std <= 0 for std in args.stds):
        parser.error(f"--stds must all be above 0, got {args.stds}")
    # What benchmarks.export_accuracy.train reads: the default model and budget.
    args.backbone, args.pre_trained, args.epochs, args.passes_per_epoch = (
        "efficientnet_lite0_multiscale",
        True,
        None,
        None,
    )
    return args


@torch.inference_mode()
def fused_maps_and_masks(model: Any, dataset: Any, batch_size: int) -> tuple[torch.Tensor, np.ndarray, tuple]:
    """The fused low-resolution maps (N x 1 x h x w), the masks at the input size (N x H x W bool) and that size.

    The test images are decoded straight to the model's input size (the pre-processor's transform), as the package
    prepares them, so images of different sizes are resized once.
    """
    from benchmarks.gap_diagnosis import batches

    net = model.model
    dataset.augmentations = model.pre_processor.transform
    maps, masks = [], []
    for batch in batches(dataset, batch_size):
        images = model.pre_processor(batch.image)
        features = net.backbone_features(images)
        maps.append(net.map_fusion(net.map_of_features(features), net.memory.distance_map(features)).float())
        size = images.shape[-2:]
        masks.append((torch.as_tensor(batch.gt_mask).float().view(len(images), *size) > 0.5).numpy())
    return torch.cat(maps), np.concatenate(masks), tuple(size)


def pixel_metrics(scores: np.ndarray, masks: np.ndarray) -> tuple[float, float, float]:
    """Pixel AUROC, pixel AP and AUPRO (anomalib's, FPR limit 0.3) of ``scores`` against ``masks`` (N x H x W)."""
    from anomalib.metrics.aupro import _AUPRO
    from sklearn.metrics import average_precision_score, roc_auc_score

    aupro = _AUPRO(fpr_limit=0.3)
    aupro.update(torch.from_numpy(scores), torch.from_numpy(masks).int())
    flat_masks, flat_scores = masks.ravel(), scores.ravel()
    return (
        float(roc_auc_score(flat_masks, flat_scores)),
        float(average_precision_score(flat_masks, flat_scores)),
        float(aupro.compute()),
    )


def main(argv: list[str] | None = None) -> int:
    """Train, score every sigma, append the section to ``--output``; 2 when the category is missing."""
    args = parse_args(argv)
    from benchmarks.jobs import report_missing_category

    if report_missing_category(args.mvtec_root, args.category):
        return 2
    from anomalib_fcdd.models.fcdd.anomaly_map import ReceptiveFieldUpsampler
    from benchmarks.bench_training import append_section, machine
    from benchmarks.export_accuracy import train

    model, datamodule, seconds = train(args, args.work_dir)
    model.cpu().eval()
    if model.model.map_fusion is None:
        print("The model has no fused map (fused_map=False); this script scores the default's.", file=sys.stderr)
        return 2
    low_res, masks, size = fused_maps_and_masks(model, datamodule.test_data, args.batch_size)
    field = model.model.upsampler.receptive_field
    rows = []
    for std in args.stds:
        upsampler = ReceptiveFieldUpsampler(field, std, normalized=True)
        with torch.inference_mode():
            scores = torch.cat([upsampler(chunk, size) for chunk in low_res.split(args.batch_size)])[:, 0].numpy()
        auroc, ap, aupro = pixel_metrics(scores, masks)
        rows.append(f"| {std:g} | {auroc:.4f} | {ap:.4f} | {aupro:.4f} |")
        print(rows[-1], flush=True)
    command = "python -m benchmarks.map_width " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join(
        [
            f"## {args.category}",
            "",
            f"`{command.strip()}`, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {machine()}. `FcddHsc()` trained in "
            f"{seconds:.0f} s on {len(datamodule.train_data)} images, seed {args.seed}; {len(masks)} test images. "
            "The same fused low-resolution maps upsampled as a weighted mean of Gaussians of each sigma.",
            "",
            "| sigma (px) | pixel AUROC | pixel AP | AUPRO |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    append_section(args.output, "The output map's Gaussian width", section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
