"""Deployment keeps what it should: every score (predict_files), a clean working directory, every calibration image."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_fcdd.deploy import predict as predict_module


class _DynamicShape:
    """Stands in for an OpenVINO partial shape with a dynamic rank: the images go in unchanged."""

    class rank:  # noqa: N801 - mirrors the OpenVINO attribute
        is_static = False


class FakeInferencer:
    """Scores an image by its mean brightness; raises ``interrupt`` on the call numbered ``interrupt_at``."""

    def __init__(self, interrupt_at: int | None = None, interrupt: BaseException | None = None) -> None:
        self.model = SimpleNamespace(input=lambda index: SimpleNamespace(get_partial_shape=_DynamicShape))
        self.calls, self.interrupt_at, self.interrupt = 0, interrupt_at, interrupt

    def predict(self, array: np.ndarray) -> SimpleNamespace:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise self.interrupt
        score = float(array.mean())
        heat = np.full(array.shape[:2], score, dtype=np.float32)
        return SimpleNamespace(pred_score=score, pred_label=int(score > 0.5), anomaly_map=heat, pred_mask=None)


def _images(folder: Path, names_and_levels: list[tuple[str, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, level in names_and_levels:
        path = folder / name
        Image.new("RGB", (24, 16), (level, level, level)).save(path)
        paths.append(path)
    return paths


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_scores_reach_the_csv_when_the_run_is_interrupted(tmp_path: Path) -> None:
    """Ctrl-C on the third image: the first two are in predictions.csv, with their scores."""
    files = _images(tmp_path / "in", [("dark.png", 51), ("bright.png", 204), ("third.png", 0)])
    inferencer = FakeInferencer(interrupt_at=3, interrupt=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict_files(inferencer, files, tmp_path / "out", show_progress=False)
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert [Path(row["image"]).name for row in rows] == ["dark.png", "bright.png"]
    assert [float(row["pred_score"]) for row in rows] == pytest.approx([0.2, 0.8], abs=1e-6)  # 51/255, 204/255
    assert [row["label"] for row in rows] == ["normal", "anomalous"]
    assert (tmp_path / "out" / "skipped.csv").exists()


def test_an_overlay_that_cannot_be_written_keeps_the_score(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failing overlay write (here: its name is taken by a folder) is logged; the image still gets its row."""
    files = _images(tmp_path / "in", [("a.png", 51), ("b.png", 204)])
    output = tmp_path / "out"
    (output / "overlays" / "a_overlay.png").mkdir(parents=True)  # saving onto a directory raises an OSError
    summary = predict_module.predict_files(FakeInferencer(), files, output, show_progress=False)
    assert summary.n_ok == 2 and summary.n_skipped == 0
    rows = {Path(row["image"]).name: row for row in _rows(output / "predictions.csv")}
    assert rows["a.png"]["overlay"] == "" and float(rows["a.png"]["pred_score"]) == pytest.approx(0.2, abs=1e-6)
    assert rows["b.png"]["overlay"] == str(Path("overlays") / "b_overlay.png")
    assert (output / rows["b.png"]["overlay"]).is_file()
    assert "a.png: scored, but its overlay" in caplog.text


def test_a_very_long_file_name_gets_a_shortened_overlay(tmp_path: Path) -> None:
    """A 240-byte name is legal for the input, but ``<name>_overlay.png`` would pass the 255-byte limit."""
    long_name = "x" * 236 + ".png"
    files = _images(tmp_path / "in", [(long_name, 128), ("short.png", 128)])
    summary = predict_module.predict_files(FakeInferencer(), files, tmp_path / "out", show_progress=False)
    assert summary.n_ok == 2
    overlays = sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir())
    assert overlays == ["short_overlay.png", "x" * predict_module.MAX_OVERLAY_STEM_BYTES + "_overlay.png"]


def test_shortened_multibyte_names_stay_valid_and_distinct(tmp_path: Path) -> None:
    """Cutting at a byte limit must not split a UTF-8 character, and two cut names that collide get a counter."""
    taken: set[str] = set()
    stem = "é" * 150  # 300 bytes
    first = predict_module._overlay_path(tmp_path, Path(stem + "a.png"), taken)
    second = predict_module._overlay_path(tmp_path, Path(stem + "b.png"), taken)
    assert first.name == "é" * 100 + "_overlay.png"
    assert second.name == "é" * 100 + "_1_overlay.png"
    assert len(first.name.encode()) <= 255


def _tiny_openvino_model(path: Path) -> Path:
    """A one-op OpenVINO graph (ReLU over a dynamic-size image), enough to compile."""
    import openvino as ov
    from openvino import opset13 as ops

    image = ops.parameter([1, 3, -1, -1], np.float32, name="image")
    ov.save_model(ov.Model([ops.relu(image)], [image], "tiny"), path)
    return path


def test_compiled_models_are_cached_in_the_given_folder_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny_openvino_model(tmp_path / "model.xml")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    predict_module.load_inferencer(model, cache_dir=tmp_path / "cache")
    assert list(work.iterdir()) == [], "anomalib's inferencer would leave openvino_cache/ here"
    assert any((tmp_path / "cache").iterdir()), "the compiled model is cached where asked"
    predict_module.load_inferencer(model, cache_dir=None)
    assert list(work.iterdir()) == []


def test_single_images_are_scored_by_a_graph_compiled_for_batch_one(tmp_path: Path) -> None:
    import openvino as ov
    from openvino import opset13 as ops

    image = ops.parameter([-1, 3, -1, -1], np.float32, name="image")  # as FCDD exports: batch, height, width open
    path = tmp_path / "dynamic.xml"
    ov.save_model(ov.Model([ops.relu(image)], [image], "dynamic"), path)
    shape = predict_module.load_inferencer(path, cache_dir=None).model.input(0).get_partial_shape()
    assert shape[0].is_static and shape[0].get_length() == 1, "batch fixed to the one image predict-openvino feeds"
    assert shape[2].is_dynamic and shape[3].is_dynamic, "any image size still goes in"
    fixed = predict_module.load_inferencer(_tiny_openvino_model(tmp_path / "fixed.xml"), cache_dir=None)
    assert fixed.model.input(0).get_partial_shape()[0].get_length() == 1  # an already fixed batch is left alone


def test_default_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert predict_module.default_cache_dir() == tmp_path / "anomalib-fcdd" / "openvino"


def test_int8_calibration_sees_each_requested_image_as_one_sample() -> None:
    """32 images of different sizes from a datamodule with batch size 32: nncf must count 32 samples, not 1 batch."""
    from anomalib_fcdd.deploy.export import TrainingImagesForCalibration

    images = [SimpleNamespace(image=torch.full((3, 8 + i, 10), float(i))) for i in range(40)]
    datamodule = SimpleNamespace(train_data=images, train_batch_size=32, setup=lambda stage=None: None)
    loader = TrainingImagesForCalibration(datamodule, max_images=32).val_dataloader()
    batches = list(loader)
    assert len(loader) == 32 and len(batches) == 32
    assert [int(batch["image"][0, 0, 0, 0]) for batch in batches] == list(range(32))
