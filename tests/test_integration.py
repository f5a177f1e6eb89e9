"""End to end through anomalib: Engine, both console scripts, every config, checkpoints, model look-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anomalib.models
import pytest
import torch
from anomalib.engine import Engine

from anomalib_fcdd import Fcdd, FcddHsc
from anomalib_fcdd.cli import rewrite_arguments
from anomalib_fcdd.data import MVTec

REPO = Path(__file__).resolve().parents[1]
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPR", "pixel_AUPRO")
FAST = [
    "--model.pre_trained",
    "false",
    "--model.epochs",
    "1",
    "--model.passes_per_epoch",
    "1",
    "--model.image_size",
    "64",
]


def fast_data_args(root: Path) -> list[str]:
    return [
        "--data.root", str(root), "--data.category", "synthetic", "--data.num_workers", "0",
        "--data.train_batch_size", "8", "--data.eval_batch_size", "8",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FcddHsc, Engine, MVTec, list]:
    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = FcddHsc(pre_trained=False, epochs=1, passes_per_epoch=2)
    engine = Engine(
        default_root_dir=tmp_path_factory.mktemp("engine"), logger=False, accelerator="cpu", enable_progress_bar=False
    )
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule)
    return model, engine, datamodule, results


def test_engine_fit_and_test_report_the_four_metrics(trained: tuple) -> None:
    model, _, _, results = trained
    assert set(METRICS) <= set(results[0])
    for name in METRICS:
        assert 0.0 <= results[0][name] <= 1.0
    assert bool(model.model.normalization.ready), "min-max constants were computed from the training images"


def test_checkpoint_reloads_with_weights_only_and_predicts_identically(trained: tuple) -> None:
    model, engine, _, _ = trained
    checkpoint = Path(
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    assert checkpoint.is_file()
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["loss"] == "pixel_balanced"
    reloaded = FcddHsc.load_from_checkpoint(checkpoint, map_location="cpu")
    model.eval()
    reloaded.eval()
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model.model(images), reloaded.model(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)
    torch.testing.assert_close(reloaded.model.normalization.constants, model.model.normalization.constants)


def test_get_model_finds_both_classes() -> None:
    assert isinstance(anomalib.models.get_model("fcdd_hsc", pre_trained=False), FcddHsc)
    assert isinstance(anomalib.models.get_model("fcdd", pre_trained=False), Fcdd)
    from_dict = anomalib.models.get_model(
        {"class_path": "FcddHsc", "init_args": {"pre_trained": False, "loss": "fcdd"}}
    )
    assert isinstance(from_dict, FcddHsc) and from_dict.loss.name == "fcdd"
    assert anomalib.models.FcddHsc is FcddHsc


def test_original_fcdd_defaults() -> None:
    model = Fcdd(pre_trained=False)
    assert model.loss.name == "fcdd"
    assert model.anomaly_generator.image_level_masks and model.anomaly_generator.confetti.smooth


def test_argument_rewriting() -> None:
    args = ["train", "--model", "fcdd_hsc", "--data", "MVTec", "--data.category", "bottle"]
    assert rewrite_arguments(args) == [
        "train", "--model", "anomalib_fcdd.FcddHsc", "--data", "anomalib_fcdd.data.MVTec", "--data.category", "bottle",
    ]  # fmt: skip
    assert rewrite_arguments(["fit", "--model=Fcdd", "--data=MVTecAD"]) == [
        "fit", "--model=anomalib_fcdd.Fcdd", "--data=MVTecAD",
    ]  # fmt: skip
    assert rewrite_arguments(["export", "--model", "Padim"]) == ["export", "--model", "Padim"]


def run_console(script: str, args: list[str], cwd: Path) -> str:
    executable = Path(sys.executable).with_name(script)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [str(executable), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_anomalib_fcdd_console_script_trains_with_short_names(synthetic_root: Path, tmp_path: Path) -> None:
    args = ["train", "--model", "fcdd_hsc", "--data", "MVTec", *fast_data_args(synthetic_root), *FAST]
    output = run_console("anomalib-fcdd", [*args, "--default_root_dir", str(tmp_path)], tmp_path)
    for name in METRICS:
        assert name in output
    assert list(tmp_path.glob("FcddHsc/MVTec/synthetic/v0/weights/lightning/model.ckpt"))


def test_stock_anomalib_cli_trains_with_full_class_path(synthetic_root: Path, tmp_path: Path) -> None:
    args = ["train", "--model", "anomalib_fcdd.FcddHsc", "--data", "anomalib.data.MVTecAD"]
    args += [*fast_data_args(synthetic_root), *FAST, "--default_root_dir", str(tmp_path)]
    output = run_console("anomalib", args, tmp_path)
    for name in METRICS:
        assert name in output


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_runs_briefly(config: str, synthetic_root: Path, tmp_path: Path) -> None:
    from anomalib.cli.cli import AnomalibCLI

    args = ["train", "--config", str(REPO / "configs" / config), *fast_data_args(synthetic_root), *FAST]
    cli = AnomalibCLI(args=[*args, "--default_root_dir", str(tmp_path)])
    metrics = cli.engine.trainer.callback_metrics
    assert list(tmp_path.rglob("model.ckpt")), f"{config} produced no checkpoint"
    for name in METRICS:
        assert name in metrics
    assert type(cli.engine.trainer.strategy.precision_plugin).__name__ == "Precision", "the paper's settings: fp32"
    semi_supervised = config.startswith("semi")
    assert cli.model.real_anomalies == semi_supervised, "real anomalies are used exactly in the semi-supervised setting"
    if semi_supervised:
        assert len(cli.datamodule.training_anomalies) == 2  # one per defect type (scratch, stain)


def test_anomalib_benchmark_loads_the_plugin_model(synthetic_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "bench.yaml"
    config.write_text(
        "accelerator: cpu\n"
        "benchmark:\n"
        "  seed: 42\n"
        "  model:\n"
        "    class_path: FcddHsc\n"
        "    init_args: {pre_trained: false, epochs: 1, passes_per_epoch: 1, image_size: 64}\n"
        "  data:\n"
        "    class_path: MVTec\n"
        f"    init_args: {{root: {synthetic_root}, category: synthetic, num_workers: 0, train_batch_size: 8}}\n"
    )
    run_console("anomalib-fcdd", ["benchmark", "--config", str(config)], tmp_path)
    results = list(tmp_path.glob("runs/benchmark/*/results.csv"))
    assert results, "anomalib benchmark wrote no results.csv"
    header, row = results[0].read_text().splitlines()[:2]
    assert "pixel_AUPRO" in header and "FcddHsc" in row


def test_training_images_are_decoded_at_240_and_test_images_at_224(trained: tuple) -> None:
    _, _, datamodule, _ = trained
    assert list(datamodule.train_data.augmentations.size) == [240, 240]
    assert list(datamodule.test_data.augmentations.size) == [224, 224]


def test_a_paper_epoch_shuffles_its_passes_together(synthetic_root: Path, tmp_path: Path) -> None:
    """``epochs=2, passes_per_epoch=3`` on N images with batch 5: 2 trainer epochs of ceil(3N / 5) batches, every
    image exactly 3 times per epoch, one validation per paper epoch, and the lr decayed once, after the first."""
    from lightning.pytorch import Callback

    seen: list[tuple[int, list[str], float]] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer: object, module: FcddHsc, batch: object, batch_idx: int) -> None:
            rate = module.optimizers().param_groups[0]["lr"]
            seen.append((module.current_epoch, list(batch.image_path), rate))

    validations: list[int] = []

    class CountValidations(Callback):
        def on_validation_epoch_end(self, trainer: object, module: FcddHsc) -> None:
            validations.append(module.current_epoch)

    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=5, eval_batch_size=8, num_workers=0)
    model = FcddHsc(
        backbone="efficientnet_lite0", pre_trained=False, image_size=32, epochs=2, passes_per_epoch=3, lr_decay=0.5
    )
    engine = Engine(
        default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False,
        callbacks=[Record(), CountValidations()],
    )  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    images = sorted(str(path) for path in (synthetic_root / "synthetic" / "train" / "good").iterdir())
    batches_per_epoch = -(-3 * len(images) // 5)
    assert len(seen) == 2 * batches_per_epoch
    for epoch in (0, 1):
        paths = [path for e, batch, _ in seen if e == epoch for path in batch]
        assert sorted(paths) == sorted(images * 3)
        assert {rate for e, _, rate in seen if e == epoch} == {model.lr * 0.5**epoch}
    assert validations == [0, 1]


def test_cosine_schedule_decays_every_step_to_zero(synthetic_root: Path, tmp_path: Path) -> None:
    """``lr_schedule="cosine"``: the lr of step k of K is ``lr * (1 + cos(pi k / K)) / 2``, stepped every batch."""
    import math

    from lightning.pytorch import Callback

    rates: list[float] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer: object, module: FcddHsc, batch: object, batch_idx: int) -> None:
            rates.append(module.optimizers().param_groups[0]["lr"])

    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=5, eval_batch_size=8, num_workers=0)
    model = FcddHsc(
        backbone="efficientnet_lite0", pre_trained=False, image_size=32, epochs=2, passes_per_epoch=1, lr=0.1,
        lr_schedule="cosine",
    )  # fmt: skip
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False,
                    callbacks=[Record()])  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    images = len(list((synthetic_root / "synthetic" / "train" / "good").iterdir()))
    total = 2 * -(-images // 5)
    assert rates == pytest.approx([0.1 * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)])


def test_feature_noise_scale_is_the_spread_of_the_training_features(synthetic_root: Path, tmp_path: Path) -> None:
    """Before training, the noise scale is measured once: the per-channel standard deviation of the (frozen) backbone
    features of every normal training image (here without confetti or augmentation, so it can be recomputed)."""
    from torchvision.transforms.v2 import InterpolationMode, Resize

    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = FcddHsc(pre_trained=False, image_size=64, epochs=1, passes_per_epoch=1, anomaly_probability=0.0,
                    augment=False)  # fmt: skip
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    images = torch.stack([datamodule.train_data[index].image for index in range(len(datamodule.train_data))])
    model.model.eval()
    with torch.no_grad():
        features = model.model.backbone_features(Resize(64, interpolation=InterpolationMode.NEAREST)(images))
    expected = features.transpose(0, 1).flatten(1).std(dim=1, correction=0)
    torch.testing.assert_close(model.model.feature_noise.spread, expected, rtol=1e-3, atol=1e-5)


def test_step_budget_grows_to_the_backbones_passes_over_a_large_training_set(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``min_passes`` passes over the 16 training images at batch 5 take ceil(3 * 16 / 5) = 10 steps: above the
    4-step floor and under the 12-step cap, so the run takes 10 steps, validates once, at its end, and its cosine
    schedule spans the 10 steps."""
    import dataclasses
    import math

    from lightning.pytorch import Callback

    from anomalib_fcdd.models.fcdd import backbones

    defaults = backbones.TRAINING_DEFAULTS["efficientnet_lite0_multiscale"]
    small = dataclasses.replace(defaults, steps=4, min_passes=3, max_steps=12, heads=1, feature_noise=0.0)
    monkeypatch.setitem(backbones.TRAINING_DEFAULTS, "efficientnet_lite0", small)
    rates: list[float] = []
    validations: list[int] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer: object, module: FcddHsc, batch: object, batch_idx: int) -> None:
            rates.append(module.optimizers().param_groups[0]["lr"])

        def on_validation_epoch_end(self, trainer: object, module: FcddHsc) -> None:
            validations.append(module.global_step)

    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=5, eval_batch_size=8, num_workers=0)
    model = FcddHsc(backbone="efficientnet_lite0", pre_trained=False, image_size=32)
    assert model.trainer_arguments["max_steps"] == 4  # the floor, until the training set is known
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False,
                    callbacks=[Record()])  # fmt: skip
    with caplog.at_level("INFO", logger="anomalib_fcdd.models.fcdd.lightning_model"):
        engine.fit(model, datamodule=datamodule)
    assert len(rates) == 10 and model.global_step == 10
    assert "FCDD: 10 training steps for 16 training images (3 passes)." in caplog.text
    assert re.search(r"FCDD: 10 training steps in all; about \d+\.\d min at the pace of steps 2-6\.", caplog.text)
    assert validations == [10]
    assert rates == pytest.approx([small.lr * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(10)])
