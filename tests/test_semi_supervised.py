"""The semi-supervised split: k real anomalies per defect type move to training, reproducibly, with their masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from anomalib_fcdd.data import DatasetError, MVTecFewAnomalies, make_synthetic_mvtec, select_anomalies
from anomalib_fcdd.data.mvtec import ReplacingDataset


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("semi")
    make_synthetic_mvtec(root, "cat", n_train=6, n_test_good=2, n_test_defect=6, size=32, seed=2)
    return root  # 3 scratch + 3 stain defects


def datamodule(root: Path, **kwargs: object) -> MVTecFewAnomalies:
    dm = MVTecFewAnomalies(root=root, category="cat", num_workers=0, train_batch_size=6, **kwargs)
    dm.setup()
    return dm


def defects_of(paths: list[str]) -> list[str]:
    return sorted(Path(p).parent.name for p in paths)


def test_one_per_defect_type_removed_from_test(root: Path) -> None:
    dm = datamodule(root)
    assert defects_of(dm.training_anomalies) == ["scratch", "stain"]
    test_paths = set(dm.test_data.samples.image_path)
    assert not test_paths & set(dm.training_anomalies)
    assert len(dm.test_data.samples) == 2 + 6 - 2
    assert len(dm.train_data.samples) == 6, "normal training images are unchanged"
    assert all(Path(p).is_file() for p in dm.anomaly_data.samples.mask_path)


def test_keep_in_test_and_k(root: Path) -> None:
    dm = datamodule(root, anomalies_per_defect=2, keep_in_test=True)
    assert defects_of(dm.training_anomalies) == ["scratch", "scratch", "stain", "stain"]
    assert len(dm.test_data.samples) == 8
    assert set(dm.training_anomalies) <= set(dm.test_data.samples.image_path)


def test_same_seed_same_selection(root: Path) -> None:
    first = datamodule(root, selection_seed=5).training_anomalies
    assert datamodule(root, selection_seed=5).training_anomalies == first
    picks = {tuple(datamodule(root, selection_seed=seed).training_anomalies) for seed in range(8)}
    assert len(picks) > 1, "different seeds pick different files"


def test_training_batches_carry_real_masks(root: Path) -> None:
    dm = datamodule(root, anomaly_probability=0.5)
    torch.manual_seed(0)
    labels, masked = [], []
    for _ in range(10):
        batch = next(iter(dm.train_dataloader()))
        labels.append(batch.gt_label.bool())
        masked.append(batch.gt_mask.flatten(1).any(1))
    labels_all, masked_all = torch.cat(labels), torch.cat(masked)
    assert torch.equal(labels_all, masked_all), "every anomalous sample has a non-empty mask, normal ones none"
    assert 0.3 < labels_all.float().mean().item() < 0.7


def test_replacing_dataset_rate() -> None:
    torch.manual_seed(1)
    dataset = ReplacingDataset(list(range(1000)), ["a", "b"], probability=0.25)
    items = [dataset[i] for i in range(1000)]
    replaced = sum(isinstance(item, str) for item in items)
    assert abs(replaced / 1000 - 0.25) < 0.06
    assert {item for item in items if isinstance(item, str)} == {"a", "b"}


def test_k_larger_than_available_is_explained(root: Path) -> None:
    with pytest.raises(DatasetError, match=r"only 3 masked images.*Lower it to at most 3"):
        datamodule(root, anomalies_per_defect=4)


def test_defect_type_without_masks_is_explained(tmp_path: Path) -> None:
    make_synthetic_mvtec(tmp_path, "cat", n_train=4, n_test_good=1, n_test_defect=2, size=32, seed=3)
    shutil.rmtree(tmp_path / "cat" / "ground_truth" / "stain")
    dm = MVTecFewAnomalies(root=tmp_path, category="cat", num_workers=0)
    with pytest.raises(DatasetError, match=r"test/stain/001.png has no mask"):
        dm.setup()
    samples = pd.DataFrame(
        {
            "label": ["scratch", "stain"],
            "label_index": [1, 1],
            "image_path": ["s/000.png", "t/001.png"],
            "mask_path": ["m/000_mask.png", ""],
        }
    )
    with pytest.raises(DatasetError, match=r"'stain' has no test images with masks \(e.g. t/001.png\)"):
        select_anomalies(samples, 1, 0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MVTecFewAnomalies(anomalies_per_defect=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MVTecFewAnomalies(anomaly_probability=1.5)


def test_minmax_constants_come_from_every_normal_image_before_anomalies_replace_any(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With half of the training images replaced by real anomalies, min-max must still see all six normal images."""
    from anomalib.engine import Engine

    from anomalib_fcdd import FcddHsc
    from anomalib_fcdd.models.fcdd import lightning_model
    from anomalib_fcdd.models.fcdd.pre_processing import MinMaxAccumulator

    seen: list[int] = []

    class CountingAccumulator(MinMaxAccumulator):
        def update(self, images: torch.Tensor) -> None:
            seen.append(len(images))
            super().update(images)

    monkeypatch.setattr(lightning_model, "MinMaxAccumulator", CountingAccumulator)
    dm = MVTecFewAnomalies(root=root, category="cat", num_workers=0, train_batch_size=6, anomaly_probability=0.5)
    model = FcddHsc(pre_trained=False, minmax=None, image_size=32, epochs=1, passes_per_epoch=1, visualizer=False)
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False)
    torch.manual_seed(3)  # a seed under which the replacing loader swaps images out
    engine.fit(model, datamodule=dm)
    assert sum(seen) == 6, f"min-max saw {sum(seen)} of the 6 normal training images"
