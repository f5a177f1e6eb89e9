"""``anomalib-fcdd``: mistakes get one line that names them and the fix, and a failed run loses no earlier result."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.cli import main, rewrite_arguments
from anomalib_fcdd.errors import ConfigurationError, UserInputError

FAST = [
    "--model.pre_trained", "false", "--model.epochs", "1", "--model.passes_per_epoch", "1",
    "--model.image_size", "64", "--data.num_workers", "0", "--data.train_batch_size", "8",
    "--data.eval_batch_size", "8",
]  # fmt: skip


def train_args(root: Path, results: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", "fcdd_hsc", "--data", "MVTec", "--data.root", str(root), "--data.category", "synthetic",
        *FAST, "--default_root_dir", str(results), *extra,
    ]  # fmt: skip


def error_of(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if line.startswith("anomalib-fcdd: error:"))


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["train", "--model", "fcd_hsc"], "did you mean 'fcdd_hsc'? Short names: fcdd_hsc | fcdd"),
        (["train", "--model=FCDDHSC2"], "did you mean 'fcdd_hsc'"),
        (["train", "--model", "fcdd_hsc", "--data", "MVtek"], "did you mean 'MVTec'? Short names: MVTec |"),
        (["fit", "--data", "mvtec_few_anomaly"], "did you mean 'MVTecFewAnomalies'"),
    ],
)
def test_a_misspelt_short_name_is_named_with_the_right_one(
    arguments: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in error_of(arguments, capsys)


def test_anomalib_names_and_class_paths_pass_unchanged() -> None:
    arguments = ["fit", "--model", "Padim", "--data", "MVTecAD", "--data.help", "Avenue"]
    assert rewrite_arguments(arguments) == arguments
    checked = ["fit", "--data", "Folder", "--data.help", "folder_few_anomalies"]  # the checked own-data modules
    assert rewrite_arguments(checked) == [
        "fit", "--data", "anomalib_fcdd.data.Folder", "--data.help", "anomalib_fcdd.data.FolderFewAnomalies",
    ]  # fmt: skip
    assert rewrite_arguments(["fit", "--model", "my_package.MyModel"]) == ["fit", "--model", "my_package.MyModel"]
    assert rewrite_arguments(["fit", "--model.help", "fcdd_hsc", "--data.help=MVTec"]) == [
        "fit", "--model.help", "anomalib_fcdd.FcddHsc", "--data.help=anomalib_fcdd.data.MVTec",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--model.loss", "pixel_balance", "Unknown FCDD loss 'pixel_balance' (--model.loss); choose one of"),
        ("--model.backbone", "resnet19", "Unknown FCDD backbone 'resnet19' (--model.backbone)"),
        ("--model.precision", "bf32", "Unknown precision 'bf32' (--model.precision). Use 'auto'"),
        ("--model.minmax", "bottlee", "No shipped min-max constants for 'bottlee'"),
        (
            "--model.weights_path",
            "/no/such/vgg.pth",
            "Weight file /no/such/vgg.pth does not exist (--model.weights_path)",
        ),
    ],
)
def test_a_bad_model_option_is_one_line_before_anything_runs(
    option: str, value: str, expected: str, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    assert expected in error_of(train_args(synthetic_root, results, option, value), capsys)
    assert not results.exists(), "nothing was written"


def test_the_same_checks_guard_the_python_api() -> None:
    with pytest.raises(ConfigurationError, match=r"--model\.precision"):
        FcddHsc(pre_trained=False, precision="fp16")
    with pytest.raises(ValueError, match=r"--model\.loss"):  # a ConfigurationError is a ValueError too
        FcddHsc(pre_trained=False, loss="hinge")


def test_a_bad_dataset_stops_before_the_run_and_keeps_latest(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    main(train_args(synthetic_root, results))
    latest = results / "FcddHsc" / "MVTec" / "synthetic" / "latest"
    first = latest.resolve()
    assert (first / "weights" / "lightning" / "model.ckpt").is_file()
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_root / "synthetic", broken / "synthetic")
    mask = next((broken / "synthetic" / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    capsys.readouterr()
    message = error_of(train_args(broken, results), capsys)
    assert str(mask) in message and "has no mask" in message
    assert latest.resolve() == first, "latest still points at the good run"
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest", first.name], "no empty version folder"


def test_traceback_on_request(synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCDD_TRACEBACK", "1")
    with pytest.raises(UserInputError, match=r"--model\.loss"):
        main(train_args(synthetic_root, tmp_path / "results", "--model.loss", "hinge"))


def test_help_names_the_plugins_own_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "anomalib-fcdd demo --help" in out and "anomalib-fcdd predict-openvino --help" in out
    assert "fcdd_hsc | fcdd" in out


@pytest.mark.parametrize(
    ("flag", "value", "instead"),
    [("--trainer.max_epochs", "1", "--model.epochs"), ("--trainer.precision", "32-true", "--model.precision")],
)
def test_trainer_flags_the_model_would_override_are_refused(
    flag: str, value: str, instead: str, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["fit", "--model", "fcdd_hsc", "--model.backbone", "efficientnet_lite0", "--data", "MVTec"]
    arguments += ["--data.root", str(synthetic_root), "--data.category", "synthetic", flag, value]
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert flag in error and instead in error
    assert not list(tmp_path.iterdir()), "nothing was written"
