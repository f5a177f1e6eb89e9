"""Where FCDD's image score loses to PatchCore: the trained heads against a memory of normal patches, same features.

Trains ``FcddHsc()`` with every default on one MVTec-layout category, then scores its test set two ways on the *same*
frozen backbone features (``FcddModel.backbone_features``) and through the same Gaussian upsampler:

* FCDD: the heads' map (image score: its maximum, ``image_score="max"``, whatever the model's default);
* memory of M: each feature vector's Euclidean distance to the nearest of M feature vectors drawn at random from the
  normal training images (PatchCore without its coreset selection and neighbourhood pooling), upsampled alike;
* coreset: the same distance to a greedy k-centre selection of a fraction of all training positions (PatchCore's
  selection, made on a random projection to 128 dimensions), which keeps the rare vectors a random draw misses;
* PCA memory S x D: the package's own ``image_score="memory"`` scorer (``models/fcdd/memory_bank.py``), built as
  ``FcddHsc`` builds it (a bounded pool of positions, its PCA basis of D dimensions, a greedy coreset of S vectors in
  it), so one training measures several sizes of it; it reads the channels the model's memory reads (for the default
  backbone its stride-8 and deepest stages), or every channel (``:all``).

Where a memory separates the images that the heads do not, the information is in the features and the parametric
heads do not keep it; M x C half-precision values is what such a memory would add to the artefact. Reports image and
pixel AUROC over the test set and image AUROC per defect type (each type's images against all good ones).

    python -m benchmarks.gap_diagnosis --mvtec-root ../shared/data --category magnetic_tile

Appends a section to ``benchmarks/results/gap_diagnosis.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_fcdd.models.fcdd.memory_bank import (
    POOL_SIZE,
    ChannelRanges,
    FeatureMemory,
    PositionPool,
    greedy_coreset,
    read_features,
)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "gap_diagnosis.md"
FCDD = "FCDD heads"
#: How the package memory reads the backbone's features: channel ranges (empty: all), k x k neighbourhood, zeros
#: past the border.
Reading = tuple[ChannelRanges, int, bool]


class MemorySpec(NamedTuple):
    """A ``SIZExDIM[xK][:all][:nopad]`` item: the package memory's size, PCA dimensions and neighbourhood, whether it
    reads every channel (``:all``) instead of the backbone's ``memory_channels``, and whether its k x k means count
    zeros past the border (off with ``:nopad``)."""

    size: int
    dim: int
    neighbourhood: int = 1
    every_channel: bool = False
    zero_padded: bool = True

    def label(self, channels: ChannelRanges) -> str:
        """How reports name it, given the backbone's memory channels."""
        name = f"{self.size} x {self.dim}"
        if self.neighbourhood > 1:
            name += f", {self.neighbourhood} x {self.neighbourhood} mean" + (
                "" if self.zero_padded else " without zeros"
            )
        return name + (", every channel" if self.every_channel or not channels else f", channels {list(channels)}")


@dataclass
class Scores:
    """One scorer's results per test batch: image scores and upsampled maps."""

    image: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.export_accuracy import default_backbone
    from benchmarks.jobs import resolve_mvtec_root

    backbone, pre_trained = default_backbone()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mvtec-root", type=Path, default=resolve_mvtec_root(None), help="MVTec-layout root")
    parser.add_argument("--category", default="bottle")
    parser.add_argument(
        "--memory-sizes", default="5000,20000", help="comma-separated M: normal feature vectors in each memory"
    )
    parser.add_argument(
        "--pca-memories",
        default="",
        help="comma-separated SIZExDIM[xK][:all][:nopad]: the package's memory scorer with K x K averaging, on every "
        "channel with :all, its means without zeros past the border with :nopad (e.g. 2000x96x3,2000x96x3:nopad)",
    )
    parser.add_argument(
        "--coreset-fraction", type=float, default=0.01, help="greedy coreset of this fraction of positions (0: none)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="shorten training (default: the backbone's budget)")
    parser.add_argument("--passes-per-epoch", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fcdd_gap_diagnosis"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.backbone, args.pre_trained = backbone, pre_trained
    args.memory_sizes = sorted({int(size) for size in args.memory_sizes.split(",") if size.strip()})
    if args.memory_sizes and min(args.memory_sizes) < 1:
        parser.error(f"--memory-sizes needs positive integers, got {args.memory_sizes}")
    try:
        args.pca_memories = parse_pca_memories(args.pca_memories)
    except ValueError as error:
        parser.error(f"--pca-memories: {error}")
    if not 0 <= args.coreset_fraction <= 1:
        parser.error(f"--coreset-fraction must be in [0, 1], got {args.coreset_fraction}")
    return args


def parse_pca_memories(text: str) -> list[MemorySpec]:
    """``SIZExDIM[xK][:all][:nopad]`` items, comma-separated (the flags in any order)."""
    specs = []
    for item in (item.strip() for item in text.split(",") if item.strip()):
        numbers, *flags = item.split(":")
        try:
            values = [int(value) for value in numbers.split("x")]
        except ValueError:
            raise ValueError(
                f"takes SIZExDIM[xK][:all][:nopad] items such as 2000x96x3 or 2000x96:all, got {text!r}"
            ) from None
        if len(values) not in {2, 3} or min(values) < 1 or (len(values) == 3 and values[2] % 2 == 0):
            raise ValueError(f"takes SIZExDIM[xK] items of positive integers, K odd, got {text!r}")
        if not set(flags) <= {"all", "nopad"} or len(set(flags)) < len(flags):
            raise ValueError(f"takes the flags :all and :nopad, each at most once, got {item!r}")
        specs.append(MemorySpec(*values, every_channel="all" in flags, zero_padded="nopad" not in flags))
    return specs


def batches(dataset: Any, batch_size: int) -> Any:
    """The dataset's items in order, collated as anomalib collates them."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate_fn, num_workers=0)


def feature_maps(model: Any, dataset: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """The backbone's feature maps of the dataset's images, B x C x h x w (float32) per batch."""
    for batch in batches(dataset, batch_size):
        yield model.model.backbone_features(model.pre_processor(batch.image)).float()


def as_vectors(features: torch.Tensor) -> torch.Tensor:
    """B x C x h x w feature maps as B x positions x C vectors."""
    return features.flatten(2).transpose(1, 2)


@torch.inference_mode()
def normal_memories(
    model: Any,
    dataset: Any,
    sizes: list[int],
    batch_size: int,
    seed: int,
    pools: dict[Reading, PositionPool] | None = None,
) -> dict[int, torch.Tensor]:
    """For each size M, M feature vectors (M x C) drawn uniformly over the positions of the training images, all
    from one pass over them (which also fills ``pools``, the package memory's candidates per way of reading the
    features: channel ranges, neighbourhood and border).

    Each image gives ``ceil(M / images)`` positions, so memory stays bounded however large the training set; the
    pooled draw is then cut to M at random. Every size has its own generator seeded with ``seed``, so a size draws the
    same vectors whichever other sizes share the pass.
    """
    generators = {size: torch.Generator().manual_seed(seed) for size in sizes}
    drawn: dict[int, list[torch.Tensor]] = {size: [] for size in sizes}
    for features in feature_maps(model, dataset, batch_size):
        fill_pools((pools or {}).items(), features)
        vectors = as_vectors(features)
        for size, generator in generators.items():
            per_image = math.ceil(size / len(dataset))
            picks = torch.rand(vectors.shape[:2], generator=generator).argsort(dim=1)[:, :per_image]
            chosen = torch.gather(vectors, 1, picks[..., None].expand(-1, -1, vectors.shape[2]))
            drawn[size].append(chosen.flatten(0, 1))
    memories = {}
    for size, generator in generators.items():
        pool_of_size = torch.cat(drawn[size])
        memories[size] = pool_of_size[torch.randperm(len(pool_of_size), generator=generator)[:size]]
    return memories


def reading(spec: MemorySpec, channels: ChannelRanges) -> Reading:
    """How a ``--pca-memories`` item reads the features: the model memory's ``channels`` (every one with ``:all``),
    its neighbourhood and border. Without averaging the border does not matter, and plain readings share one pool."""
    zero_padded = spec.zero_padded or spec.neighbourhood == 1
    return ((), spec.neighbourhood, zero_padded) if spec.every_channel else (channels, spec.neighbourhood, zero_padded)


def fill_pools(pools: Iterable[tuple[Reading, PositionPool]], features: torch.Tensor) -> None:
    """Add a batch of feature maps to every pool, each read its way (channel ranges, neighbourhood, border)."""
    for (channels, neighbourhood, zero_padded), pool in pools:
        pool.add(read_features(features, channels, neighbourhood, zero_padded))


def fitted_memory(spec: MemorySpec, channels: ChannelRanges, pool: PositionPool) -> FeatureMemory:
    """The package's memory of a ``--pca-memories`` item, fitted on ``pool`` (filled with the item's reading)."""
    chosen, neighbourhood, zero_padded = reading(spec, channels)
    memory = FeatureMemory(spec.size, spec.dim, neighbourhood, chosen, zero_padded)
    memory.fit(pool.vectors())
    return memory


def package_memories(
    pools: dict[Reading, PositionPool], specs: list[MemorySpec], channels: ChannelRanges
) -> dict[str, FeatureMemory]:
    """The package's ``image_score="memory"`` scorer for every item, each from the pool of its reading."""
    return {
        f"PCA memory {spec.label(channels)}": fitted_memory(spec, channels, pools[reading(spec, channels)])
        for spec in specs
    }


@torch.inference_mode()
def all_positions(model: Any, dataset: Any, batch_size: int) -> torch.Tensor:
    """Every training position's feature vector (positions x C), in float16 to halve what the selection holds."""
    features = feature_maps(model, dataset, batch_size)
    return torch.cat([as_vectors(maps).flatten(0, 1).half() for maps in features])


def projected_coreset(vectors: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``size`` rows chosen by greedy k-centre selection (PatchCore's; ``memory_bank.greedy_coreset``),
    on a random Gaussian projection to ``projection_dim`` dimensions when the vectors have more."""
    points = vectors.float()
    if points.shape[1] > projection_dim:
        generator = torch.Generator().manual_seed(seed)
        points = points @ (torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5)
    return greedy_coreset(points, size)


def nearest_distance(features: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """B x 1 x h x w: each position's Euclidean distance to its nearest memory vector."""
    vectors = features.flatten(2).transpose(1, 2).flatten(0, 1)
    distances = torch.cat([torch.cdist(chunk, memory).amin(dim=1) for chunk in vectors.split(4096)])
    return distances.view(features.shape[0], 1, *features.shape[2:])


@torch.inference_mode()
def score_test_set(
    model: Any, dataset: Any, memories: dict[str, torch.Tensor | FeatureMemory], batch_size: int
) -> tuple[dict[str, Scores], np.ndarray, np.ndarray, list[str]]:
    """Scores of FCDD and of every memory, the masks (N x H x W bool), the labels and each image's defect type."""
    net = model.model
    scores = {name: Scores() for name in [FCDD, *memories]}
    masks, labels, types = [], [], []
    for batch in batches(dataset, batch_size):
        images = model.pre_processor(batch.image)
        size = images.shape[-2:]
        fcdd = net(images)
        scores[FCDD].image += fcdd.anomaly_map.float().flatten(1).amax(dim=1).tolist()  # the heads' peak
        scores[FCDD].maps.append(fcdd.anomaly_map.float()[:, 0].numpy())
        features = net.backbone_features(images).float()
        for name, memory in memories.items():
            if isinstance(memory, FeatureMemory):
                low_res = memory.distance_map(features)
            else:
                low_res = nearest_distance(features, memory)
            distance_map = net.upsampler(low_res, size)
            scores[name].image += distance_map.flatten(1).amax(dim=1).tolist()
            scores[name].maps.append(distance_map[:, 0].numpy())
        mask = torch.as_tensor(batch.gt_mask).float().view(len(images), 1, *batch.gt_mask.shape[-2:])
        masks.append((F.interpolate(mask, size=size, mode="nearest")[:, 0] > 0.5).numpy())
        labels += torch.as_tensor(batch.gt_label).int().tolist()
        types += [Path(path).parent.name for path in batch.image_path]
    return scores, np.concatenate(masks), np.array(labels, dtype=bool), types


def stored_values(memory: torch.Tensor | FeatureMemory) -> int:
    """Numbers a scorer adds to the artefact: the vectors, and for the package's memory its mean and PCA basis."""
    if isinstance(memory, FeatureMemory):
        return memory.vectors.numel() + memory.basis.numel() + memory.mean.numel()
    return memory.numel()


def auroc_table(
    scores: dict[str, Scores], masks: np.ndarray, labels: np.ndarray, types: list[str], stored: dict[str, int]
) -> tuple[list[str], list[str]]:
    """Markdown rows: one per scorer (the values it stores beside the model, image and pixel AUROC), then one per
    defect type. ``stored`` has an entry for every memory; a scorer without one stores nothing."""
    from sklearn.metrics import roc_auc_score

    kinds = np.array(types)
    good = ~labels
    overall, per_type = [], []
    for name, result in scores.items():
        image = np.asarray(result.image)
        maps = np.concatenate(result.maps)
        values = stored.get(name)
        size = "–" if values is None else f"{values:,} ({values * 2 / 2**20:.2f} MB FP16)"
        pixel = roc_auc_score(masks.ravel(), maps.ravel())
        overall.append(f"| {name} | {size} | {roc_auc_score(labels, image):.3f} | {pixel:.3f} |")
        cells = []
        for kind in sorted(set(kinds[labels])):
            chosen = good | (kinds == kind)
            cells.append(f"{roc_auc_score(labels[chosen], image[chosen]):.3f}")
        per_type.append(f"| {name} | " + " | ".join(cells) + " |")
    header = "| scorer | " + " | ".join(sorted(set(kinds[labels]))) + " |"
    return overall, [header, "|---" * (1 + len(set(kinds[labels]))) + "|", *per_type]


def main(argv: list[str] | None = None) -> int:
    """Train, score, append the section to ``--output``; 2 when the category is missing."""
    args = parse_args(argv)
    from benchmarks.jobs import report_missing_category

    if report_missing_category(args.mvtec_root, args.category):
        return 2
    from benchmarks.bench_training import append_section, machine
    from benchmarks.export_accuracy import train

    model, datamodule, seconds = train(args, args.work_dir)
    model.cpu().eval()
    memory_channels = model.model.memory.channels if model.model.memory is not None else ()
    readings = {((), 1, True)} | {reading(spec, memory_channels) for spec in args.pca_memories}
    pools = {
        key: PositionPool(POOL_SIZE, len(datamodule.train_data), torch.Generator().manual_seed(0)) for key in readings
    }
    drawn = normal_memories(model, datamodule.train_data, args.memory_sizes, args.batch_size, args.seed, pools)
    memories: dict[str, torch.Tensor | FeatureMemory] = {f"memory of {size}": memory for size, memory in drawn.items()}
    memories.update(package_memories(pools, args.pca_memories, memory_channels))
    if args.coreset_fraction > 0:
        positions = all_positions(model, datamodule.train_data, args.batch_size)
        size = max(1, round(args.coreset_fraction * len(positions)))
        # One pass over every position per chosen vector: Magnetic-Tile's 6,272 of 627,200 took 14 min on 2 cores.
        print(f"Selecting a coreset of {size:,} of {len(positions):,} training positions ...", flush=True)
        memories[f"coreset of {size}"] = positions[projected_coreset(positions, size, seed=args.seed)].float()
        del positions
    scores, masks, labels, types = score_test_set(model, datamodule.test_data, memories, args.batch_size)
    candidates = pools[((), 1, True)].vectors()  # the plain vectors' pool: its width and size are reported
    channels = candidates.shape[1]
    stored = {name: stored_values(memory) for name, memory in memories.items()}
    overall, per_type = auroc_table(scores, masks, labels, types, stored)
    command = "python -m benchmarks.gap_diagnosis " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join(
        [
            f"## {args.category}",
            "",
            f"`{command.strip()}`, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {machine()}. `FcddHsc()` "
            f"({args.backbone}, {channels} channels) trained in {seconds:.0f} s on {len(datamodule.train_data)} "
            f"images, seed {args.seed}; {len(labels)} test images ({int(labels.sum())} defective). Memories: normal "
            "feature vectors drawn at random from the training images; PCA memory S x D: the package's "
            '`image_score="memory"` (S coreset vectors in D PCA dimensions'
            + (f" of channels {list(memory_channels)}, unless a row says every channel" if memory_channels else "")
            + f", from a pool of {len(candidates):,} positions)"
            + (
                f"; the coreset: a greedy k-centre selection of {args.coreset_fraction:g} of all training positions"
                if args.coreset_fraction > 0
                else ""
            )
            + "; each scored by nearest-neighbour distance through the same upsampler.",
            "",
            "| scorer | memory values | image AUROC | pixel AUROC |",
            "|---|---|---|---|",
            *overall,
            "",
            "Image AUROC per defect type (its images against every good one):",
            "",
            *per_type,
        ]
    )
    append_section(args.output, "FCDD's heads against a memory of normal patches on the same features", section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
