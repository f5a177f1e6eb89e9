"""An MVTec-layout dataset cut from the CC0 texture photographs that ship with scikit-image (brick, grass, gravel).

Why these photos: they are real, licensed CC0, and installed with scikit-image, so the demo needs no download. Each
is a 512 x 512 grayscale image, stored here as RGB (three equal channels) because FCDD's backbones expect colour.

Layout per category (``<root>/<category>/``)::

    train/good/NNN.png             normal crops from the top-left and bottom-right quarters of the photo
    test/good/NNN.png              normal crops from the other two quarters (never seen in training)
    test/<defect>/NNN.png          bottom-row crops with one defect (see :mod:`.defects`)
    ground_truth/<defect>/NNN_mask.png   255 exactly where the defective crop differs from its clean version

A test crop's whole defect window (crop plus margin) lies in a test quarter, so no test pixel appears in training.
Crops are randomly flipped (and, for the direction-free textures, rotated by 90 degrees). The build is seeded: the
same seed and settings give the same pixels (and, with the same Pillow, the same PNG bytes) on every machine.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .defects import DEFECTS, DefectContext

#: Version of the generator; bump it when the pixels change, so old folders are rebuilt.
BUILDER_VERSION = 1
MANIFEST = "fcdd_demo_dataset.json"
CREDITS = "CREDITS.txt"


@dataclass(frozen=True)
class Texture:
    """A photograph and how crops of it may be turned.

    Attributes:
        name: category name.
        loader: ``skimage.data`` function name.
        rotate: allow 90-degree rotations (textures without a preferred direction).
        source: where the photo comes from (for the credits file).
    """

    name: str
    loader: str
    rotate: bool
    source: str


TEXTURES: dict[str, Texture] = {
    "brick": Texture("brick", "brick", False, "CC0Textures 'Bricks25', https://cc0textures.com/view.php?tex=Bricks25"),
    "grass": Texture(
        "grass",
        "grass",
        True,
        "DeviantArt user linolafett, 'Grass 01', https://www.deviantart.com/linolafett/art/Grass-01-434853879",
    ),
    "gravel": Texture(
        "gravel", "gravel", True, "CC0Textures 'Gravel04', https://cc0textures.com/view.php?tex=Gravel04"
    ),
}


@dataclass(frozen=True)
class DemoDatasetConfig:
    """Sizes of the generated dataset.

    Attributes:
        crop_size: side of every image (pixels of the 512 x 512 photo, no resampling).
        n_train: normal training crops per category.
        n_test_good: normal test crops per category.
        n_per_defect: defective test crops per defect type and category.
        seed: master seed; each category derives its own stream from it and its name.
        margin: texture kept around a test crop while drawing a defect (folds and pastes reach outside the crop).
        min_area, max_area: allowed defect area as a fraction of the crop.
    """

    crop_size: int = 160
    n_train: int = 96
    n_test_good: int = 12
    n_per_defect: int = 4
    seed: int = 0
    margin: int = 16
    min_area: float = 0.003
    max_area: float = 0.15


#: Side of the scikit-image texture photos.
PHOTO_SIDE = 512
#: Smallest crop on which every defect type fits its area bounds.
MIN_CROP = 32


def check_config(config: DemoDatasetConfig) -> None:
    """Reject settings the builder cannot honour, before anything is written.

    Raises:
        ValueError: the crop (with its defect margin) does not fit a quarter of the photo, or is too small.
    """
    largest = PHOTO_SIDE // 2 - 2 * config.margin
    if not MIN_CROP <= config.crop_size <= largest:
        raise ValueError(f"The demo crop size must be between {MIN_CROP} and {largest} pixels, got {config.crop_size}.")
    if min(config.n_train, config.n_test_good, config.n_per_defect) < 0:
        raise ValueError("Image counts cannot be negative.")


def load_photo(texture: str) -> np.ndarray:
    """The 512 x 512 uint8 grayscale photo of ``texture`` from ``skimage.data`` (bundled, no download)."""
    import skimage.data

    photo = np.asarray(getattr(skimage.data, TEXTURES[texture].loader)())
    if photo.ndim != 2 or photo.dtype != np.uint8:
        raise ValueError(f"skimage.data.{texture}() is not a uint8 grayscale image: {photo.shape} {photo.dtype}")
    return photo


def category_rng(seed: int, category: str) -> np.random.Generator:
    """The random stream of one category: independent of which other categories are built."""
    return np.random.default_rng([seed, zlib.crc32(category.encode())])


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round half to even and clip: the same bytes on every machine for the same float64 input."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_rgb(gray: np.ndarray) -> np.ndarray:
    """``H x W`` -> ``H x W x 3`` with three equal channels."""
    return np.repeat(gray[..., None], 3, axis=2)


def orient(rng: np.random.Generator, image: np.ndarray, rotate: bool) -> np.ndarray:
    """Random horizontal/vertical flips and, if allowed, a random multiple of 90 degrees (exact pixel moves)."""
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.5:
        image = image[::-1]
    if rotate:
        image = np.rot90(image, int(rng.integers(4)))
    return np.ascontiguousarray(image)


Region = tuple[int, int, int, int]  # first row, stop row, first column, stop column


def split_regions(shape: tuple[int, ...]) -> dict[str, list[Region]]:
    """Disjoint parts of the photo: training crops from the top-left and bottom-right quadrants, test crops (with
    their defect margins) from the other two, so every split sees both sides of a perspective or lighting gradient.
    """
    half_rows, half_cols = shape[0] // 2, shape[1] // 2
    top, bottom = (0, half_rows), (half_rows, shape[0])
    left, right = (0, half_cols), (half_cols, shape[1])
    return {"train": [(*top, *left), (*bottom, *right)], "test": [(*top, *right), (*bottom, *left)]}


def random_window(rng: np.random.Generator, photo: np.ndarray, regions: Sequence[Region], size: int) -> np.ndarray:
    """A ``size`` x ``size`` window lying entirely inside one of ``regions`` (chosen at random)."""
    first_row, stop_row, first_col, stop_col = regions[int(rng.integers(len(regions)))]
    if stop_row - first_row < size or stop_col - first_col < size:
        raise ValueError(
            f"A {size}-pixel window does not fit a {stop_row - first_row} x {stop_col - first_col} quarter of the "
            f"{photo.shape[0]} x {photo.shape[1]} photo; use a smaller --crop-size."
        )
    row = int(rng.integers(first_row, stop_row - size + 1))
    col = int(rng.integers(first_col, stop_col - size + 1))
    return photo[row : row + size, col : col + size]


def defect_area_ok(mask: np.ndarray, config: DemoDatasetConfig) -> bool:
    """Whether a defect covers between ``min_area`` and ``max_area`` of the crop."""
    fraction = np.count_nonzero(mask) / mask.size
    return config.min_area <= fraction <= config.max_area


@dataclass(frozen=True)
class Sample:
    """One generated image.

    Attributes:
        folder: MVTec folder relative to the category (``train/good``, ``test/good``, ``test/<defect>``).
        name: file stem (``000``).
        image: ``H x W x 3`` uint8.
        clean: the same crop without its defect (defective samples only).
        mask: ``H x W`` bool, ``True`` exactly where ``image`` differs from ``clean`` (defective samples only).
    """

    folder: str
    name: str
    image: np.ndarray
    clean: np.ndarray | None = None
    mask: np.ndarray | None = None


def defective_crop(
    rng: np.random.Generator,
    photo: np.ndarray,
    donors: Sequence[np.ndarray],
    test_regions: Sequence[Region],
    defect: str,
    config: DemoDatasetConfig,
    rotate: bool,
    attempts: int = 100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A clean test crop, the same crop with a ``defect``, and the mask of the pixels that differ.

    Draws again (deterministically, from the same stream) while the defect area is outside the configured bounds.
    """
    size, margin = config.crop_size, config.margin
    context = DefectContext(donors=donors, crop_origin=(margin, margin), crop_size=size)
    inner = slice(margin, margin + size)
    for _ in range(attempts):
        window = orient(rng, random_window(rng, photo, test_regions, size + 2 * margin), rotate)
        damaged = to_uint8(DEFECTS[defect](rng, to_rgb(window).astype(np.float64), context))[inner, inner]
        clean = to_rgb(window[inner, inner])
        mask = (damaged != clean).any(axis=2)
        if defect_area_ok(mask, config):
            return clean, damaged, mask
    raise RuntimeError(f"Could not draw a {defect!r} defect within the area bounds in {attempts} attempts.")


def generate_category(category: str, config: DemoDatasetConfig) -> Iterator[Sample]:
    """Every image of one category, in a fixed order from the category's own random stream."""
    texture = TEXTURES[category]
    photo = load_photo(category)
    donors = [load_photo(other) for other in TEXTURES if other != category]
    rng = category_rng(config.seed, category)
    regions = split_regions(photo.shape)
    for folder, count, parts in (
        ("train/good", config.n_train, regions["train"]),
        ("test/good", config.n_test_good, regions["test"]),
    ):
        for index in range(count):
            crop = orient(rng, random_window(rng, photo, parts, config.crop_size), texture.rotate)
            yield Sample(folder, f"{index:03d}", to_rgb(crop))
    for defect in DEFECTS:
        for index in range(config.n_per_defect):
            clean, image, mask = defective_crop(rng, photo, donors, regions["test"], defect, config, texture.rotate)
            yield Sample(f"test/{defect}", f"{index:03d}", image, clean, mask)


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_sample(base: Path, sample: Sample) -> None:
    """Save the image, and for a defect its mask as ``ground_truth/<defect>/<name>_mask.png`` (0 / 255)."""
    _save(sample.image, base / sample.folder / f"{sample.name}.png")
    if sample.mask is not None:
        defect = sample.folder.split("/", 1)[1]
        _save(sample.mask.astype(np.uint8) * 255, base / "ground_truth" / defect / f"{sample.name}_mask.png")


def build_category(root: Path, category: str, config: DemoDatasetConfig) -> Path:
    """Write one category (train/good, test/good, test/<defect>, ground_truth/<defect>) and return its folder."""
    base = root / category
    for sample in generate_category(category, config):
        write_sample(base, sample)
    return base


def credits_text(categories: Sequence[str]) -> str:
    """Photo credits and licence for the generated folder."""
    lines = [
        "Demo dataset generated by anomalib-fcdd (`anomalib-fcdd demo`).",
        "",
        "The images are crops of photographs shipped with scikit-image (skimage.data), with synthetic defects drawn",
        "on the test crops. Photo sources, as stated in the skimage.data docstrings:",
        "",
    ]
    lines += [f"  {name}: skimage.data.{TEXTURES[name].loader}() -- {TEXTURES[name].source}" for name in categories]
    lines += [
        "",
        "Licence: scikit-image states that these photographs are licensed under the Creative Commons CC0 License",
        "(CC0 1.0 Universal Public Domain Dedication, https://creativecommons.org/publicdomain/zero/1.0/).",
        "scikit-image processed them as its docstrings describe (cropping, scaling, grayscale; for brick also a",
        "perspective transform and a rotation). This folder holds crops of those images, converted to RGB, some with",
        "drawn-in defects (scratch, foreign_patch, stain, hole, fold) whose exact pixel masks are in ground_truth/.",
        "",
    ]
    return "\n".join(lines)


def _manifest(config: DemoDatasetConfig, categories: Sequence[str]) -> dict[str, Any]:
    return {"builder_version": BUILDER_VERSION, "config": asdict(config), "categories": sorted(categories)}


def built_categories(root: Path, config: DemoDatasetConfig) -> set[str] | None:
    """Categories already generated in ``root`` with exactly this builder and ``config``; ``None``: not our folder."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if stored.get("builder_version") != BUILDER_VERSION or stored.get("config") != asdict(config):
        return set()
    return {name for name in stored.get("categories", []) if (root / name).is_dir()}


def _clear_category(root: Path, category: str, ours: bool) -> None:
    """Remove a previously generated category; refuse to touch folders this builder did not write."""
    folder = root / category
    if not folder.exists():
        return
    if not ours:
        raise FileExistsError(
            f"{folder} exists but was not generated by the demo (no {MANIFEST} in {root}); choose another "
            "--data-root or remove the folder."
        )
    shutil.rmtree(folder)


def build_demo_dataset(
    root: str | Path,
    categories: Sequence[str] = tuple(TEXTURES),
    config: DemoDatasetConfig | None = None,
) -> Path:
    """Generate the demo categories under ``root`` that are not already there (same settings) and return ``root``.

    Raises:
        ValueError: an unknown category or an impossible crop size.
        FileExistsError: ``root/<category>`` exists and was not written by this builder.
    """
    config = config or DemoDatasetConfig()
    check_config(config)
    unknown = sorted(set(categories) - set(TEXTURES))
    if unknown:
        raise ValueError(f"Unknown demo textures {unknown}; choose from {sorted(TEXTURES)}.")
    root = Path(root)
    built = built_categories(root, config)
    todo = [category for category in categories if category not in (built or set())]
    if not todo:
        return root
    root.mkdir(parents=True, exist_ok=True)
    for category in todo:
        _clear_category(root, category, ours=built is not None)
    (root / MANIFEST).unlink(missing_ok=True)  # the folder is inconsistent until the build finishes
    for category in todo:
        build_category(root, category, config)
    (root / CREDITS).write_text(credits_text(sorted(TEXTURES)))
    (root / MANIFEST).write_text(json.dumps(_manifest(config, sorted({*(built or set()), *todo})), indent=2) + "\n")
    return root
