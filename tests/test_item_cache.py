"""Training items decoded once and kept in memory (``anomalib_fcdd.data.item_cache``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data.utils import Split
from lightning.pytorch import Callback
from torchvision.transforms import v2

from anomalib_fcdd.data import ImageDecodeError, MVTec, make_synthetic_mvtec
from anomalib_fcdd.data.datasets import DecodingMVTecDataset
from anomalib_fcdd.data.item_cache import (
    ALIGNMENT,
    BLOCK_BYTES,
    Arena,
    is_deterministic,
    restore,
    store,
    stored_bytes,
)

SIZE = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    make_synthetic_mvtec(folder, "part", n_train=6, n_test_good=2, n_test_defect=2, size=SIZE, seed=3)
    return folder


def training_set(root: Path, augmentations: object) -> DecodingMVTecDataset:
    dataset = DecodingMVTecDataset(split=Split.TRAIN, root=root, category="part")
    dataset.augmentations = augmentations
    return dataset


def test_only_fixed_maps_count_as_deterministic() -> None:
    resize = v2.Resize((32, 32))
    assert is_deterministic(None)
    assert is_deterministic(resize)
    assert is_deterministic(v2.Compose([resize, v2.Normalize([0.5] * 3, [0.5] * 3)]))
    assert not is_deterministic(v2.RandomHorizontalFlip())
    assert not is_deterministic(v2.Compose([resize, v2.RandomCrop(16)]))


def test_eight_bit_images_are_stored_as_levels_and_restored_exactly() -> None:
    levels = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0))
    image = levels.float() / 255
    item = store(image, torch.ones(5, 7, dtype=torch.uint8))
    assert item.levels and item.image.dtype == torch.uint8  # 105 bytes instead of 420
    restored, mask = restore(item)
    assert torch.equal(restored, image) and torch.equal(mask, torch.ones(5, 7, dtype=torch.uint8))
    restored.zero_()  # a caller's in-place change does not reach what is kept
    assert torch.equal(restore(item)[0], image)


def test_blank_masks_take_no_memory_and_come_back_as_zeros() -> None:
    image = torch.zeros(3, 5, 7)
    item = store(image, torch.zeros(5, 7, dtype=torch.bool))
    assert item.gt_mask is None and stored_bytes(item) == 3 * 5 * 7  # the 8-bit image alone
    _, mask = restore(item)
    assert mask.dtype == torch.bool and mask.shape == (5, 7) and not mask.any()
    mask[0, 0] = True  # a fresh tensor each time
    assert not restore(item)[1].any()
    one_pixel = torch.zeros(5, 7, dtype=torch.bool)
    one_pixel[4, 6] = True
    assert stored_bytes(store(image, one_pixel)) == 3 * 5 * 7 + 5 * 7  # a mask with an anomaly is kept


def test_other_images_are_stored_unchanged() -> None:
    image = torch.full((3, 4, 4), 0.3)  # 0.3 * 255 = 76.5: no 8-bit level
    item = store(image, None)
    assert not item.levels and item.image.dtype == torch.float32
    assert torch.equal(restore(item)[0], image) and restore(item)[1] is None


def test_kept_items_equal_decoded_ones_and_no_longer_need_the_files(root: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    dataset = training_set(copy, v2.Resize((32, 32), interpolation=v2.InterpolationMode.NEAREST))
    decoded = [dataset[i] for i in range(len(dataset))]
    dataset.keep_in_memory()
    for path in (copy / "part" / "train" / "good").iterdir():
        path.write_bytes(b"gone")  # any read from disk would now fail
    for index, expected in enumerate(decoded):
        item = dataset[index]
        assert torch.equal(item.image, expected.image) and torch.equal(item.gt_mask, expected.gt_mask)
        assert item.image.shape == (3, 32, 32) and item.image_path == expected.image_path
    dataset.augmentations = v2.Resize((16, 16))  # other augmentations: the kept items no longer apply
    with pytest.raises(ImageDecodeError, match="train/good"):
        dataset[0]


def test_memory_limit_keeps_whole_items_up_to_it(root: Path) -> None:
    dataset = training_set(root, v2.Resize((32, 32), interpolation=v2.InterpolationMode.NEAREST))
    per_item = 3 * 32 * 32  # 8-bit RGB levels; a normal image's blank mask is not kept
    dataset.keep_in_memory(limit_mb=3.5 * per_item / 2**20)
    assert sorted(dataset.item_cache.items) == [0, 1, 2]
    assert dataset.item_cache.size_bytes == 3 * per_item
    assert torch.equal(dataset[5].image, training_set(root, dataset.augmentations)[5].image)  # decoded as before


def test_random_augmentations_are_never_kept(root: Path) -> None:
    dataset = training_set(root, v2.Compose([v2.Resize((32, 32)), v2.RandomHorizontalFlip()]))
    dataset.keep_in_memory()
    assert dataset.item_cache is None


def test_filling_leaves_torch_random_stream_alone(root: Path) -> None:
    """A run must draw the same confetti with and without the cache."""
    dataset = training_set(root, v2.Resize((32, 32)))
    torch.manual_seed(7)
    dataset.keep_in_memory()
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.parametrize(("cache_mb", "kept"), [(None, 6), (0, None)])
def test_training_loader_keeps_the_training_set(root: Path, cache_mb: float | None, kept: int | None) -> None:
    options = {} if cache_mb is None else {"cache_mb": cache_mb}
    datamodule = MVTec(root=root, category="part", train_batch_size=4, num_workers=0, **options)
    datamodule.setup()
    datamodule.train_data.augmentations = v2.Resize((32, 32))
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape == (4, 3, 32, 32)
    cache = datamodule.train_data.item_cache
    assert (None if cache is None else len(cache.items)) == kept


def test_arena_packs_copies_into_shared_blocks() -> None:
    """Kept tensors live in 64 MiB blocks (their own mappings, returned to the system with the cache), each copy
    starting on a 64-byte boundary; a tensor larger than a block gets a copy of its own."""
    arena = Arena()
    first = torch.arange(100, dtype=torch.uint8).view(10, 10)
    second = torch.linspace(0, 1, 30).view(3, 10)
    copies = [arena.copy(first), arena.copy(second)]
    assert torch.equal(copies[0], first) and torch.equal(copies[1], second) and copies[1].dtype == torch.float32
    assert len(arena.blocks) == 1 and arena.blocks[0].numel() == BLOCK_BYTES
    assert copies[1].untyped_storage().data_ptr() == arena.blocks[0].untyped_storage().data_ptr()
    assert arena.used == 128 + 128  # 100 bytes and 120 bytes, each rounded up to the 64-byte alignment
    assert arena.used % ALIGNMENT == 0
    first.zero_()
    assert int(copies[0].sum()) == sum(range(100))  # a copy, not a view of the original
    huge = torch.empty(BLOCK_BYTES + 1, dtype=torch.uint8)
    assert arena.copy(huge).untyped_storage().data_ptr() != arena.blocks[0].untyped_storage().data_ptr()
    assert len(arena.blocks) == 1


def test_kept_images_are_dropped_when_training_ends(root: Path, tmp_path: Path) -> None:
    from anomalib.engine import Engine

    from anomalib_fcdd import FcddHsc

    datamodule = MVTec(root=root, category="part", train_batch_size=4, eval_batch_size=4, num_workers=0)
    kept: list[int] = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer: object, module: object, batch: object, batch_idx: int) -> None:
            kept.append(len(datamodule.train_data.item_cache.items))

    model = FcddHsc(backbone="efficientnet_lite0", pre_trained=False, image_size=32, epochs=1, passes_per_epoch=1)
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False,
                    callbacks=[Spy()], limit_val_batches=0)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    assert kept and set(kept) == {6}  # all 6 training images were served from memory
    assert datamodule.train_data.item_cache is None
