"""anomalib's image datasets, reading files through :mod:`.decode` instead of ``anomalib.data.utils.read_image``.

anomalib's ``AnomalibDataset.__getitem__`` calls the module-level ``read_image``/``read_mask`` and offers no hook to
change them, so :class:`DecodingDataset` repeats its 40 lines with the two reads swapped; everything else (masks for
normal images, augmentations on image and mask together, the ``ImageItem`` it returns) is the same.
"""

from __future__ import annotations

import torch
from anomalib import TaskType
from anomalib.data import ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.datasets.image.folder import FolderDataset
from anomalib.data.datasets.image.mvtecad import MVTecADDataset
from anomalib.data.utils import LabelName
from torchvision.tv_tensors import Image as ImageTensor
from torchvision.tv_tensors import Mask

from .decode import decode_image_tensor, decode_mask
from .item_cache import DEFAULT_CACHE_MB, ItemCache, fill_cache, restore


class DecodingDataset(AnomalibDataset):
    """Mixin for an anomalib image dataset: images and masks are decoded by :mod:`.decode` (16-bit, EXIF...), and
    the items can be kept in memory across passes (:meth:`keep_in_memory`)."""

    #: Items decoded once and kept (:mod:`.item_cache`); ``None`` until :meth:`keep_in_memory` fills it.
    item_cache: ItemCache | None = None

    def keep_in_memory(self, limit_mb: float = DEFAULT_CACHE_MB, num_workers: int = 0) -> None:
        """Decode every item now (up to ``limit_mb`` of them) and serve those from memory from then on; a no-op while
        a cache for the current samples and augmentations exists. Random augmentations keep decoding on every pass."""
        if self.item_cache is None or not self.item_cache.valid_for(self):
            self.item_cache = fill_cache(self, limit_mb, num_workers)

    def decode_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image and mask of item ``index`` read from disk and augmented: what ``__getitem__`` returns in its item."""
        row = self.samples.iloc[index]
        image = ImageTensor(decode_image_tensor(row.image_path))
        segmentation = self.task == TaskType.SEGMENTATION
        gt_mask = None
        if segmentation and row.label_index == LabelName.NORMAL:
            gt_mask = Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
        elif segmentation and row.label_index == LabelName.ABNORMAL:
            gt_mask = Mask(decode_mask(row.mask_path).to(torch.uint8))
        if self.augmentations:
            if segmentation:
                # UNKNOWN samples get a zero mask for the transform only; their gt_mask stays None
                temporary = gt_mask if gt_mask is not None else Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
                image, augmented = self.augmentations(image, temporary)
                gt_mask = augmented if gt_mask is not None else None
            else:
                image = self.augmentations(image)
        return image, gt_mask

    def __getitem__(self, index: int) -> ImageItem:
        """The item anomalib would return, with the image read by :func:`.decode.decode_image_tensor` (or kept)."""
        cache = self.item_cache
        if cache is not None and index in cache.items and cache.valid_for(self):
            image, gt_mask = restore(cache.items[index])
            image, gt_mask = ImageTensor(image), None if gt_mask is None else Mask(gt_mask)
        else:
            image, gt_mask = self.decode_item(index)
        row = self.samples.iloc[index]
        gt_label = None if row.label_index == LabelName.UNKNOWN else torch.tensor(row.label_index)
        return ImageItem(
            image=image, gt_mask=gt_mask, gt_label=gt_label, image_path=row.image_path, mask_path=row.mask_path
        )


class DecodingMVTecDataset(DecodingDataset, MVTecADDataset):
    """anomalib's MVTec-AD dataset, decoded by :mod:`.decode`."""

    @property
    def name(self) -> str:
        """anomalib's name for the dataset (it names the results folder when no datamodule is given)."""
        return "MVTecAD"


class DecodingFolderDataset(DecodingDataset, FolderDataset):
    """anomalib's folder dataset, decoded by :mod:`.decode`."""
