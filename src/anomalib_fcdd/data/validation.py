"""Check an MVTec-AD-layout dataset before training, so bad input fails early with the offending path.

anomalib itself would, on a missing folder, try to download MVTec-AD (and leave an empty folder behind offline), skip
files it cannot use without a word, or fail deep inside a DataLoader worker on a broken image. This check reads every
image header (and verifies PNG checksums) once and reports:

* a root or category folder that does not exist, or a category with no training or test images;
* a defective test image without its ``ground_truth/<defect>/<stem>_mask.png``, or a mask whose size differs;
* a file that cannot be decoded as an image (truncated, corrupt, or not an image at all);
* a grayscale image among colour images (or the reverse) -- almost always a stray file; all-grayscale categories
  (MVTec's grid, screw, zipper) are fine and are converted to RGB by anomalib;
* files that anomalib would silently ignore (not ``.png``) are listed in a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserInputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".PNG")
GRAYSCALE_MODES = {"L", "I", "I;16", "F", "1", "LA"}


class DatasetError(UserInputError, ValueError):
    """The dataset on disk cannot be used as it is; the message names the path and the fix."""


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


def _open_image(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and size of an image, after verifying that the whole file decodes."""
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(
            f"{path} is not a readable image ({type(error).__name__}: {error}). Remove or replace this file."
        ) from error
    return mode, size


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
        mode, size = _open_image(path)
        modes.setdefault(mode in GRAYSCALE_MODES, path)
        defect = path.parent.name
        if path.parent.parent == test_root and defect != "good":
            _check_mask(base, path, size)
    if len(modes) > 1:
        raise DatasetError(
            f"Category {base} mixes grayscale and colour images: {modes[True]} is grayscale but {modes[False]} is "
            "colour. Convert the odd image(s) so the category is consistent, or remove them."
        )
    summary.grayscale = True in modes
    if summary.ignored_files:
        shown = ", ".join(str(p) for p in summary.ignored_files[:5])
        more = f" and {len(summary.ignored_files) - 5} more" if len(summary.ignored_files) > 5 else ""
        logger.warning(
            "Ignoring %d non-PNG file(s) (MVTec layout reads .png only): %s%s", len(summary.ignored_files), shown, more
        )
    return summary


def _check_mask(base: Path, image_path: Path, image_size: tuple[int, int]) -> None:
    mask_path = base / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
    if not mask_path.is_file():
        raise DatasetError(
            f"Defective test image {image_path} has no mask: expected {mask_path}. Add the mask, or move the image "
            "out of the test set."
        )
    _, mask_size = _open_image(mask_path)
    if mask_size != image_size:
        raise DatasetError(
            f"Mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}; a mask must have its image's size."
        )
