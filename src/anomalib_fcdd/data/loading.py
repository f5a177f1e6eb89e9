"""A training loader whose workers keep decoding across epoch boundaries.

FCDD trains for hundreds of short passes (50 paper epochs x 10 passes; one MVTec category holds 60-400 images). A
plain ``DataLoader`` drains at the end of every pass: the next pass starts only when its first batch has been decoded
from scratch by a single worker, while the other workers and the accelerator wait. At the paper's batch of 128 on a
GPU that wait (one worker decoding 128 full-size images) costs more than the pass's compute.

:class:`ContinuousPassLoader` runs *one* ``DataLoader`` iterator over an endless stream of passes and hands it to
Lightning one pass at a time, so the workers prefetch the next pass while the current one trains. Every epoch is
still exactly one pass, batched like a shuffled ``DataLoader`` epoch (a fresh permutation, ``ceil(n / batch_size)``
batches, the last one partial), and the number of epochs, the learning-rate schedule and the validation cadence keep
their meaning. Nothing is cached: the workers hold at most ``prefetch_factor`` batches each, as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class PassBatchSampler(Sampler[list[int]]):
    """Endless batches of dataset indices, one pass after the other.

    Each pass is a new permutation (or ``0 .. n-1`` without shuffling) cut into ``batch_size`` chunks; the last chunk
    of a pass is partial unless ``drop_last``. The permutations come from a generator seeded, when iteration starts,
    from torch's global RNG -- as ``RandomSampler`` does -- so ``seed_everything`` makes the stream reproducible.
    """

    def __init__(self, dataset_size: int, batch_size: int, shuffle: bool = True, drop_last: bool = False) -> None:
        if dataset_size < 1:
            raise ValueError("The dataset is empty (0 images): there is nothing to load. Check the data folder.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if drop_last and dataset_size < batch_size:
            raise ValueError(
                f"drop_last with batch_size {batch_size} and only {dataset_size} training images gives no batch; "
                "lower the batch size or keep the partial batch."
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last

    @property
    def batches_per_pass(self) -> int:
        """Batches in one pass over the dataset."""
        if self.drop_last:
            return self.dataset_size // self.batch_size
        return math.ceil(self.dataset_size / self.batch_size)

    def __len__(self) -> int:
        """Batches per pass (the stream itself never ends)."""
        return self.batches_per_pass

    def __iter__(self) -> Iterator[list[int]]:
        generator = None
        if self.shuffle:  # an unshuffled stream leaves the global RNG alone
            generator = torch.Generator()
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        stop = self.batches_per_pass * self.batch_size
        while True:
            if generator is not None:
                order = torch.randperm(self.dataset_size, generator=generator)
            else:
                order = torch.arange(self.dataset_size)
            for start in range(0, stop, self.batch_size):
                yield order[start : start + self.batch_size].tolist()


class ContinuousPassLoader:
    """Iterate one pass over ``dataset`` per ``iter()``, from a ``DataLoader`` whose workers never stop in between.

    Args:
        dataset: the training dataset.
        batch_size, shuffle, drop_last: batching of each pass (see :class:`PassBatchSampler`).
        num_workers, collate_fn, pin_memory, **loader_kwargs: passed to the underlying ``DataLoader``.

    An epoch that stops early (``limit_train_batches``, a stop signal) leaves the stream mid-pass; the next ``iter()``
    then restarts the workers so that it still begins a whole pass.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        **loader_kwargs: Any,
    ) -> None:
        if not isinstance(dataset, Sized):
            raise TypeError(f"ContinuousPassLoader needs a dataset with a length, got {type(dataset).__name__}.")
        self.batch_sampler = PassBatchSampler(len(dataset), batch_size, shuffle, drop_last)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            **loader_kwargs,
        )
        self._stream: Iterator[Any] | None = None
        self._position = 0  # batches of the current pass already handed out

    @property
    def dataset(self) -> Dataset:
        """The training dataset (as on a ``DataLoader``)."""
        return self.loader.dataset

    @property
    def batch_size(self) -> int:
        """Images per batch (the last batch of a pass may hold fewer)."""
        return self.batch_sampler.batch_size

    @property
    def num_workers(self) -> int:
        """Decoding worker processes."""
        return self.loader.num_workers

    def __len__(self) -> int:
        """Batches per pass, i.e. per epoch."""
        return self.batch_sampler.batches_per_pass

    def __iter__(self) -> Iterator[Any]:
        if self._stream is None or self._position != 0:
            self.close()
            self._stream = iter(self.loader)
        return self._one_pass(self._stream)

    def _one_pass(self, stream: Iterator[Any]) -> Iterator[Any]:
        for _ in range(len(self)):
            batch = next(stream)
            self._position = (self._position + 1) % len(self)
            yield batch

    def close(self) -> None:
        """Stop the workers (they also stop when the loader is garbage-collected)."""
        stream, self._stream, self._position = self._stream, None, 0
        if stream is not None and hasattr(stream, "_shutdown_workers"):
            stream._shutdown_workers()  # DataLoader's own clean-up, also run by its __del__
