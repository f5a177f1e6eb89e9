"""anomalib's ``Folder`` layout (normal, abnormal, normal-test and mask folders), resolved and checked before use.

anomalib's ``Folder`` pairs images with masks by *sorted position* and then checks that each image's stem is a
substring of its mask's: with ``<name>_mask.png`` files, ``a1.png`` sorts before ``a10.png`` while ``a1_mask.png``
sorts after ``a10_mask.png``, so a complete dataset is refused with a ``MisMatchError``, and one missing or extra
mask shifts every later pair. Here a mask is matched by stem -- ``<stem>.<ext>`` or
``<stem>_mask.<ext>``, any image extension -- within the mask folder paired with the image's abnormal folder (when
there are as many mask folders as abnormal ones) or within all mask folders; a missing, ambiguous or shared mask is an
error naming the file.

:func:`validate_folder_layout` then checks everything else the way :mod:`.validation` checks MVTec: folders that do
not exist or hold no images, files that do not decode, a mask whose size differs from its image's, a mix of
grayscale and colour images, and files that will be ignored (a warning).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .decode import IMAGE_EXTENSIONS, inspect_image
from .errors import DatasetError
from .validation import check_consistent_colour, check_mask_size, warn_ignored

logger = logging.getLogger(__name__)

PathList = str | Path | Sequence[str | Path] | None
MASK_SUFFIX = "_mask"


@dataclass
class FolderLayout:
    """The resolved folders of a ``Folder`` dataset (each option as a list) and the image suffixes read."""

    normal: list[Path]
    abnormal: list[Path] = field(default_factory=list)
    normal_test: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    @classmethod
    def resolve(
        cls,
        root: str | Path | None,
        normal_dir: PathList,
        abnormal_dir: PathList = None,
        normal_test_dir: PathList = None,
        mask_dir: PathList = None,
        extensions: Sequence[str] | None = None,
    ) -> FolderLayout:
        """Folders relative to ``root`` (when given), symlinks followed, as anomalib resolves them."""
        base = Path(root).expanduser() if root is not None else None
        if base is not None and not base.is_dir():
            raise DatasetError(f"Dataset root {base} does not exist. Point --data.root (Python: root=) at your data.")

        def as_list(value: PathList) -> list[Path]:
            if value is None:
                return []
            items = [value] if isinstance(value, str | Path) else list(value)
            paths = [Path(item).expanduser() for item in items]
            return [(path if base is None or path.is_absolute() else base / path).resolve() for path in paths]

        suffixes = tuple(s.lower() for s in (extensions or IMAGE_EXTENSIONS))
        return cls(as_list(normal_dir), as_list(abnormal_dir), as_list(normal_test_dir), as_list(mask_dir), suffixes)

    def images(self, folder: Path, ignored: list[Path] | None = None, follow_links: bool = False) -> list[Path]:
        """Image files under ``folder``, sorted: recursive, hidden entries skipped.

        Without ``follow_links`` this is exactly what anomalib lists (``Path.glob("**/*")``, which does not enter
        symlinked subfolders); masks are looked up with it, so a mask folder may be a folder of links.
        """
        if follow_links:
            found = [Path(top) / name for top, _, names in os.walk(folder, followlinks=True) for name in names]
        else:
            found = [path for path in folder.rglob("*") if not path.is_dir()]
        files = []
        for path in sorted(found):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            if path.suffix.lower() in self.extensions:
                files.append(path)
            elif ignored is not None:
                ignored.append(path)
        return files

    def match_masks(self) -> dict[Path, Path]:
        """``{abnormal image: its mask}``; empty without mask folders.

        Raises:
            DatasetError: an abnormal image has no mask, two candidate masks, or shares its mask with another image.
        """
        if not self.masks:
            return {}
        pairwise = len(self.masks) == len(self.abnormal)
        indexes = [self._mask_index([folder]) for folder in self.masks] if pairwise else []
        shared = None if pairwise else self._mask_index(self.masks)
        matched: dict[Path, Path] = {}
        owners: dict[Path, Path] = {}
        for position, folder in enumerate(self.abnormal):
            index = indexes[position] if pairwise else shared
            searched = [self.masks[position]] if pairwise else self.masks
            for image in self.images(folder):
                candidates = index.get(image.stem, []) if index is not None else []
                where = " or ".join(str(f) for f in searched)
                if not candidates:
                    raise DatasetError(
                        f"Abnormal image {image} has no mask: expected {image.stem}.png or "
                        f"{image.stem}{MASK_SUFFIX}.png (any image extension) in {where}. Add the mask, or move the "
                        f"image out of {folder}."
                    )
                if len(candidates) > 1:
                    raise DatasetError(
                        f"Abnormal image {image} has {len(candidates)} masks: {', '.join(map(str, candidates))}. Keep "
                        "one."
                    )
                mask = candidates[0]
                if mask in owners:
                    raise DatasetError(
                        f"Mask {mask} would serve both {owners[mask]} and {image} (same file name); rename one image "
                        "and its mask."
                    )
                owners[mask] = image
                matched[image] = mask
        return matched

    def _mask_index(self, folders: list[Path]) -> dict[str, list[Path]]:
        """Mask files by the image stem they can belong to (``a.png`` and ``a_mask.png`` both to ``a``)."""
        index: dict[str, list[Path]] = defaultdict(list)
        for folder in folders:
            for mask in self.images(folder, follow_links=True):
                index[mask.stem].append(mask)
                if mask.stem.endswith(MASK_SUFFIX):
                    index[mask.stem[: -len(MASK_SUFFIX)]].append(mask)
        return index


@dataclass
class FolderSummary:
    """What the check found."""

    normal_images: int = 0
    abnormal_images: dict[str, int] = field(default_factory=dict)
    normal_test_images: int = 0
    masks: int = 0
    grayscale: bool = False
    ignored_files: list[Path] = field(default_factory=list)


def validate_folder_layout(layout: FolderLayout) -> FolderSummary:
    """Check every folder, image and mask of ``layout``.

    Raises:
        DatasetError: with the offending path and what to do about it.
    """
    if not layout.normal:
        raise DatasetError("normal_dir is required: the folder of defect-free training images (--data.normal_dir).")
    if layout.masks and not layout.abnormal:
        raise DatasetError("mask_dir is given but abnormal_dir is not: masks belong to abnormal images.")
    summary = FolderSummary()
    options = {"normal_dir": layout.normal, "abnormal_dir": layout.abnormal, "normal_test_dir": layout.normal_test}
    files: dict[str, list[Path]] = {}
    for option, folders in {**options, "mask_dir": layout.masks}.items():
        for folder in folders:
            if not folder.is_dir():
                raise DatasetError(f"{option} {folder} does not exist (or is not a folder). Check --data.{option}.")
            found = layout.images(folder, summary.ignored_files, follow_links=option == "mask_dir")
            if not found:
                raise DatasetError(
                    f"{option} {folder} has no images (looked for {', '.join(layout.extensions)}, in subfolders too)."
                )
            files[str(folder)] = found
    summary.normal_images = sum(len(files[str(f)]) for f in layout.normal)
    summary.abnormal_images = {str(f): len(files[str(f)]) for f in layout.abnormal}
    summary.normal_test_images = sum(len(files[str(f)]) for f in layout.normal_test)
    masks = layout.match_masks()
    summary.masks = len(masks)
    first_of_kind: dict[bool, Path] = {}
    for folder in [*layout.normal, *layout.abnormal, *layout.normal_test]:
        for image in files[str(folder)]:
            info = inspect_image(image)
            first_of_kind.setdefault(info.grayscale, image)
            if image in masks:
                check_mask_size(masks[image], image, info.size)
    summary.grayscale = check_consistent_colour(first_of_kind, "The dataset")
    warn_ignored(summary.ignored_files, f"file(s) that are not images ({', '.join(layout.extensions)})")
    return summary
