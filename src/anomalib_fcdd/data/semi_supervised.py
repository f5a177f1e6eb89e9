"""The paper's semi-supervised setting, for any of this package's datamodules.

A few real anomalous images (with masks) are taken out of the test set into a pool; during training each normal
image is replaced with probability ``anomaly_probability`` by one of them, drawn at random, exactly like the
reference's online supervisor. Batches carry ``gt_label`` / ``gt_mask``, and the FCDD model reads the datamodule's
``training_anomalies`` to use them instead of confetti.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DatasetError

logger = logging.getLogger(__name__)


class FewAnomaliesMixin:
    """Mixin for a :class:`~.base.CheckedDataModule`: move chosen test anomalies into training.

    Subclasses call :meth:`init_few_anomalies` in ``__init__`` and :meth:`move_to_training` at the end of ``_setup``.
    """

    train_data: Any
    test_data: Any

    def init_few_anomalies(self, keep_in_test: bool, anomaly_probability: float) -> None:
        """Store the options shared by every semi-supervised datamodule, refusing impossible values."""
        if not 0.0 <= anomaly_probability <= 1.0:
            raise ValueError(f"anomaly_probability must be in [0, 1], got {anomaly_probability}.")
        self.anomaly_probability = anomaly_probability
        self.keep_in_test = keep_in_test
        self.anomaly_data: Any = None
        self.training_anomalies: list[str] = []

    def move_to_training(self, chosen: pd.DataFrame, how: str) -> None:
        """Make the ``chosen`` test rows the anomaly pool and, unless ``keep_in_test``, drop them from the test set.

        Args:
            chosen: rows of ``test_data.samples`` (all anomalous, all with masks).
            how: how they were chosen, for the log line.
        """
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
            "Semi-supervised split (%s, %s test set): %s",
            how,
            "kept in" if self.keep_in_test else "removed from",
            self.training_anomalies,
        )

    def train_dataloader(self) -> DataLoader:
        """Normal images, each replaced with probability ``anomaly_probability`` by a random real anomaly."""
        # The anomaly pool was split off before anomalib attached the model's resize to the training set; share it so
        # that normal and anomalous images arrive at the same size.
        self.anomaly_data.augmentations = self.train_data.augmentations
        self.keep_in_memory(self.train_data, self.anomaly_data)  # type: ignore[attr-defined]
        dataset = ReplacingDataset(self.train_data, self.anomaly_data, self.anomaly_probability)
        return self._training_loader(dataset)  # type: ignore[attr-defined]


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


def select_anomalies(samples: pd.DataFrame, per_defect: int, seed: int, by: str = "label") -> pd.DataFrame:
    """Pick ``per_defect`` anomalous rows with masks per defect type (column ``by``), reproducibly for a seed.

    Raises:
        DatasetError: a defect type has fewer usable (masked) images than asked for, or none has masks.
    """
    if per_defect < 1:
        raise ValueError(f"anomalies_per_defect must be at least 1, got {per_defect}.")
    abnormal = samples[samples.label_index == 1]
    rng = np.random.default_rng(seed)
    picks = []
    for defect, rows in sorted(abnormal.groupby(by), key=lambda item: str(item[0])):
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
