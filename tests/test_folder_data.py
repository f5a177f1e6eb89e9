"""A user's own folders: the checked ``Folder`` datamodule and the semi-supervised ``FolderFewAnomalies``.

Small generated data only (``make_synthetic_mvtec`` laid out as a user's folders); the Magnetic-Tile check at the end
skips when ``../shared/data/magnetic_tile`` is absent.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_fcdd.cli import main
from anomalib_fcdd.data import DatasetError, Folder, FolderFewAnomalies, MVTec, make_synthetic_mvtec
from anomalib_fcdd.data import base as base_module

DEFECTS = ["scratch", "stain"]
MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


@pytest.fixture
def user_root(tmp_path: Path) -> Path:
    """``good/``, ``defects/{scratch,stain}/`` and ``masks/{scratch,stain}/<stem>_mask.png``: 6 + 2 x 3 images."""
    source = make_synthetic_mvtec(tmp_path / "src", "cat", n_train=6, n_test_good=2, n_test_defect=6, size=32, seed=2)
    root = tmp_path / "mine"
    root.mkdir()
    (source / "train" / "good").rename(root / "good")
    (source / "test" / "good").rename(root / "good_test")
    for defect in DEFECTS:
        (root / "defects").mkdir(exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        (source / "test" / defect).rename(root / "defects" / defect)
        (source / "ground_truth" / defect).rename(root / "masks" / defect)
    return root


def folder(root: Path, cls: type = Folder, **kwargs: object) -> Folder:
    options = {
        "normal_dir": "good",
        "normal_test_dir": "good_test",
        "abnormal_dir": [f"defects/{d}" for d in DEFECTS],
        "mask_dir": [f"masks/{d}" for d in DEFECTS],
        "num_workers": 0,
        **kwargs,
    }
    return cls(root=root, **options)


def test_masks_are_matched_by_stem_and_served(user_root: Path) -> None:
    dm = folder(user_root)
    dm.prepare_data()
    dm.setup()
    samples = dm.test_data.samples
    abnormal = samples[samples.label_index == 1]
    assert len(dm.train_data) == 6 and len(samples) + len(dm.val_data.samples) == 2 + 6
    for image, mask in zip(abnormal.image_path, abnormal.mask_path, strict=True):
        assert Path(mask) == user_root / "masks" / Path(image).parent.name / f"{Path(image).stem}_mask.png"
    row = int(np.flatnonzero(samples.label_index == 1)[0])
    expected = np.asarray(Image.open(samples.mask_path[row])) > 0
    assert torch.equal(dm.test_data[row].gt_mask.bool(), torch.from_numpy(expected))


def test_names_that_sort_differently_from_their_masks(tmp_path: Path) -> None:
    """a1.png < a10.png but a10_mask.png < a1_mask.png: anomalib's positional pairing refuses this complete set."""
    for folder_name in ("good", "bad", "gt"):
        (tmp_path / folder_name).mkdir()
    Image.new("L", (4, 4), 128).save(tmp_path / "good" / "n.png")
    for name, row in (("a1", 0), ("a10", 3)):
        Image.new("L", (4, 4), 128).save(tmp_path / "bad" / f"{name}.png")
        mask = np.zeros((4, 4), dtype=np.uint8)
        mask[row] = 255
        Image.fromarray(mask).save(tmp_path / "gt" / f"{name}_mask.png")
    dm = Folder(
        root=tmp_path, normal_dir="good", abnormal_dir="bad", mask_dir="gt", num_workers=0, val_split_mode="none"
    )
    dm.setup()
    data = dm.test_data
    anomalous = [data[index] for index in range(len(data)) if data[index].gt_label]
    assert sorted(Path(item.image_path).stem for item in anomalous) == ["a1", "a10"]
    for item in anomalous:
        expected_row = 0 if Path(item.image_path).stem == "a1" else 3
        assert item.gt_mask.bool()[expected_row].all() and item.gt_mask.sum() == 4


def test_masks_named_like_their_images_and_jpeg_bmp_tiff(tmp_path: Path) -> None:
    for folder_name in ("good", "bad", "gt"):
        (tmp_path / folder_name).mkdir()
    Image.new("RGB", (8, 6), (200, 100, 50)).save(tmp_path / "good" / "a.JPG")
    Image.new("RGB", (8, 6), (200, 100, 50)).save(tmp_path / "good" / "b.bmp")
    Image.new("RGB", (8, 6), (10, 10, 10)).save(tmp_path / "bad" / "c.jpeg")
    Image.new("RGB", (8, 6), (10, 10, 10)).save(tmp_path / "bad" / "d.tiff")
    Image.new("L", (8, 6), 255).save(tmp_path / "gt" / "c.png")
    Image.new("L", (8, 6), 255).save(tmp_path / "gt" / "d.png")
    dm = Folder(
        root=tmp_path,
        normal_dir="good",
        abnormal_dir="bad",
        mask_dir="gt",
        num_workers=0,
        test_split_mode="none",
        val_split_mode="none",
    )
    dm.prepare_data()
    dm.setup()
    assert {Path(p).name for p in dm.train_data.samples.image_path} == {"a.JPG", "b.bmp"}
    tested = zip(dm.test_data.samples.image_path, dm.test_data.samples.mask_path, strict=True)
    assert {Path(i).name: Path(m).name for i, m in tested} == {"c.jpeg": "c.png", "d.tiff": "d.png"}


def _bad(root: Path, what: str) -> tuple[Folder, str]:
    """Break ``root`` in one way; returns the datamodule and the message expected (as a regex)."""
    first = sorted((root / "defects" / "stain").iterdir())[0]
    mask = root / "masks" / "stain" / f"{first.stem}_mask.png"
    if what == "missing folder":
        return folder(root, normal_dir="typo"), rf"normal_dir {root / 'typo'} does not exist"
    if what == "missing root":
        return Folder(root=root / "nowhere", normal_dir="good"), rf"Dataset root {root / 'nowhere'} does not exist"
    if what == "empty normal dir":
        for file in (root / "good").iterdir():
            file.unlink()
        return folder(root), rf"normal_dir {root / 'good'} has no images \(looked for .png, .jpg"
    if what == "zero-byte file":
        (root / "good" / "empty.png").write_bytes(b"")
        return folder(root), rf"{root / 'good' / 'empty.png'} is not a readable image"
    if what == "corrupt jpeg":
        Image.new("RGB", (32, 32), (9, 9, 9)).save(root / "good" / "cut.jpg")
        data = (root / "good" / "cut.jpg").read_bytes()
        (root / "good" / "cut.jpg").write_bytes(data[: len(data) // 2])
        return folder(root), rf"{root / 'good' / 'cut.jpg'} is not a readable image, corrupt or truncated"
    if what == "missing mask":
        mask.unlink()
        return folder(root), rf"Abnormal image {first} has no mask: expected {first.stem}.png or {first.stem}_mask.png"
    if what == "mask of wrong size":
        Image.new("L", (16, 8)).save(mask)
        return folder(root), rf"Mask {mask} is 16x8 but its image {first} is 32x32"
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    [
        "missing folder",
        "missing root",
        "empty normal dir",
        "zero-byte file",
        "corrupt jpeg",
        "missing mask",
        "mask of wrong size",
    ],
)
def test_bad_folders_fail_in_prepare_data_naming_the_file(user_root: Path, what: str) -> None:
    dm, message = _bad(user_root, what)
    with pytest.raises(DatasetError, match=message) as error:
        dm.prepare_data()
    assert "\n" not in str(error.value), "one line"


def test_semi_supervised_k_per_defect_folder_leaves_the_test_set(user_root: Path) -> None:
    dm = folder(user_root, FolderFewAnomalies, train_batch_size=6, val_split_mode="none")
    dm.setup()
    picked = [Path(p) for p in dm.training_anomalies]
    assert sorted(p.parent.name for p in picked) == DEFECTS
    assert not set(dm.training_anomalies) & set(dm.test_data.samples.image_path)
    assert len(dm.test_data.samples) == 2 + 6 - 2
    kept = folder(user_root, FolderFewAnomalies, anomalies_per_defect=3, keep_in_test=True, val_split_mode="none")
    kept.setup()
    assert len(kept.training_anomalies) == 6 and len(kept.test_data.samples) == 8
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch.gt_label.bool(), batch.gt_mask.flatten(1).any(1)), "anomalies arrive with their masks"


def test_semi_supervised_with_named_files_and_one_abnormal_folder(user_root: Path) -> None:
    stain = sorted((user_root / "defects" / "stain").iterdir())
    scratch = sorted((user_root / "defects" / "scratch").iterdir())
    dm = folder(user_root, FolderFewAnomalies, anomalies=[stain[1].name, f"defects/scratch/{scratch[0].name}"])
    dm.setup()
    assert sorted(dm.training_anomalies) == sorted([str(stain[1]), str(scratch[0])])
    one = FolderFewAnomalies(
        root=user_root, normal_dir="good", abnormal_dir="defects/stain", mask_dir="masks", num_workers=0
    )
    one.setup()
    assert len(one.training_anomalies) == 1 and Path(one.training_anomalies[0]).parent.name == "stain"
    with pytest.raises(DatasetError, match=r"anomalies entry 'nope.png' matches no abnormal image"):
        folder(user_root, FolderFewAnomalies, anomalies=["nope.png"]).setup()
    with pytest.raises(DatasetError, match="needs abnormal_dir and mask_dir"):
        FolderFewAnomalies(root=user_root, normal_dir="good", abnormal_dir="defects/stain")


@pytest.mark.parametrize(("cores", "expected"), [(2, 2), (3, 3), (64, 8)])
def test_default_workers_follow_the_machine(monkeypatch: pytest.MonkeyPatch, cores: int, expected: int) -> None:
    monkeypatch.setattr(base_module.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert MVTec().num_workers == expected
    assert Folder(normal_dir="good").num_workers == expected
    assert MVTec(num_workers=0).num_workers == 0


def _magnetic_tile_as_user_folders(target: Path, jpeg: bool) -> dict[str, object]:
    """Magnetic-Tile as a user would have it: symlinked folders, or JPEG copies of a few images per folder."""
    defects = sorted(p.name for p in (MAGNETIC_TILE / "ground_truth").iterdir())
    for name, source in [("normal", "train/good"), ("normal_test", "test/good")] + [
        (f"defects/{d}", f"test/{d}") for d in defects
    ]:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if jpeg:  # the first 4 images of each folder, as a camera would have written them
            (target / name).mkdir()
            for png in sorted((MAGNETIC_TILE / source).iterdir())[:4]:
                Image.open(png).save(target / name / f"{png.stem}.jpg", quality=90)
        else:
            os.symlink(MAGNETIC_TILE / source, target / name)
    os.symlink(MAGNETIC_TILE / "ground_truth", target / "masks")
    return {
        "root": target,
        "normal_dir": "normal",
        "normal_test_dir": "normal_test",
        "abnormal_dir": [f"defects/{d}" for d in defects],
        "mask_dir": "masks",
        "num_workers": 0,
    }


@pytest.mark.parametrize("jpeg", [False, True], ids=["png-symlinks", "jpeg-copies"])
def test_magnetic_tile_as_a_users_folders(tmp_path: Path, jpeg: bool) -> None:
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"{MAGNETIC_TILE} is not here")
    options = _magnetic_tile_as_user_folders(tmp_path, jpeg)
    dm = FolderFewAnomalies(**options, val_split_mode="none")  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup()
    assert len({Path(p).parent.name for p in dm.training_anomalies}) == 5, "one per defect type"
    abnormal = dm.test_data.samples[dm.test_data.samples.label_index == 1]
    assert all(
        Path(m).name == f"{Path(i).stem}_mask.png" for i, m in zip(abnormal.image_path, abnormal.mask_path, strict=True)
    )
    item = dm.test_data[len(dm.test_data) - 1]
    with Image.open(item.image_path) as image:
        assert tuple(item.image.shape) == (3, image.height, image.width), "grayscale arrives as RGB, uncropped"


def _readme_commands(data_class: str) -> list[list[str]]:
    """The README's ``anomalib-fcdd train`` commands that use ``data_class``, split as a shell would split them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in readme.splitlines() if line.strip().startswith("anomalib-fcdd train")]
    return [shlex.split(line)[1:] for line in lines if f"--data {data_class} " in line]


@pytest.mark.parametrize("data_class", ["anomalib_fcdd.data.Folder", "anomalib_fcdd.data.FolderFewAnomalies"])
def test_readme_magnetic_tile_commands_run_as_typed(
    data_class: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's own-data commands, word for word, on Magnetic-Tile laid out as ``tiles/`` (4 JPEGs per folder);
    only the budget, size and workers are added so that the run takes seconds."""
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"{MAGNETIC_TILE} is not here")
    (command,) = _readme_commands(data_class)
    tiles = tmp_path / "tiles"
    _magnetic_tile_as_user_folders(tiles, jpeg=True)
    (tiles / "normal").rename(tiles / "good")  # the README's names for the normal folders
    (tiles / "normal_test").rename(tiles / "good_test")
    monkeypatch.chdir(tmp_path)
    quick = ["--model.image_size", "64", "--model.epochs", "1", "--model.passes_per_epoch", "1"]
    main([*command, *quick, "--data.num_workers", "0", "--trainer.accelerator", "cpu"])
    runs = list((tmp_path / "results" / "FcddHsc").rglob("latest/metrics.json"))
    assert len(runs) == 1, "one finished run under results/"
    assert 0.0 <= json.loads(runs[0].read_text())["pixel_AUROC"] <= 1.0
