"""MVTec-AD datamodules for FCDD: a checked :class:`MVTec` and the semi-supervised :class:`MVTecFewAnomalies`.

``MVTec`` is anomalib's ``MVTecAD`` with three changes: the dataset is checked before use (see
:mod:`.validation`), a missing dataset is an error rather than an attempted download, unless ``download=True``, and
images are decoded by :mod:`.decode` (16-bit PNGs scaled, not clipped; EXIF orientation applied) like everywhere else
in this package. It is what ``anomalib-fcdd ... --data MVTec`` selects.

``MVTecFewAnomalies`` implements the paper's semi-supervised setting: ``k`` real anomalous test images per defect
type, with their masks, are taken out of the test set (``k = 1`` in the paper). During training each normal image is
replaced with probability ``anomaly_probability`` (0.5) by one of them, drawn at random, exactly like the reference's
online supervisor; batches carry ``gt_label`` / ``gt_mask`` and FCDD uses those instead of confetti.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from anomalib.data import MVTecAD
from anomalib.data.utils import Split

from .base import CheckedDataModule, default_num_workers
from .datasets import DecodingMVTecDataset
from .item_cache import DEFAULT_CACHE_MB
from .semi_supervised import FewAnomaliesMixin, ReplacingDataset, select_anomalies
from .validation import validate_mvtec_layout

logger = logging.getLogger(__name__)

__all__ = ["MVTec", "MVTecFewAnomalies", "ReplacingDataset", "select_anomalies"]


class MVTec(CheckedDataModule, MVTecAD):
    """anomalib's ``MVTecAD`` with an up-front dataset check, no implicit download and this package's image decoding.

    Args:
        num_workers: DataLoader workers; ``None`` (default) uses the machine's cores, at most 8.
        download: fetch MVTec-AD when ``root/category`` is missing (needs internet). Off by default, so a wrong path
            is reported instead of starting a 5 GB download.
        cache_mb: memory (MB) the training images may take once decoded and kept for the following passes
            (:mod:`.item_cache`); 0 decodes every image on every pass.
        validate: check the layout, images and masks before training (a few seconds per category).
        **kwargs: everything ``anomalib.data.MVTecAD`` accepts.
    """

    def __init__(
        self,
        root: Path | str | None = "./datasets/MVTecAD",
        category: str = "bottle",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int | None = None,
        download: bool = False,
        validate: bool = True,
        cache_mb: float = DEFAULT_CACHE_MB,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root,
            category=category,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=default_num_workers() if num_workers is None else num_workers,
            **kwargs,
        )
        self.download = download
        self.validate = validate
        self.cache_mb = cache_mb
        self._validated = False

    def prepare_data(self) -> None:
        """Download only when asked; otherwise check what is on disk."""
        if self.download and not (self.root / self.category).is_dir():
            MVTecAD.prepare_data(self)
        self.check_dataset()

    def validate_dataset(self) -> None:
        """Check ``root/category`` (see :func:`.validation.validate_mvtec_layout`)."""
        summary = validate_mvtec_layout(self.root, self.category)
        logger.info(
            "Dataset %s: %d training images, test images %s",
            self.root / self.category,
            summary.train_images,
            summary.test_images,
        )

    def _setup(self, _stage: str | None = None) -> None:
        self.check_dataset()
        self.train_data = DecodingMVTecDataset(split=Split.TRAIN, root=self.root, category=self.category)
        self.test_data = DecodingMVTecDataset(split=Split.TEST, root=self.root, category=self.category)


class MVTecFewAnomalies(FewAnomaliesMixin, MVTec):
    """MVTec with ``k`` real anomalies per defect type moved from test to train (the paper's semi-supervised setting).

    Args:
        anomalies_per_defect: images moved per defect type (``k``; 1 in the paper).
        keep_in_test: also keep the moved images in the test set, as the paper's published runs did.
            By default they are removed, so they cannot inflate the test metrics.
        selection_seed: seed of the random choice; the same seed always picks the same files.
        anomaly_probability: chance that a training sample is replaced by one of the real anomalies.
        **kwargs: everything :class:`MVTec` accepts.
    """

    def __init__(
        self,
        root: Path | str | None = "./datasets/MVTecAD",
        category: str = "bottle",
        anomalies_per_defect: int = 1,
        keep_in_test: bool = False,
        selection_seed: int = 0,
        anomaly_probability: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, category=category, **kwargs)
        if anomalies_per_defect < 1:
            raise ValueError(f"anomalies_per_defect must be at least 1, got {anomalies_per_defect}.")
        self.init_few_anomalies(keep_in_test, anomaly_probability)
        self.anomalies_per_defect = anomalies_per_defect
        self.selection_seed = selection_seed

    def _setup(self, _stage: str | None = None) -> None:
        super()._setup(_stage)
        chosen = select_anomalies(self.test_data.samples, self.anomalies_per_defect, self.selection_seed)
        self.move_to_training(chosen, f"seed {self.selection_seed}, {self.anomalies_per_defect} per defect type")
