"""What this package's datamodules share: the up-front dataset check and DataLoaders suited to FCDD's training.

:class:`CheckedDataModule` is a mixin for an anomalib ``AnomalibDataModule``: ``prepare_data()`` (which
``anomalib-fcdd`` calls before anomalib opens a results folder, and Lightning calls before training) and ``setup()``
run the subclass's :meth:`~CheckedDataModule.validate_dataset` once; since FCDD trains for hundreds of short passes,
the loaders keep their workers alive across epochs and the training images are decoded once and kept in memory
(:mod:`.item_cache`, up to ``cache_mb``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .item_cache import DEFAULT_CACHE_MB

#: Most DataLoader workers used by default; more rarely pays off for small images and costs host memory.
MAX_DEFAULT_WORKERS = 8


def default_num_workers() -> int:
    """The machine's cores, at most :data:`MAX_DEFAULT_WORKERS` (anomalib's fixed 8 oversubscribes small machines)."""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


class RepeatedPassesSampler(Sampler[int]):
    """``passes`` passes over ``size`` items shuffled as one: a permutation of ``passes`` copies of the indices.

    The reference FCDD code builds a paper epoch this way (the training set repeated 10 times, shuffled together and
    cut into batches), so batches cross pass boundaries and only the epoch's last batch is partial. The permutation
    comes from torch's global RNG, as ``RandomSampler``'s does, so ``seed_everything`` makes it reproducible.
    """

    def __init__(self, size: int, passes: int) -> None:
        self.size, self.passes = size, passes

    def __len__(self) -> int:
        return self.size * self.passes

    def __iter__(self) -> Iterator[int]:
        yield from (torch.randperm(self.size * self.passes) % self.size).tolist()


class CheckedDataModule:
    """Mixin: check the dataset once before use, and serve it with persistent workers.

    Subclasses set ``validate`` (bool) and ``_validated = False`` in ``__init__``, implement
    :meth:`validate_dataset`, and call :meth:`check_dataset` at the start of ``_setup``.
    """

    validate: bool
    _validated: bool
    #: Passes over the training set that one epoch of the training loader shuffles together (see
    #: :class:`RepeatedPassesSampler`); FCDD sets it to its ``passes_per_epoch`` for a paper-epoch budget.
    passes_per_loader: int = 1
    #: Memory (MB) the training items decoded once and kept may take; 0 decodes every image on every pass.
    cache_mb: float = DEFAULT_CACHE_MB
    num_workers: int
    train_batch_size: int
    eval_batch_size: int
    train_data: Any
    val_data: Any
    external_collate_fn: Any

    def validate_dataset(self) -> None:
        """Check what is on disk; raise a :class:`~.errors.DatasetError` naming the file and the fix."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Check the dataset (nothing is downloaded)."""
        self.check_dataset()

    def check_dataset(self) -> None:
        """Run :meth:`validate_dataset` once, unless ``validate=False``."""
        if self.validate and not self._validated:
            self.validate_dataset()
            self._validated = True

    def train_dataloader(self) -> DataLoader:
        """Shuffled passes over the normal training images (kept in memory after their first decoding)."""
        self.keep_in_memory(self.train_data)
        return self._training_loader(self.train_data)

    def teardown(self, stage: str | None = None) -> None:
        """When training ends, drop the kept training images: whoever still holds the datamodule (a notebook, a loop
        over categories) does not hold them too."""
        if stage in {"fit", None}:
            for dataset in (getattr(self, "train_data", None), getattr(self, "anomaly_data", None)):
                if getattr(dataset, "item_cache", None) is not None:
                    dataset.item_cache = None
        super().teardown(stage)  # type: ignore[misc]

    def keep_in_memory(self, *datasets: Any) -> None:
        """Decode each of ``datasets`` once, now, and serve it from memory (:mod:`.item_cache`; up to ``cache_mb``
        each). Datasets that cannot keep their items (not this package's, or random augmentations) are left as they
        are."""
        for dataset in datasets:
            if hasattr(dataset, "keep_in_memory"):
                dataset.keep_in_memory(self.cache_mb, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """The validation images in anomalib's order, from workers that outlive each validation."""
        if len(self.val_data) == 0:
            return super().val_dataloader()  # type: ignore[misc]
        return self._loader(self.val_data, self.eval_batch_size, shuffle=False)

    def _training_loader(self, dataset: Dataset) -> DataLoader:
        """``passes_per_loader`` shuffled passes per epoch (one plain shuffled pass by default)."""
        if self.passes_per_loader == 1:
            return self._loader(dataset, self.train_batch_size, shuffle=True)
        sampler = RepeatedPassesSampler(len(dataset), self.passes_per_loader)  # type: ignore[arg-type]
        return self._loader(dataset, self.train_batch_size, shuffle=False, sampler=sampler)

    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, sampler: Sampler[int] | None = None
    ) -> DataLoader:
        """A ``DataLoader`` whose workers persist across epochs (FCDD runs hundreds of short passes)."""
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.external_collate_fn or getattr(dataset, "collate_fn", self.train_data.collate_fn),
        )
