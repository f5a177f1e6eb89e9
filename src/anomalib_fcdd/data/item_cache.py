"""Training items kept in memory: each image is decoded and resized once, not once per pass.

FCDD trains for hundreds of passes over a small training set. Decoding a 900 x 900 MVTec-AD PNG takes about 20 ms
of a CPU core, more than a training step spends on it, so the DataLoader workers re-decoding every image on every
pass competed with training for the same cores. Once the dataset's augmentations are deterministic (resizes and
other fixed maps only; FCDD's random augmentation runs on the batch, in the model), an item is the same on every
pass, so the datamodules keep the items in memory from their first training loader on (:class:`ItemCache`).

Memory stays bounded: items are kept only up to ``limit_mb`` (images stored as 8-bit levels wherever that is exact,
i.e. 173 kB for a 240 x 240 RGB image), and the rest are decoded on every pass as before. The cache belongs to the
dataset object; forked DataLoader workers share its pages with the main process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

logger = logging.getLogger(__name__)

#: Default ceiling (MB) of the memory the kept training items may take (``cache_mb`` of the datamodules).
DEFAULT_CACHE_MB = 1024
#: Transforms whose output depends on their input alone.
DETERMINISTIC_TRANSFORMS = (v2.Resize, v2.CenterCrop, v2.Normalize, v2.ToDtype, v2.Identity)


def is_deterministic(augmentations: Callable[..., Any] | None) -> bool:
    """Whether ``augmentations`` maps an input to the same output every time: none, a transform of
    :data:`DETERMINISTIC_TRANSFORMS`, or a ``Compose`` of such transforms."""
    if augmentations is None or isinstance(augmentations, DETERMINISTIC_TRANSFORMS):
        return True
    if isinstance(augmentations, v2.Compose):
        return all(is_deterministic(transform) for transform in augmentations.transforms)
    return False


#: Kept tensors are packed into blocks of this size: above glibc's largest mmap threshold (32 MiB), so each block is
#: a mapping of its own that goes back to the system with the cache. Thousands of separate 200 kB tensors would sit
#: among the heap's other allocations and pin it: a benchmark process kept 2.5 GB more after a Magnetic-Tile run.
BLOCK_BYTES = 64 * 2**20
#: Start of every packed tensor, in bytes (a multiple of every element size).
ALIGNMENT = 64


class Arena:
    """Copies of tensors packed into :data:`BLOCK_BYTES` blocks (a tensor larger than a block gets its own copy).

    Untouched pages of a block are never made resident, so a half-used block costs only its used part.
    """

    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] = []
        self.used = BLOCK_BYTES

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` (same dtype and shape) inside the arena."""
        size = tensor.numel() * tensor.element_size()
        if size > BLOCK_BYTES:
            return tensor.clone()
        if self.used + size > BLOCK_BYTES:
            self.blocks.append(torch.empty(BLOCK_BYTES, dtype=torch.uint8))
            self.used = 0
        packed = self.blocks[-1][self.used : self.used + size].view(tensor.dtype).view(tensor.shape)
        self.used += -(-size // ALIGNMENT) * ALIGNMENT
        return packed.copy_(tensor)


class StoredItem(NamedTuple):
    """An item's tensors as kept: the image as 8-bit levels (exact) or as it was, the mask as it was.

    A mask without a single anomalous pixel (every normal training image's) is not kept, only its shape and dtype
    (``blank_mask``): it would take a quarter of a normal item's memory to say nothing.
    """

    image: torch.Tensor
    levels: bool
    gt_mask: torch.Tensor | None
    blank_mask: tuple[torch.Size, torch.dtype] | None = None


def store(image: torch.Tensor, gt_mask: torch.Tensor | None, arena: Arena | None = None) -> StoredItem:
    """``image`` (float in [0, 1]) as uint8 levels when ``levels / 255`` gives it back exactly, else unchanged; both
    copied into ``arena`` (a fresh one if none is given). An all-zero mask is kept as its shape and dtype only."""
    arena = arena or Arena()
    mask, blank = None, None
    if gt_mask is not None and not bool(gt_mask.any()):
        blank = (gt_mask.shape, gt_mask.dtype)
    elif gt_mask is not None:
        mask = arena.copy(gt_mask.as_subclass(torch.Tensor))
    image = image.as_subclass(torch.Tensor)
    levels = torch.round(image * 255)
    if image.dtype == torch.float32 and torch.equal(levels / 255, image):
        return StoredItem(arena.copy(levels.to(torch.uint8)), True, mask, blank)
    return StoredItem(arena.copy(image.contiguous()), False, mask, blank)


def restore(item: StoredItem) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image and mask :func:`store` was given (fresh tensors: a caller may change them in place)."""
    image = item.image.float().div_(255) if item.levels else item.image.clone()
    if item.blank_mask is not None:
        return image, torch.zeros(item.blank_mask[0], dtype=item.blank_mask[1])
    return image, None if item.gt_mask is None else item.gt_mask.clone()


def stored_bytes(item: StoredItem) -> int:
    """Memory one stored item takes."""
    mask = 0 if item.gt_mask is None else item.gt_mask.numel() * item.gt_mask.element_size()
    return item.image.numel() * item.image.element_size() + mask


class ItemCache:
    """Items of one dataset, valid while its ``samples`` and ``augmentations`` stay the objects they were.

    Args:
        samples: the dataset's sample table when the items were made.
        augmentations: the dataset's augmentations when the items were made.
    """

    def __init__(self, samples: Any, augmentations: Any) -> None:
        self.samples = samples
        self.augmentations = augmentations
        self.items: dict[int, StoredItem] = {}
        self.size_bytes = 0
        self.arena = Arena()

    def valid_for(self, dataset: Any) -> bool:
        """Whether the items still are what ``dataset`` would decode (same rows, same augmentations)."""
        return dataset.samples is self.samples and dataset.augmentations is self.augmentations


class _Decoded(Dataset):
    """``(index, image, mask)`` of a dataset's items decoded afresh: what the workers filling a cache return."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        image, gt_mask = self.dataset.decode_item(index)
        return index, image, gt_mask


def fill_cache(dataset: Any, limit_mb: float, num_workers: int = 0) -> ItemCache | None:
    """Decode ``dataset``'s items (in ``num_workers`` processes) into a new :class:`ItemCache`, up to ``limit_mb``.

    ``None`` (nothing kept) when the limit is 0, the dataset is empty or its augmentations are random: then every pass
    must decode afresh.
    """
    if limit_mb <= 0 or len(dataset) == 0:
        return None
    if not is_deterministic(dataset.augmentations):
        logger.info("Training images are decoded on every pass: the dataset's augmentations are random.")
        return None
    cache = ItemCache(dataset.samples, dataset.augmentations)
    limit_bytes, started = limit_mb * 2**20, time.perf_counter()
    # A generator of its own: the workers' seeds would otherwise be drawn from torch's global RNG, and a run with the
    # cache would draw different confetti than one without it.
    loader = DataLoader(_Decoded(dataset), batch_size=None, num_workers=num_workers, generator=torch.Generator())
    for index, image, gt_mask in loader:
        item = store(image, gt_mask, cache.arena)  # past the limit, this one copy is all the arena wastes
        if cache.size_bytes + stored_bytes(item) > limit_bytes:
            logger.info(
                "Kept %d of %d training images in memory (cache_mb=%g reached); the rest are decoded on every pass.",
                len(cache.items),
                len(dataset),
                limit_mb,
            )
            break
        cache.items[index] = item
        cache.size_bytes += stored_bytes(item)
    logger.info(
        "%d training images decoded once and kept in memory (%.0f MB, %.1f s).",
        len(cache.items),
        cache.size_bytes / 2**20,
        time.perf_counter() - started,
    )
    return cache
