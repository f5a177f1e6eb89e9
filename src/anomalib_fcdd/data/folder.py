"""Your own images for FCDD: a checked :class:`Folder` and the semi-supervised :class:`FolderFewAnomalies`.

``Folder`` is anomalib's ``Folder`` (normal, abnormal, optional normal-test and mask folders; see
:mod:`.folder_layout`) with the same up-front check and one-line errors as :class:`~.mvtec.MVTec`, masks matched by
file stem (``<stem>.png`` or ``<stem>_mask.png``) instead of by sorted position, every image extension PIL reads, and
images decoded by :mod:`.decode`. ``FolderFewAnomalies`` adds the paper's semi-supervised setting: ``k`` labelled
defective images per abnormal folder (one folder per defect type), or the files you name, train the model instead of
confetti; by default they leave the test set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib.data import Folder as AnomalibFolder
from anomalib.data.utils import Split

from .base import CheckedDataModule, default_num_workers
from .datasets import DecodingFolderDataset
from .errors import DatasetError
from .folder_layout import FolderLayout, validate_folder_layout
from .item_cache import DEFAULT_CACHE_MB
from .semi_supervised import FewAnomaliesMixin, select_anomalies

logger = logging.getLogger(__name__)


class Folder(CheckedDataModule, AnomalibFolder):
    """anomalib's ``Folder`` with an up-front dataset check, masks matched by file stem and this package's decoding.

    Args:
        normal_dir: folder(s) of defect-free training images (relative to ``root`` unless absolute).
        root: folder the other paths are relative to.
        abnormal_dir: folder(s) of defective test images, e.g. one per defect type.
        normal_test_dir: folder(s) of defect-free test images; without it, ``normal_split_ratio`` of the normal
            images are held out for testing.
        mask_dir: folder(s) of masks (non-zero = defect), one per abnormal image, named ``<stem>.<ext>`` or
            ``<stem>_mask.<ext>``; as many folders as ``abnormal_dir`` pairs them up in order.
        name: the dataset's name in the results path; default: ``root``'s folder name, else ``folder``.
        extensions: image suffixes read; default ``.png .jpg .jpeg .bmp .tif .tiff`` (any case).
        num_workers: DataLoader workers; ``None`` (default) uses the machine's cores, at most 8.
        cache_mb: memory (MB) the training images may take once decoded and kept for the following passes
            (:mod:`.item_cache`); 0 decodes every image on every pass.
        validate: check folders, images and masks before training.
        **kwargs: everything else ``anomalib.data.Folder`` accepts (``normal_split_ratio``, batch sizes, splits...).
    """

    def __init__(
        self,
        normal_dir: str | Path | Sequence[str | Path] | None = None,
        root: str | Path | None = None,
        abnormal_dir: str | Path | Sequence[str | Path] | None = None,
        normal_test_dir: str | Path | Sequence[str | Path] | None = None,
        mask_dir: str | Path | Sequence[str | Path] | None = None,
        name: str | None = None,
        extensions: Sequence[str] | None = None,
        num_workers: int | None = None,
        validate: bool = True,
        cache_mb: float = DEFAULT_CACHE_MB,
        **kwargs: Any,
    ) -> None:
        if normal_dir is None:
            raise DatasetError("normal_dir is required: the folder of defect-free training images (--data.normal_dir).")
        super().__init__(
            name=name or (Path(root).expanduser().resolve().name if root is not None else "folder"),
            normal_dir=normal_dir,
            root=root,
            abnormal_dir=abnormal_dir,
            normal_test_dir=normal_test_dir,
            mask_dir=mask_dir,
            extensions=tuple(extensions) if extensions is not None else None,
            num_workers=default_num_workers() if num_workers is None else num_workers,
            **kwargs,
        )
        self.validate = validate
        self.cache_mb = cache_mb
        self._validated = False

    def layout(self) -> FolderLayout:
        """The resolved folders (raises :class:`~.errors.DatasetError` for a missing ``root``)."""
        return FolderLayout.resolve(
            self.root, self.normal_dir, self.abnormal_dir, self.normal_test_dir, self.mask_dir, self.extensions
        )

    def validate_dataset(self) -> None:
        """Check folders, images and masks (see :func:`.folder_layout.validate_folder_layout`)."""
        summary = validate_folder_layout(self.layout())
        logger.info(
            "Dataset %s: %d normal training images, abnormal images %s, %d normal test images, %d masks",
            self.name,
            summary.normal_images,
            summary.abnormal_images,
            summary.normal_test_images,
            summary.masks,
        )

    def _setup(self, _stage: str | None = None) -> None:
        self.check_dataset()
        layout = self.layout()
        masks = {str(image): str(mask) for image, mask in layout.match_masks().items()}
        defect_of = {str(image): folder.name for folder in layout.abnormal for image in layout.images(folder)}
        for split in (Split.TRAIN, Split.TEST):
            dataset = DecodingFolderDataset(
                name=self.name,
                split=split,
                root=self.root,
                normal_dir=_as_arguments(layout.normal),
                abnormal_dir=_as_arguments(layout.abnormal),
                normal_test_dir=_as_arguments(layout.normal_test),
                mask_dir=None,  # anomalib pairs masks by sorted position; matched by stem below instead
                extensions=layout.extensions,
            )
            samples = dataset.samples.copy()
            samples["mask_path"] = samples.image_path.map(masks).fillna("").astype(str)
            samples["defect"] = samples.image_path.map(defect_of).fillna("").astype(str)
            dataset.samples = samples
            dataset.samples.attrs["task"] = "segmentation" if masks else "classification"
            setattr(self, "train_data" if split == Split.TRAIN else "test_data", dataset)


class FolderFewAnomalies(FewAnomaliesMixin, Folder):
    """:class:`Folder` with a few labelled defective images moved from test to train (the semi-supervised setting).

    Args:
        anomalies_per_defect: images taken per abnormal folder (``k``; 1 in the paper), drawn with
            ``selection_seed``. Give one abnormal folder per defect type.
        anomalies: instead of drawing, the abnormal images to train on: file names (``042.png``), paths relative to
            ``root`` or absolute paths.
        keep_in_test: also keep them in the test set (the paper's runs did); by default they are removed, so they
            cannot inflate the test metrics.
        selection_seed: seed of the random choice; the same seed always picks the same files.
        anomaly_probability: chance that a training sample is replaced by one of the real anomalies.
        **kwargs: everything :class:`Folder` accepts; ``abnormal_dir`` and ``mask_dir`` are required.
    """

    def __init__(
        self,
        normal_dir: str | Path | Sequence[str | Path] | None = None,
        root: str | Path | None = None,
        abnormal_dir: str | Path | Sequence[str | Path] | None = None,
        mask_dir: str | Path | Sequence[str | Path] | None = None,
        anomalies_per_defect: int = 1,
        anomalies: Sequence[str] | None = None,
        keep_in_test: bool = False,
        selection_seed: int = 0,
        anomaly_probability: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if abnormal_dir is None or mask_dir is None:
            raise DatasetError(
                "FolderFewAnomalies needs abnormal_dir and mask_dir: the labelled defects it trains on come with masks."
            )
        if anomalies_per_defect < 1:
            raise ValueError(f"anomalies_per_defect must be at least 1, got {anomalies_per_defect}.")
        if anomalies is not None and (isinstance(anomalies, str) or not anomalies):
            raise ValueError(f"anomalies must be a non-empty list of file names, got {anomalies!r}.")
        super().__init__(normal_dir=normal_dir, root=root, abnormal_dir=abnormal_dir, mask_dir=mask_dir, **kwargs)
        self.init_few_anomalies(keep_in_test, anomaly_probability)
        self.anomalies_per_defect = anomalies_per_defect
        self.anomalies = list(anomalies) if anomalies is not None else None
        self.selection_seed = selection_seed

    def _setup(self, _stage: str | None = None) -> None:
        super()._setup(_stage)
        samples = self.test_data.samples
        if self.anomalies is not None:
            self.move_to_training(self._named(samples), f"{len(self.anomalies)} named images")
            return
        chosen = select_anomalies(samples, self.anomalies_per_defect, self.selection_seed, by="defect")
        self.move_to_training(chosen, f"seed {self.selection_seed}, {self.anomalies_per_defect} per abnormal folder")

    def _named(self, samples: pd.DataFrame) -> pd.DataFrame:
        """The test rows of the images named in ``anomalies`` (by file name, path relative to ``root``, or path)."""
        abnormal = samples[samples.label_index == 1]
        paths = [Path(p) for p in abnormal.image_path]
        base = Path(self.root).expanduser() if self.root is not None else Path.cwd()
        picked: list[int] = []
        for entry in dict.fromkeys(self.anomalies or []):
            target = (base / Path(entry).expanduser()).resolve()
            hits = [i for i, p in enumerate(paths) if p == target or p.resolve() == target]
            hits = hits or [i for i, p in enumerate(paths) if p.name == entry]
            if len(hits) != 1:
                problem = "matches no abnormal image" if not hits else f"matches {len(hits)} abnormal images"
                raise DatasetError(
                    f"anomalies entry {entry!r} {problem} in {', '.join(map(str, self.layout().abnormal))}; give its "
                    "file name, or its path relative to root when names repeat."
                )
            row = abnormal.iloc[hits[0]]
            if not row.mask_path:
                raise DatasetError(f"{row.image_path} (in anomalies) has no mask; the training anomalies need masks.")
            picked.append(abnormal.index[hits[0]])
        return samples.loc[picked]


def _as_arguments(folders: list[Path]) -> list[str] | None:
    """anomalib's folder arguments: a list of resolved paths, or ``None`` for none."""
    return [str(folder) for folder in folders] or None
