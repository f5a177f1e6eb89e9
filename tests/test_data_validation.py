"""Bad datasets fail early with an error that names the offending path."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_fcdd.data import DatasetError, MVTec, make_synthetic_mvtec, validate_mvtec_layout


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    make_synthetic_mvtec(tmp_path, "cat", n_train=3, n_test_good=2, n_test_defect=2, size=32, seed=1)
    return tmp_path


def test_valid_dataset_is_summarised(dataset: Path) -> None:
    summary = validate_mvtec_layout(dataset, "cat")
    assert summary.train_images == 3
    assert summary.test_images == {"good": 2, "scratch": 1, "stain": 1}
    assert not summary.grayscale


def test_missing_root_is_named_and_nothing_is_created(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(root)):
        validate_mvtec_layout(root, "bottle")
    datamodule = MVTec(root=root, category="bottle", num_workers=0)
    with pytest.raises(DatasetError, match="does not exist"):
        datamodule.prepare_data()
    assert not root.exists(), "no empty folder is left behind (no download attempt)"


def test_missing_category_lists_what_exists(dataset: Path) -> None:
    with pytest.raises(DatasetError, match=r"bottle.*Categories found.*cat"):
        validate_mvtec_layout(dataset, "bottle")


def test_empty_category(dataset: Path) -> None:
    for image in (dataset / "cat" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=r"empty.*train/good"):
        validate_mvtec_layout(dataset, "cat")


def test_defective_image_without_mask(dataset: Path) -> None:
    mask = next((dataset / "cat" / "ground_truth" / "stain").glob("*_mask.png"))
    mask.unlink()
    with pytest.raises(DatasetError, match=rf"test/stain/.*\.png has no mask: expected {mask}"):
        validate_mvtec_layout(dataset, "cat")


def test_mask_of_wrong_size(dataset: Path) -> None:
    mask = next((dataset / "cat" / "ground_truth" / "scratch").glob("*_mask.png"))
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(mask)
    with pytest.raises(DatasetError, match=rf"{mask} is 16x16 but its image .* is 32x32"):
        validate_mvtec_layout(dataset, "cat")


def test_grayscale_image_among_colour_images(dataset: Path) -> None:
    odd = dataset / "cat" / "train" / "good" / "001.png"
    Image.open(odd).convert("L").save(odd)
    with pytest.raises(DatasetError, match=rf"{odd} is grayscale"):
        validate_mvtec_layout(dataset, "cat")


def test_all_grayscale_category_is_accepted(dataset: Path) -> None:
    for image in (dataset / "cat").rglob("*.png"):
        if "ground_truth" not in image.parts:
            Image.open(image).convert("L").save(image)
    assert validate_mvtec_layout(dataset, "cat").grayscale


@pytest.mark.parametrize("content", [b"this is not a png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_non_image_file_among_images(dataset: Path, content: bytes) -> None:
    bad = dataset / "cat" / "test" / "good" / "notes.png"
    bad.write_bytes(content)
    with pytest.raises(DatasetError, match=rf"{bad} is not a readable image"):
        validate_mvtec_layout(dataset, "cat")


def test_truncated_png_is_refused(dataset: Path) -> None:
    image = dataset / "cat" / "train" / "good" / "002.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=str(image)):
        validate_mvtec_layout(dataset, "cat")


def test_ignored_files_are_named_in_a_warning(dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    stray = dataset / "cat" / "train" / "good" / "readme.txt"
    stray.write_text("hello")
    with caplog.at_level(logging.WARNING):
        summary = validate_mvtec_layout(dataset, "cat")
    assert stray in summary.ignored_files
    assert str(stray) in caplog.text
    assert stray.read_text() == "hello", "nothing is deleted"


def test_datamodule_setup_checks_the_data(dataset: Path) -> None:
    shutil.rmtree(dataset / "cat" / "ground_truth" / "scratch")
    datamodule = MVTec(root=dataset, category="cat", num_workers=0)
    with pytest.raises(DatasetError, match="has no mask"):
        datamodule.setup()
