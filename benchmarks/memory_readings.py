"""How the image-score memory should read the features: several readings, several pool draws, no training.

``image_score="memory"`` (``models/fcdd/memory_bank.py``) scores images by their distance to a coreset of normal
feature vectors from the *frozen* backbone, so its image AUROC does not depend on the heads' training at all, only on
which vectors the seeded pool draw offers the greedy selection. On the small test sets of the demo textures (32
images, 240 good/defective pairs) one draw moves image AUROC by a few points, so this script scores every memory
reading (``SIZExDIM[xK][:all][:nopad]``, as ``benchmarks.gap_diagnosis --pca-memories``: K x K averaging, ``:all``
every channel instead of the backbone's ``memory_channels``, ``:nopad`` means without zeros past the border) with
several pool seeds and reports each draw, the mean and the spread. One pass over the training images fills every
pool; one pass over the test images scores every memory.

    python -m benchmarks.memory_readings --mvtec-root ../shared/data --category magnetic_tile \
        --readings 2000x96:all,2000x96x3 --pool-seeds 0,1,2

Appends a section to ``benchmarks/results/memory_readings.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(REPO))

from anomalib_fcdd.models.fcdd.memory_bank import POOL_SIZE, PositionPool  # noqa: E402
from benchmarks.gap_diagnosis import (  # noqa: E402
    MemorySpec,
    batches,
    fill_pools,
    fitted_memory,
    parse_pca_memories,
    reading,
)

RESULTS = REPO / "benchmarks" / "results" / "memory_readings.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.jobs import resolve_mvtec_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mvtec-root", type=Path, default=resolve_mvtec_root(None), help="MVTec-layout root")
    parser.add_argument("--category", default="bottle")
    parser.add_argument(
        "--readings", default="2000x96:all,2000x96x3", help="SIZExDIM[xK][:all][:nopad] items, comma-separated"
    )
    parser.add_argument("--pool-seeds", default="0,1,2", help="comma-separated seeds of the pool draw")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        args.readings = parse_pca_memories(args.readings)
        args.pool_seeds = [int(seed) for seed in args.pool_seeds.split(",") if seed.strip()]
    except ValueError as error:
        parser.error(f"--readings / --pool-seeds: {error}")
    if not args.readings or not args.pool_seeds:
        parser.error("--readings and --pool-seeds need at least one item each")
    return args


@torch.inference_mode()
def build_memories(model: Any, dataset: Any, specs: list[MemorySpec], seeds: list[int], batch_size: int) -> dict:
    """``{(spec, seed): FeatureMemory}`` from one pass over the normal training images (a pool per reading and seed)."""
    net = model.model
    channels = net.memory.channels if net.memory is not None else ()
    pools = {
        (reading(spec, channels), seed): PositionPool(POOL_SIZE, len(dataset), torch.Generator().manual_seed(seed))
        for spec in specs
        for seed in seeds
    }
    for batch in batches(dataset, batch_size):
        features = net.backbone_features(model.pre_processor(batch.image)).float()
        fill_pools(((key, pool) for (key, _), pool in pools.items()), features)
    return {
        (spec, seed): fitted_memory(spec, channels, pools[(reading(spec, channels), seed)])
        for spec in specs
        for seed in seeds
    }


@torch.inference_mode()
def image_scores(model: Any, dataset: Any, memories: dict, batch_size: int) -> tuple[dict, np.ndarray]:
    """Every memory's image scores (the peak of its upsampled distances, as the model scores) and the labels."""
    net = model.model
    scores: dict[Any, list[float]] = {key: [] for key in memories}
    labels: list[int] = []
    for batch in batches(dataset, batch_size):
        images = model.pre_processor(batch.image)
        features = net.backbone_features(images).float()
        for key, memory in memories.items():
            distances = net.upsampler(memory.distance_map(features), images.shape[-2:])
            scores[key] += distances.flatten(1).amax(dim=1).tolist()
        labels += torch.as_tensor(batch.gt_label).int().tolist()
    return scores, np.array(labels, dtype=bool)


def table(specs: list[MemorySpec], seeds: list[int], aurocs: dict, channels: tuple[tuple[int, int], ...]) -> list[str]:
    """Markdown rows: a reading's image AUROC per draw, their mean and spread (max - min)."""
    rows = [
        "| memory | " + " | ".join(f"draw {seed}" for seed in seeds) + " | mean | spread |",
        "|---" * (len(seeds) + 3) + "|",
    ]
    for spec in specs:
        values = [aurocs[(spec, seed)] for seed in seeds]
        cells = " | ".join(f"{value:.3f}" for value in values)
        rows.append(f"| {spec.label(channels)} | {cells} | {np.mean(values):.3f} | {np.ptp(values):.3f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Score every reading and draw, append the section to ``--output``; 2 when the category is missing."""
    from sklearn.metrics import roc_auc_score

    from anomalib_fcdd import FcddHsc
    from anomalib_fcdd.data import MVTec
    from benchmarks.bench_training import append_section, machine
    from benchmarks.jobs import report_missing_category

    args = parse_args(argv)
    if report_missing_category(args.mvtec_root, args.category):
        return 2
    started = time.perf_counter()
    datamodule = MVTec(root=args.mvtec_root, category=args.category, num_workers=0)
    datamodule.setup()
    model = FcddHsc(visualizer=False).eval()  # the default backbone, frozen: its memory needs no training
    # Decode every image straight to the model's input size, as the package prepares test images and (since
    # 2026-12-07) the memory's training images. Without it, anomalib's collate resizes the images of a batch to the
    # largest among them first, so data whose images differ in size (Magnetic-Tile) were resized twice, by a factor
    # that depended on the batch.
    for dataset in (datamodule.train_data, datamodule.test_data):
        dataset.augmentations = model.pre_processor.transform
    memories = build_memories(model, datamodule.train_data, args.readings, args.pool_seeds, args.batch_size)
    scores, labels = image_scores(model, datamodule.test_data, memories, args.batch_size)
    aurocs = {key: float(roc_auc_score(labels, values)) for key, values in scores.items()}
    channels = model.model.memory.channels
    command = "python -m benchmarks.memory_readings " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join(
        [
            f"## {args.category}",
            "",
            f"`{command.strip()}`, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {machine()}, "
            f"{time.perf_counter() - started:.0f} s. {len(datamodule.train_data)} training images (pool of at most "
            f"{POOL_SIZE:,} positions per reading and draw), {len(labels)} test images ({int(labels.sum())} "
            "defective); image AUROC of the memory's score:",
            "",
            *table(args.readings, args.pool_seeds, aurocs, channels),
        ]
    )
    append_section(args.output, "The image-score memory: readings of the features, several pool draws", section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
