"""Check an MVTec-AD-layout dataset before training, so bad input fails early with the offending path.

anomalib itself would, on a missing folder, try to download MVTec-AD (and leave an empty folder behind offline), skip
files it cannot use without a word, or fail deep inside a DataLoader worker on a broken image. This check reads every
image header (and verifies PNG checksums) once and reports:

* a root or category folder that does not exist, or a category with no training or test images;
* a defective test image without its ``ground_truth/<defect>/<stem>_mask.png``, or a mask whose size differs;
* a file that cannot be decoded as an image (truncated, corrupt, or not an image at all), or whose pixels cannot be
  mapped to [0, 1] the way :mod:`.decode` reads them for training;
* a grayscale image among colour images (or the reverse) -- almost always a stray file; all-grayscale categories
  (MVTec's grid, screw, zipper) are fine and are converted to RGB by anomalib;
* files that anomalib would silently ignore (not ``.png``) are listed in a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .decode import inspect_image
from .errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".PNG")

__all__ = ["DatasetError", "DatasetSummary", "validate_mvtec_layout"]


@dataclass
class DatasetSummary:
    """What the check found."""

    train_images: int = 0
    test_images: dict[str, int] = field(default_factory=dict)
    grayscale: bool = False
    ignored_files: list[Path] = field(default_factory=list)


def _image_files(folder: Path, summary: DatasetSummary) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix in IMAGE_SUFFIXES:
            files.append(path)
        else:
            summary.ignored_files.append(path)
    return files


def validate_mvtec_layout(root: str | Path, category: str) -> DatasetSummary:
    """Check ``root/category`` for the MVTec-AD layout and readable, consistent images and masks.

    Raises:
        DatasetError: with the offending path and what to do about it.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"Dataset root {root} does not exist. Point --data.root (Python: root=) at the folder that holds "
            f"'{category}/train/good', or pass download=True to fetch MVTec-AD (needs internet)."
        )
    base = root / category
    if not base.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetError(f"Category folder {base} does not exist. Categories found in {root}: {found or 'none'}.")
    summary = DatasetSummary()
    train_dir = base / "train" / "good"
    if not train_dir.is_dir():
        raise DatasetError(f"Training folder {train_dir} does not exist; MVTec layout needs <category>/train/good.")
    train_files = _image_files(train_dir, summary)
    if not train_files:
        raise DatasetError(f"Category {base} is empty: no .png training images in {train_dir}.")
    summary.train_images = len(train_files)

    test_root = base / "test"
    test_dirs = sorted(p for p in test_root.iterdir() if p.is_dir()) if test_root.is_dir() else []
    test_files: dict[str, list[Path]] = {d.name: _image_files(d, summary) for d in test_dirs}
    if not any(test_files.values()):
        raise DatasetError(f"Category {base} has no test images: no .png files under {test_root}/<defect or good>.")
    summary.test_images = {name: len(files) for name, files in test_files.items()}

    modes: dict[bool, Path] = {}
    for path in train_files + [p for files in test_files.values() for p in files]:
        info = inspect_image(path)
        modes.setdefault(info.grayscale, path)
        defect = path.parent.name
        if path.parent.parent == test_root and defect != "good":
            _check_mask(base, path, info.size)
    summary.grayscale = check_consistent_colour(modes, f"Category {base}")
    warn_ignored(summary.ignored_files, "non-PNG file(s) (MVTec layout reads .png only)")
    return summary


def check_consistent_colour(first_of_kind: dict[bool, Path], what: str) -> bool:
    """Refuse a mix of grayscale and colour images (almost always a stray file); returns whether all are grayscale.

    Args:
        first_of_kind: the first grayscale (``True``) and colour (``False``) image found.
        what: the dataset, as the message should name it.
    """
    if len(first_of_kind) > 1:
        raise DatasetError(
            f"{what} mixes grayscale and colour images: {first_of_kind[True]} is grayscale but "
            f"{first_of_kind[False]} is colour. Convert the odd image(s) so the dataset is consistent, or remove them."
        )
    return True in first_of_kind


def warn_ignored(files: list[Path], what: str) -> None:
    """Log the files that anomalib will not read, naming the first five."""
    if files:
        shown = ", ".join(str(p) for p in files[:5])
        more = f" and {len(files) - 5} more" if len(files) > 5 else ""
        logger.warning("Ignoring %d %s: %s%s", len(files), what, shown, more)


def _check_mask(base: Path, image_path: Path, image_size: tuple[int, int]) -> None:
    mask_path = base / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
    if not mask_path.is_file():
        raise DatasetError(
            f"Defective test image {image_path} has no mask: expected {mask_path}. Add the mask, or move the image "
            "out of the test set."
        )
    check_mask_size(mask_path, image_path, image_size)


def check_mask_size(mask_path: Path, image_path: Path, image_size: tuple[int, int]) -> None:
    """Refuse an unreadable mask, or one whose upright size differs from its image's."""
    mask_size = inspect_image(mask_path).size
    if mask_size != image_size:
        raise DatasetError(
            f"Mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}; a mask must have its image's size."
        )
