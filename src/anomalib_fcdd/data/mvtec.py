"""MVTec-AD datamodules for FCDD: a checked :class:`MVTec` and the semi-supervised :class:`MVTecFewAnomalies`.

``MVTec`` is anomalib's ``MVTecAD`` with two changes: the dataset is checked before use (see
:mod:`.validation`), and a missing dataset is an error rather than an attempted download, unless ``download=True``.
It is what ``anomalib-fcdd ... --data MVTec`` selects.

``MVTecFewAnomalies`` implements the paper's semi-supervised setting: ``k`` real anomalous test images per defect
type, with their masks, are taken out of the test set (``k = 1`` in the paper). During training each normal image is
replaced with probability ``anomaly_probability`` (0.5) by one of them, drawn at random, exactly like the reference's
online supervisor; batches carry ``gt_label`` / ``gt_mask`` and FCDD uses those instead of confetti.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anomalib.data import MVTecAD
from torch.utils.data import DataLoader, Dataset

from .validation import DatasetError, validate_mvtec_layout

logger = logging.getLogger(__name__)


class MVTec(MVTecAD):
    """anomalib's ``MVTecAD`` with an up-front dataset check and no implicit download.

    Args:
        download: fetch MVTec-AD when ``root/category`` is missing (needs internet). Off by default, so a wrong path
            is reported instead of starting a 5 GB download.
        validate: check the layout, images and masks before training (a few seconds per category).
        **kwargs: everything ``anomalib.data.MVTecAD`` accepts.
    """

    def __init__(
        self,
        root: Path | str | None = "./datasets/MVTecAD",
        category: str = "bottle",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        download: bool = False,
        validate: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root,
            category=category,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            **kwargs,
        )
        self.download = download
        self.validate = validate
        self._validated = False

    def prepare_data(self) -> None:
        """Download only when asked; otherwise check what is on disk."""
        if self.download and not (self.root / self.category).is_dir():
            super().prepare_data()
        self._check()

    def _check(self) -> None:
        if self.validate and not self._validated:
            summary = validate_mvtec_layout(self.root, self.category)
            logger.info(
                "Dataset %s: %d training images, test images %s",
                self.root / self.category,
                summary.train_images,
                summary.test_images,
            )
            self._validated = True

    def _setup(self, _stage: str | None = None) -> None:
        self._check()
        super()._setup(_stage)

    def train_dataloader(self) -> DataLoader:
        """Shuffled passes over the normal training images."""
        return self._training_loader(self.train_data)

    def val_dataloader(self) -> DataLoader:
        """The validation images in anomalib's order, from workers that outlive each validation."""
        if len(self.val_data) == 0:
            return super().val_dataloader()
        return self._loader(self.val_data, self.eval_batch_size, shuffle=False)

    def _training_loader(self, dataset: Dataset) -> DataLoader:
        return self._loader(dataset, self.train_batch_size, shuffle=True)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        """A ``DataLoader`` whose workers persist across epochs (FCDD runs hundreds of short passes)."""
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.external_collate_fn or getattr(dataset, "collate_fn", self.train_data.collate_fn),
        )


class MVTecFewAnomalies(MVTec):
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
        if not 0.0 <= anomaly_probability <= 1.0:
            raise ValueError(f"anomaly_probability must be in [0, 1], got {anomaly_probability}.")
        self.anomaly_probability = anomaly_probability
        self.anomaly_data: Any = None
        self.anomalies_per_defect = anomalies_per_defect
        self.keep_in_test = keep_in_test
        self.selection_seed = selection_seed
        self.training_anomalies: list[str] = []

    def _setup(self, _stage: str | None = None) -> None:
        super()._setup(_stage)
        chosen = select_anomalies(self.test_data.samples, self.anomalies_per_defect, self.selection_seed)
        self.anomaly_data = copy.deepcopy(self.train_data)
        pool = chosen.assign(split="train").reset_index(drop=True)
        pool.attrs["task"] = "segmentation"
        self.anomaly_data.samples = pool
        if not self.keep_in_test:
            remaining = self.test_data.samples.drop(index=chosen.index).reset_index(drop=True)
            remaining.attrs.update(self.test_data.samples.attrs)
            self.test_data.samples = remaining
        self.training_anomalies = list(chosen.image_path)
        logger.info(
            "Semi-supervised split (seed %d, %d per defect type, %s test set): %s",
            self.selection_seed,
            self.anomalies_per_defect,
            "kept in" if self.keep_in_test else "removed from",
            self.training_anomalies,
        )

    def train_dataloader(self) -> DataLoader:
        """Normal images, each replaced with probability ``anomaly_probability`` by a random real anomaly."""
        # The anomaly pool was split off before anomalib attached the model's resize to the training set; share it so
        # that normal and anomalous images arrive at the same size.
        self.anomaly_data.augmentations = self.train_data.augmentations
        return self._training_loader(ReplacingDataset(self.train_data, self.anomaly_data, self.anomaly_probability))


class ReplacingDataset(Dataset):
    """``normal[i]``, or with probability ``probability`` a uniformly drawn item of ``anomalies`` instead.

    The draw uses torch's global RNG, which Lightning seeds and DataLoader workers derive from, so runs under
    ``seed_everything`` are reproducible. The anomalous item keeps its real label and mask.
    """

    def __init__(self, normal: Dataset, anomalies: Dataset, probability: float) -> None:
        self.normal = normal
        self.anomalies = anomalies
        self.probability = probability

    def __len__(self) -> int:
        return len(self.normal)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if len(self.anomalies) and torch.rand(()).item() < self.probability:  # type: ignore[arg-type]
            return self.anomalies[int(torch.randint(len(self.anomalies), ()).item())]  # type: ignore[arg-type]
        return self.normal[index]


def select_anomalies(samples: pd.DataFrame, per_defect: int, seed: int) -> pd.DataFrame:
    """Pick ``per_defect`` anomalous rows with masks per defect label, reproducibly for a given seed.

    Raises:
        DatasetError: a defect type has fewer usable (masked) images than asked for, or none has masks.
    """
    abnormal = samples[samples.label_index == 1]
    rng = np.random.default_rng(seed)
    picks = []
    for defect, rows in sorted(abnormal.groupby("label"), key=lambda item: str(item[0])):
        masked = rows[rows.mask_path.fillna("").astype(str) != ""]
        if masked.empty:
            raise DatasetError(
                f"Defect type {defect!r} has no test images with masks (e.g. {rows.image_path.iloc[0]}); the "
                "semi-supervised setting needs pixel masks for the training anomalies."
            )
        if len(masked) < per_defect:
            raise DatasetError(
                f"Defect type {defect!r} has only {len(masked)} masked images, fewer than the "
                f"{per_defect} asked for (anomalies_per_defect). Lower it to at most {len(masked)}."
            )
        picks.append(masked.iloc[np.sort(rng.choice(len(masked), size=per_defect, replace=False))])
    if not picks:
        raise DatasetError("The test set has no anomalous images to move into training.")
    return pd.concat(picks)
