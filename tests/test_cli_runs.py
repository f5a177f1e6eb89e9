"""``anomalib-fcdd`` never leaves a results folder broken, says where a run's outputs are, and answers a wrong
checkpoint, weight file or export with one line (issue 18, items 5 and 6)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.checkpoints import CheckpointError, check_checkpoint, options_from_checkpoint
from anomalib_fcdd.cli import init_defaults, main
from anomalib_fcdd.runs import FAILED_MARK, INTERRUPTED_MARK, RunFolder, RunWatch, repair_latest

LITE = [
    "--model", "fcdd_hsc", "--model.backbone", "efficientnet_lite0", "--model.pre_trained", "false",
    "--model.epochs", "1", "--model.passes_per_epoch", "1", "--model.image_size", "64",
]  # fmt: skip
DATA = [
    "--data.num_workers", "0", "--data.train_batch_size", "8", "--data.eval_batch_size", "8",
    "--trainer.accelerator", "cpu",
]  # fmt: skip


def run_args(command: str, root: Path, results: Path, *extra: str, model: list[str] = LITE) -> list[str]:
    return [
        command, *model, "--data", "MVTec", "--data.root", str(root), "--data.category", "synthetic", *DATA,
        "--default_root_dir", str(results), *extra,
    ]  # fmt: skip


def category(results: Path) -> Path:
    return results / "FcddHsc" / "MVTec" / "synthetic"


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@functools.cache
def package_imports_lazily() -> bool:
    """Whether ``import anomalib_fcdd`` leaves torch unimported (the ``__init__.py`` change of issue 18)."""
    probe = "import anomalib_fcdd, sys; print('torch' in sys.modules)"
    return (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def error_of(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if line.startswith("anomalib-fcdd: error:"))


@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny EfficientNet-Lite0 training: its results folder and checkpoint (the good run ``latest`` names)."""
    results = tmp_path_factory.mktemp("trained")
    main(run_args("train", synthetic_root, results))
    latest = category(results) / "latest"
    return {"results": results, "run": latest.resolve(), "ckpt": latest.resolve() / "weights/lightning/model.ckpt"}


# ---------------------------------------------------------------------------------------------------------------------
# Item 5: nothing broken left behind
# ---------------------------------------------------------------------------------------------------------------------
def test_train_names_its_checkpoint_metrics_and_heatmaps(trained: dict[str, Any]) -> None:
    run = trained["run"]
    assert trained["ckpt"].is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["image_AUROC"] <= 1.0 and 0.0 <= metrics["pixel_AUROC"] <= 1.0
    assert any((run / "images").rglob("*.png"))


def test_test_in_a_fresh_folder_keeps_latest_a_link_and_train_still_works(
    trained: dict[str, Any], synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    main(run_args("test", synthetic_root, results, "--ckpt_path", str(trained["ckpt"])))
    latest = category(results) / "latest"
    assert latest.is_symlink() and latest.resolve().name == "v0"
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("anomalib-fcdd: results:"))
    assert f"checkpoint {trained['ckpt']}" in line
    assert f"metrics {latest.resolve() / 'metrics.json'}" in line and f"heatmaps {latest.resolve() / 'images'}" in line
    assert (latest / "metrics.json").is_file()

    main(run_args("train", synthetic_root, results))  # crashed with IsADirectoryError before the fix
    assert latest.is_symlink() and latest.resolve().name == "v1"
    assert (latest / "weights" / "lightning" / "model.ckpt").is_file()


def test_a_real_latest_directory_becomes_a_version_and_a_link(tmp_path: Path) -> None:
    folder = tmp_path / "FcddHsc" / "MVTec" / "bottle"
    (folder / "v0").mkdir(parents=True)
    (folder / "latest" / "images").mkdir(parents=True)  # what anomalib's test/predict wrote into a fresh folder
    (folder / "latest" / "images" / "a.png").write_bytes(b"png")
    assert repair_latest(folder) == folder / "v1"
    assert (folder / "latest").is_symlink() and (folder / "latest").resolve() == (folder / "v1").resolve()
    assert (folder / "v1" / "images" / "a.png").read_bytes() == b"png"
    assert repair_latest(folder) is None, "a link is left alone"


def test_a_run_that_never_trains_leaves_no_folder_and_keeps_latest(
    trained: dict[str, Any], synthetic_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = category(trained["results"])
    before = listing(folder)
    message = error_of(run_args("train", synthetic_root, trained["results"], "--model.epochs", "0"), capsys)
    assert "--model.epochs 0 is out of range" in message
    assert listing(folder) == before, "no empty version folder"
    assert (folder / "latest").resolve() == trained["run"]


def test_missing_backbone_weights_leave_no_folder(
    trained: dict[str, Any], synthetic_root: Path, offline_imagenet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = category(trained["results"])
    before = listing(folder)
    vgg = ["--model", "fcdd_hsc", "--model.backbone", "vgg11_bn", "--model.epochs", "1", "--model.image_size", "64"]
    message = error_of(run_args("train", synthetic_root, trained["results"], model=vgg), capsys)
    assert "vgg11_bn" in message
    assert listing(folder) == before
    assert (folder / "latest").resolve() == trained["run"]


@pytest.mark.parametrize(
    ("raised", "caught", "mark"),
    [(RuntimeError("boom"), RuntimeError, FAILED_MARK), (KeyboardInterrupt(), SystemExit, INTERRUPTED_MARK)],
)
def test_a_crashed_or_interrupted_run_is_marked_and_latest_goes_back(
    raised: BaseException,
    caught: type[BaseException],
    mark: str,
    trained: dict[str, Any],
    synthetic_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(FcddHsc, "training_step", crash)
    folder = category(trained["results"])
    before = set(listing(folder))
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(caught):  # Lightning turns Ctrl-C into sys.exit(1) after its on_exception hooks
            main(run_args("train", synthetic_root, trained["results"]))
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C while it shuts down
    (new,) = set(listing(folder)) - before
    text = (folder / new / mark).read_text()
    assert ("boom" in text) if mark == FAILED_MARK else ("interrupted" in text)
    assert (folder / "latest").resolve() == trained["run"], "latest names the last run that finished"


def test_a_failed_evaluation_in_a_fresh_folder_is_removed_with_its_latest(tmp_path: Path) -> None:
    folder = tmp_path / "FcddHsc" / "MVTec" / "bottle"
    run = RunFolder(folder, creates_version=False)
    run.prepare()  # a test/predict in a fresh folder gets v0 and a latest link, not a latest directory
    assert (folder / "latest").is_symlink() and (folder / "v0").is_dir()
    run.failed(RuntimeError("no batch ran"), RunWatch())
    assert listing(folder) == []


# ---------------------------------------------------------------------------------------------------------------------
# Item 6: one line for a wrong checkpoint, weight file or export
# ---------------------------------------------------------------------------------------------------------------------
def test_a_checkpoint_of_another_backbone_names_it(
    trained: dict[str, Any], synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    resnet = ["--model", "fcdd_hsc", "--model.backbone", "resnet18", "--model.pre_trained", "false"]
    message = error_of(
        run_args("test", synthetic_root, results, "--ckpt_path", str(trained["ckpt"]), model=resnet), capsys
    )
    assert "this checkpoint was trained with efficientnet_lite0, not resnet18" in message
    assert message.endswith("pass --model.backbone efficientnet_lite0.")
    assert not results.exists()


def test_a_checkpoint_supplies_the_options_it_was_trained_with(
    trained: dict[str, Any], synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``test --ckpt_path`` with no model option: backbone, input size and the rest come from the checkpoint, so the
    default VGG-11-BN is never built (nor logged as waiting for its weights)."""
    caplog.set_level("INFO")
    main(run_args("test", synthetic_root, tmp_path, "--ckpt_path", str(trained["ckpt"]), model=["--model", "fcdd_hsc"]))
    assert "options as trained, from the checkpoint: backbone=efficientnet_lite0" in caplog.text
    assert "image_size=64" in caplog.text
    assert "vgg11_bn" not in caplog.text.replace("backbone=efficientnet_lite0", "")
    assert json.loads((category(tmp_path) / "latest" / "metrics.json").read_text())["pixel_AUROC"] >= 0.0


def test_only_options_left_at_their_defaults_are_taken_from_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    saved = {"backbone": "efficientnet_lite0", "head": "mlp", "lr": 0.5, "image_size": [64, 96], "other": 1}
    torch.save({"state_dict": {}, "hyper_parameters": saved}, path)
    options = {"backbone": "vgg11_bn", "head": None, "lr": 0.1, "image_size": 224}
    defaults = {"backbone": "vgg11_bn", "head": None, "lr": None, "image_size": 224}
    assert options_from_checkpoint(path, options, defaults) == {
        "backbone": "efficientnet_lite0",
        "head": "mlp",
        "image_size": [64, 96],
    }  # lr was typed by the user; "other" is no option of the model


def test_init_defaults_take_the_subclasss_changes() -> None:
    from anomalib_fcdd import Fcdd

    defaults = init_defaults(Fcdd)
    assert defaults["loss"] == "fcdd" and defaults["confetti_smoothing"] is True
    assert defaults["backbone"] == "efficientnet_lite0_multiscale" and defaults["image_size"] == 224
    assert init_defaults(FcddHsc)["loss"] == "pixel_balanced"


def test_a_missing_or_truncated_checkpoint_is_one_line(
    trained: dict[str, Any], synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained["ckpt"].read_bytes()[:20000])
    results = tmp_path / "results"
    message = error_of(run_args("test", synthetic_root, results, "--ckpt_path", str(truncated)), capsys)
    assert f"Cannot read checkpoint {truncated} (--ckpt_path): it is truncated or corrupted" in message
    missing = tmp_path / "nope.ckpt"
    message = error_of(run_args("test", synthetic_root, results, "--ckpt_path", str(missing)), capsys)
    assert f"Checkpoint {missing} does not exist (--ckpt_path)" in message
    assert not results.exists()


def test_checkpoint_check_passes_the_right_backbone(trained: dict[str, Any], tmp_path: Path) -> None:
    check_checkpoint(trained["ckpt"], "efficientnet_lite0")
    check_checkpoint(trained["ckpt"], None)
    with pytest.raises(CheckpointError, match="is a directory"):
        check_checkpoint(tmp_path, None)


def test_a_corrupt_weights_path_is_one_line(
    trained: dict[str, Any], synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "weights.pth"
    corrupt.write_bytes(trained["ckpt"].read_bytes()[:1000])
    results = tmp_path / "results"
    message = error_of(run_args("train", synthetic_root, results, "--model.weights_path", str(corrupt)), capsys)
    assert f"Cannot read weight file {corrupt}: it is truncated, corrupted" in message
    assert not results.exists()


def test_export_without_a_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "exports"
    arguments = [
        "export",
        *LITE,
        "--model.minmax",
        "bottle",
        "--export_type",
        "onnx",
        "--default_root_dir",
        str(results),
    ]
    message = error_of(arguments, capsys)
    assert "export needs a trained model: pass --ckpt_path" in message
    assert not results.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Item 7: an export's log is the export's, once, without third-party chatter (a fresh process, as a user runs it)
# ---------------------------------------------------------------------------------------------------------------------
def test_export_log_is_short_and_quiet(trained: dict[str, Any], tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("anomalib-fcdd")), "export", *LITE, "--ckpt_path", str(trained["ckpt"]),
        "--export_type", "onnx", "--default_root_dir", str(tmp_path),
    ]  # fmt: skip
    environment = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert (tmp_path / "weights" / "onnx" / "model.onnx").is_file()
    noises = ("onnx_ir", "onnxscript", "Failed to convert", "Traceback", "[torch.onnx]", "litlogger")
    for noise in noises:
        assert noise not in output, noise
    if package_imports_lazily():  # else anomalib is imported, with its warnings, before the CLI's filters exist
        assert "FutureWarning" not in output
    assert output.count("Exported model to") == 1, output
    assert output.count("Initializing FcddHsc model.") == 2, "once per model built (the CLI's and the export's)"
    assert len(output.splitlines()) < 20, output
