"""Precision choice and the fp32/channels-last guarantees of the fast paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_fcdd.models.fcdd import acceleration
from anomalib_fcdd.models.fcdd.anomaly_generator import ConfettiAnomalyGenerator
from anomalib_fcdd.models.fcdd.anomaly_map import ReceptiveField, ReceptiveFieldUpsampler
from anomalib_fcdd.models.fcdd.augmentation import FcddAugmentation
from anomalib_fcdd.models.fcdd.torch_model import FcddModel


def test_native_bf16_detection_reads_cpu_flags(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor : 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor : 0\nflags\t\t: fpu sse avx2 fma\n")
    assert acceleration.cpu_has_native_bf16(str(amx))
    assert not acceleration.cpu_has_native_bf16(str(avx2))
    assert not acceleration.cpu_has_native_bf16(str(tmp_path / "missing"))


def test_auto_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acceleration.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: True)
    assert acceleration.resolve_precision("auto") == "bf16-mixed"
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: False)
    assert acceleration.resolve_precision("auto") == "32-true"
    assert acceleration.resolve_precision("bf16-mixed") == "bf16-mixed"
    assert acceleration.resolve_precision("32-true") == "32-true"


def test_upsampler_stays_fp32_under_bf16_autocast() -> None:
    upsampler = ReceptiveFieldUpsampler(ReceptiveField(62, 8, 3.5))
    low = torch.rand(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsampler(low, (64, 64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, upsampler(low, (64, 64)))


def test_channels_last_gives_the_same_maps() -> None:
    torch.manual_seed(0)
    fast = FcddModel(pre_trained=False, minmax="bottle", accelerate=True).eval()
    plain = FcddModel(pre_trained=False, minmax="bottle", accelerate=False).eval()
    plain.load_state_dict(fast.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(images).anomaly_map, plain(images).anomaly_map, rtol=1e-4, atol=1e-5)
    assert fast.head.weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_map_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = FcddModel(pre_trained=False, minmax="bottle").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(images).anomaly_map
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(images).anomaly_map
    assert fast.dtype == torch.float32
    assert ((fast - reference).abs().max() / reference.abs().max()).item() < 0.05


def test_bf16_inference_scores_come_from_an_fp32_head() -> None:
    """At inference the 1x1 head sees the bf16 features but computes phi in fp32, so scores are not rounded to bf16.

    Hand computation: the backbone under autocast, then ``conv2d`` in fp32 and ``sqrt(phi^2 + 1) - 1``.
    """
    torch.manual_seed(0)
    model = FcddModel(pre_trained=False, minmax="bottle").eval()
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.low_resolution_map(images)
        features = model.acceleration.backbone(model.features, training=False)(model.normalization(images))
    assert features.dtype == torch.bfloat16
    with torch.no_grad():
        phi = torch.nn.functional.conv2d(features.float(), model.head.weight, model.head.bias)
    expected = torch.sqrt(phi**2 + 1) - 1
    rounded = torch.sqrt(phi.bfloat16().float() ** 2 + 1) - 1  # what a bf16 head would give
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(low, rounded, rtol=1e-3, atol=0), "phi is still rounded to bf16"


@pytest.mark.parametrize("crop_probability", [0.0, 1.0])
def test_augmentation_is_unchanged_by_bf16_autocast(crop_probability: float) -> None:
    """Resize branch (affine grid) and crop branch, colour jitter and noise: identical draws give identical pixels.

    Before the augmentation left autocast, the bf16 sampling grid of the 240 -> 224 resize picked other source pixels
    for about a third of the image and the colours came back rounded to bf16.
    """
    augmentation = FcddAugmentation(size=224, crop_probability=crop_probability)
    images = torch.rand(4, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    masks = torch.rand(4, 1, 240, 240, generator=torch.Generator().manual_seed(1)) > 0.7
    plain = augmentation(images, masks, torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = augmentation(images, masks, torch.Generator().manual_seed(2))
    assert mixed[0].dtype == torch.float32
    assert torch.equal(mixed[0], plain[0])
    assert torch.equal(mixed[1], plain[1])


def test_smoothed_confetti_is_unchanged_by_bf16_autocast() -> None:
    generator = ConfettiAnomalyGenerator(probability=1.0, smooth=True)
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    plain = generator(images, torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = generator(images, torch.Generator().manual_seed(3))
    assert plain[1].any()
    assert mixed[0].dtype == torch.float32
    assert torch.equal(mixed[0], plain[0])
    assert torch.equal(mixed[1], plain[1])


@pytest.mark.parametrize(
    ("requested", "cpu_bf16", "expected"),
    [("auto", False, "32-true"), ("auto", True, "bf16-mixed"), ("bf16-mixed", False, "bf16-mixed")],
)
def test_auto_precision_follows_the_device_the_run_uses(
    requested: str,
    cpu_bf16: bool,
    expected: str,
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bf16 GPU machine, run on its CPU: ``auto`` is settled for the CPU, an explicit precision is left alone.

    ``trainer_arguments`` resolves ``auto`` before the trainer exists, for the GPU; the steps must still autocast
    exactly when the CPU computes bf16 natively.
    """
    from anomalib.engine import Engine

    from anomalib_fcdd import FcddHsc
    from anomalib_fcdd.data import MVTec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda *args: cpu_bf16)
    model = FcddHsc(
        backbone="efficientnet_lite0",
        pre_trained=False,
        image_size=64,
        epochs=1,
        passes_per_epoch=1,
        precision=requested,
    )
    assert model.trainer_arguments["precision"] == "bf16-mixed", "resolved for the GPU, as Lightning sees no device yet"
    autocast_in_steps: list[bool] = []
    step = model.training_step

    def recording_step(*args: object, **kwargs: object) -> object:
        autocast_in_steps.append(torch.is_autocast_enabled("cpu"))
        return step(*args, **kwargs)

    monkeypatch.setattr(model, "training_step", recording_step)
    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    assert engine.trainer.precision == expected
    assert autocast_in_steps and all(enabled == (expected == "bf16-mixed") for enabled in autocast_in_steps)


def _vgg_conv_bn_pair() -> torch.nn.Sequential:
    torch.manual_seed(0)
    pair = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with torch.no_grad():
        pair[1].running_mean.uniform_(-1, 1)
        pair[1].running_var.uniform_(0.5, 2)
        pair[1].weight.uniform_(0.5, 2)
        pair[1].bias.uniform_(-1, 1)
    return pair.eval()


def test_folded_convolution_matches_the_batchnorm_formula_by_hand() -> None:
    pair = _vgg_conv_bn_pair()
    folded = acceleration.fold_conv_batchnorm(pair)
    assert folded is not None and len(folded) == 2  # conv (with BN folded in) + ReLU
    conv, norm = pair[0], pair[1]
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(folded[0].weight, conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded[0].bias, (conv.bias - norm.running_mean) * scale + norm.bias)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), pair(x), rtol=1e-5, atol=1e-6)


def test_nothing_to_fold_gives_none() -> None:
    assert acceleration.fold_conv_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())) is None
    assert acceleration.fold_conv_batchnorm(torch.nn.Conv2d(3, 4, 3)) is None


def test_folded_backbone_is_used_only_at_inference_and_forgotten_when_weights_change() -> None:
    model = FcddModel(backbone="vgg11_bn", pre_trained=False, minmax="bottle").eval()
    with torch.no_grad():
        folded = model.acceleration.backbone(model.features, training=False)
        assert folded is not model.features
        assert model.acceleration.backbone(model.features, training=False) is folded  # kept between batches
    assert model.acceleration.backbone(model.features, training=False) is model.features  # autograd on
    model.train()
    model.eval()
    with torch.no_grad():
        assert model.acceleration.backbone(model.features, training=False) is not folded  # rebuilt after training
        again = model.acceleration.backbone(model.features, training=False)
        model.load_state_dict(model.state_dict())
        assert model.acceleration.backbone(model.features, training=False) is not again  # rebuilt after a load
    assert "folded" not in str(torch.nn.Module.state_dict(model).keys())


def test_accelerated_and_plain_models_give_the_same_maps_after_training_steps() -> None:
    torch.manual_seed(0)
    fast = FcddModel(backbone="vgg11_bn", pre_trained=False, minmax="bottle", accelerate=True)
    plain = FcddModel(backbone="vgg11_bn", pre_trained=False, minmax="bottle", accelerate=False)
    plain.load_state_dict(fast.state_dict())
    images = torch.rand(2, 3, 64, 64)
    for model in (fast, plain):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        model(images).anomaly_map.mean().backward()
        optimizer.step()
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(images).anomaly_map, plain(images).anomaly_map, rtol=1e-4, atol=1e-5)
