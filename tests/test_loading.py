"""The continuous-pass training loader: every epoch one whole shuffled pass, workers kept across epochs."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, Dataset

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.data import ContinuousPassLoader, MVTec, PassBatchSampler, make_synthetic_mvtec


class IndexAndProcess(Dataset):
    """Item ``i`` is ``(i, pid of the process that loaded it)``."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, os.getpid()


def _indices(batches: list) -> list[int]:
    return [int(i) for indices, _ in batches for i in indices]


def test_each_pass_is_a_fresh_permutation_in_reference_batches() -> None:
    torch.manual_seed(0)
    stream = iter(PassBatchSampler(10, 4))
    passes = [[next(stream) for _ in range(3)] for _ in range(3)]
    for batches in passes:
        assert [len(batch) for batch in batches] == [4, 4, 2]
        assert sorted(i for batch in batches for i in batch) == list(range(10))
    assert passes[0] != passes[1] != passes[2]
    torch.manual_seed(0)
    again = iter(PassBatchSampler(10, 4))
    assert [next(again) for _ in range(3)] == passes[0]


def test_unshuffled_and_drop_last_passes() -> None:
    rng_state = torch.get_rng_state()
    stream = iter(PassBatchSampler(10, 4, shuffle=False, drop_last=True))
    assert [next(stream) for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(torch.get_rng_state(), rng_state), "an unshuffled stream must not draw from the global RNG"
    assert len(PassBatchSampler(10, 4, drop_last=True)) == 2
    assert len(PassBatchSampler(10, 4)) == 3


def test_bad_sizes_are_reported() -> None:
    with pytest.raises(ValueError, match="empty"):
        PassBatchSampler(0, 4)
    with pytest.raises(ValueError, match="drop_last"):
        PassBatchSampler(3, 4, drop_last=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_epoch_is_one_whole_pass(num_workers: int) -> None:
    torch.manual_seed(0)
    loader = ContinuousPassLoader(IndexAndProcess(), batch_size=4, num_workers=num_workers)
    assert len(loader) == 3
    epochs = [list(loader) for _ in range(3)]
    for batches in epochs:
        assert [len(indices) for indices, _ in batches] == [4, 4, 2]
        assert Counter(_indices(batches)) == Counter(range(10))
    assert _indices(epochs[0]) != _indices(epochs[1])
    loader.close()


def test_workers_keep_running_across_epochs() -> None:
    """Three epochs are decoded by the same two worker processes; a plain DataLoader forks two new ones per epoch."""
    continuous = ContinuousPassLoader(IndexAndProcess(), batch_size=2, num_workers=2)
    plain = DataLoader(IndexAndProcess(), batch_size=2, num_workers=2, shuffle=True)
    continuous_pids = {int(pid) for _ in range(3) for _, pids in continuous for pid in pids}
    plain_pids = {int(pid) for _ in range(3) for _, pids in plain for pid in pids}
    assert len(continuous_pids) == 2
    assert len(plain_pids) == 6
    assert os.getpid() not in continuous_pids
    continuous.close()


def test_an_epoch_stopped_early_is_followed_by_a_whole_pass() -> None:
    torch.manual_seed(0)
    loader = ContinuousPassLoader(IndexAndProcess(), batch_size=4)
    first = iter(loader)
    next(first)  # e.g. limit_train_batches=1
    assert Counter(_indices(list(loader))) == Counter(range(10))
    assert Counter(_indices(list(loader))) == Counter(range(10))


def test_mvtec_trains_from_the_continuous_loader(tmp_path: Path) -> None:
    make_synthetic_mvtec(tmp_path, category="bottle", n_train=5, n_test_good=2, n_test_defect=2, size=32)
    datamodule = MVTec(root=tmp_path, category="bottle", train_batch_size=2, num_workers=0)
    datamodule.setup()
    loader = datamodule.train_dataloader()
    assert isinstance(loader, ContinuousPassLoader)
    assert [len(batch.image) for batch in loader] == [2, 2, 1]
    plain = MVTec(root=tmp_path, category="bottle", train_batch_size=2, num_workers=0, continuous_passes=False)
    plain.setup()
    assert isinstance(plain.train_dataloader(), DataLoader)


class ChildProcesses(Callback):
    """Records the live child processes at every training and every validation batch."""

    def __init__(self) -> None:
        self.training: list[set[int]] = []
        self.validation: list[set[int]] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.training.append({child.pid for child in multiprocessing.active_children()})

    def on_validation_batch_start(self, *args: object) -> None:
        self.validation.append({child.pid for child in multiprocessing.active_children()})


def fit_and_watch_workers(root: Path, work: Path, continuous: bool, epochs: int, passes: int) -> ChildProcesses:
    """Fit FCDD through Engine on the 16-image synthetic set (batch 8, 2 workers); returns what the callback saw."""
    datamodule = MVTec(
        root=root,
        category="synthetic",
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=2,
        continuous_passes=continuous,
    )
    model = FcddHsc(pre_trained=False, epochs=epochs, passes_per_epoch=passes, precision="32-true", visualizer=False)
    children = ChildProcesses()
    engine = Engine(
        default_root_dir=work, logger=False, accelerator="cpu", enable_progress_bar=False, callbacks=[children]
    )
    engine.fit(model, datamodule=datamodule)
    return children


@pytest.mark.parametrize("continuous", [True, False])
def test_engine_keeps_the_training_workers_and_stops_them_after_fit(
    synthetic_root: Path, tmp_path: Path, continuous: bool
) -> None:
    children = fit_and_watch_workers(synthetic_root, tmp_path, continuous, epochs=1, passes=3)
    assert len(children.training) == 3 * 2  # 16 images, batch 8, 3 passes
    workers = set().union(*children.training)
    assert len(workers) == (2 if continuous else 6)
    assert not multiprocessing.active_children(), "training workers outlived fit"


def test_asking_for_a_new_training_loader_stops_the_old_workers(synthetic_root: Path) -> None:
    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, num_workers=2)
    datamodule.setup()
    first = datamodule.train_dataloader()
    assert sum(len(batch.image) for batch in first) == 16
    assert len(multiprocessing.active_children()) == 2
    second = datamodule.train_dataloader()  # e.g. reload_dataloaders_every_n_epochs
    assert not multiprocessing.active_children()
    assert sum(len(batch.image) for batch in second) == 16
    datamodule.teardown("fit")
    assert not multiprocessing.active_children()


def test_validation_batches_match_anomalib_loader_every_time(synthetic_root: Path) -> None:
    kwargs = {"root": synthetic_root, "category": "synthetic", "eval_batch_size": 3, "num_workers": 2}
    continuous, plain = MVTec(**kwargs), MVTec(**kwargs, continuous_passes=False)
    continuous.setup()
    plain.setup()
    loader = continuous.val_dataloader()
    assert isinstance(loader, ContinuousPassLoader)
    assert loader.num_workers == 2  # 8 images in batches of 3: three batches, so both workers decode
    expected = list(plain.val_dataloader())
    for _ in range(2):  # two validations from the same workers
        batches = list(loader)
        assert [batch.image_path for batch in batches] == [batch.image_path for batch in expected]
        for got, want in zip(batches, expected, strict=True):
            assert torch.equal(got.image, want.image)
            assert torch.equal(got.gt_mask, want.gt_mask)
    continuous.teardown("fit")
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("continuous", [True, False])
def test_validation_workers_survive_between_validations(synthetic_root: Path, tmp_path: Path, continuous: bool) -> None:
    """Two validations (one per paper epoch): the same workers serve both when continuous, fresh ones otherwise."""
    children = fit_and_watch_workers(synthetic_root, tmp_path, continuous, epochs=2, passes=1)
    assert len(children.validation) == 2  # 8 validation images in one batch, two validations
    first, second = children.validation
    if continuous:  # the same two training workers and one validation worker (one batch per pass) both times
        assert first == second
        assert len(first) == 3
    else:  # every worker forked anew
        assert first.isdisjoint(second)
    assert not multiprocessing.active_children()


def test_an_empty_validation_set_falls_back_to_anomalib_loader(synthetic_root: Path) -> None:
    datamodule = MVTec(root=synthetic_root, category="synthetic", eval_batch_size=4, num_workers=0)
    datamodule.setup()
    datamodule.val_data.samples = datamodule.val_data.samples.iloc[:0]
    loader = datamodule.val_dataloader()
    assert isinstance(loader, DataLoader)
    assert list(loader) == []
