"""The fused map: the heads' scores plus the memory's distances, each over its spread on normal positions."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.data import MVTec
from anomalib_fcdd.models.fcdd import FcddModel
from anomalib_fcdd.models.fcdd.anomaly_map import ReceptiveFieldUpsampler
from anomalib_fcdd.models.fcdd.backbones import training_defaults
from anomalib_fcdd.models.fcdd.map_fusion import CalibrationSample, MapFusion


def test_spreads_are_the_population_standard_deviations() -> None:
    fusion = MapFusion()
    assert not fusion.ready
    # heads 1, 3: mean 2, deviations +-1 -> 1; distances 0, 4, 8: mean 4, squares 16, 0, 16 -> sqrt(32 / 3)
    fusion.calibrate(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 4.0, 8.0]))
    assert fusion.ready
    torch.testing.assert_close(fusion.spreads, torch.tensor([1.0, (32 / 3) ** 0.5]))
    heads, distances = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 3.0)
    torch.testing.assert_close(fusion(heads, distances), torch.full((1, 1, 2, 2), 2.0 + 3.0 / (32 / 3) ** 0.5))


def test_a_scorer_constant_on_normal_data_does_not_divide_by_zero() -> None:
    fusion = MapFusion()
    fusion.calibrate(torch.zeros(5), torch.arange(5.0))
    assert fusion.ready and torch.isfinite(fusion(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))).all()


def test_an_uncalibrated_fusion_says_how_to_get_its_spreads() -> None:
    with pytest.raises(RuntimeError, match="fused_map needs the spreads"):
        MapFusion()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="at least two"):
        MapFusion().calibrate(torch.ones(1), torch.ones(3))


def test_fused_map_is_the_multiscale_default_and_brings_the_memory() -> None:
    assert training_defaults("efficientnet_lite0_multiscale").fused_map
    assert not training_defaults("vgg11_bn").fused_map
    assert FcddHsc(pre_trained=False).model.map_fusion is not None
    assert FcddHsc(pre_trained=False, fused_map=False).model.map_fusion is None
    # the memory comes with the fused map even where images are scored otherwise
    model = FcddModel(pre_trained=False, image_score="max", fused_map=True)
    assert model.memory is not None and model.map_fusion is not None
    assert FcddModel(pre_trained=False, image_score="max").memory is None


@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> FcddHsc:
    """The multi-scale defaults, two paper epochs each validated, on the synthetic category at 64 px."""
    seed_everything(0, workers=True)
    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = FcddHsc(
        pre_trained=False, memory_size=100, memory_dim=8, image_size=64, epochs=2, passes_per_epoch=1, visualizer=False
    )
    calls = []
    original = FcddModel.calibrate_map
    engine = Engine(
        default_root_dir=tmp_path_factory.mktemp("fusion_run"),
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            FcddModel,
            "calibrate_map",
            lambda net, sample: (calls.append(model.trainer.global_step), original(net, sample)),
        )
        engine.fit(model, datamodule=datamodule)
    model.calibrations = calls
    return model.eval()


def test_the_spreads_are_measured_again_whenever_the_heads_may_have_changed(trained: FcddHsc) -> None:
    # before each of the two validations and at the end of the fit; the frozen backbone's memory is built once
    steps = trained.calibrations
    assert len(steps) == 3 and steps[0] < steps[1] == steps[2]


def test_the_spreads_are_those_of_the_heads_and_memory_on_the_sampled_training_positions(trained: FcddHsc) -> None:
    net, sample = trained.model, trained._calibration
    # 16 training images of 8 x 8 positions: fewer than the sample's size, so every position is in it
    assert isinstance(sample, CalibrationSample) and sample.features.shape == (16 * 64, 232)
    assert sample.memory_features.shape == (16 * 64, 152)
    with torch.no_grad():
        heads = net.map_of_features(sample.features.T.reshape(1, 232, 16, 64)).flatten()
        projected = (sample.memory_features - net.memory.mean) @ net.memory.basis
        distances = torch.cdist(projected, net.memory.vectors).amin(dim=1)
    expected = torch.stack([heads.std(correction=0), distances.std(correction=0)])
    torch.testing.assert_close(net.map_fusion.spreads, expected, rtol=1e-3, atol=1e-6)


def test_the_map_adds_the_scaled_heads_scores_and_memory_distances(trained: FcddHsc) -> None:
    net = trained.model
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = net(images)
        features = net.backbone_features(images)
        heads = net.map_of_features(features)
        # the default reading: the stride-8 and deepest stages, each vector averaged over its 5 x 5 neighbours,
        # zeros past the border counted
        compared = torch.nn.functional.avg_pool2d(
            torch.cat([features[:, :40], features[:, 120:]], dim=1), 5, stride=1, padding=2
        )
        vectors = (compared.flatten(2).transpose(1, 2) - net.memory.mean) @ net.memory.basis
        nearest = torch.cdist(vectors, net.memory.vectors[None].expand(2, -1, -1)).amin(-1).view(2, 1, 8, 8)
        spread_heads, spread_memory = net.map_fusion.spreads
        fused = heads / spread_heads + nearest / spread_memory
        # upsampled as a weighted mean (the default normalized_map) of a Gaussian of sigma 8 (the default
        # map_gauss_std): the Gaussian sum over the sum of the weights
        sum_of_gaussians = ReceptiveFieldUpsampler(net.upsampler.receptive_field, 8.0)
        weighted_mean = sum_of_gaussians(fused, (64, 64)) / sum_of_gaussians(torch.ones_like(fused[:1]), (64, 64))
        image_score = net.upsampler(nearest, (64, 64)).amax(dim=(1, 2, 3))
    torch.testing.assert_close(output.anomaly_map, weighted_mean, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(output.pred_score, image_score, atol=1e-3, rtol=1e-4)


def test_weights_saved_without_spreads_draw_the_heads_map(caplog: pytest.LogCaptureFixture) -> None:
    # A checkpoint from before fused_map: a memory for the image score, but no spreads.
    old = FcddModel(pre_trained=False, minmax="bottle", image_score="memory", frozen_bn_train_mode=False)
    old.memory.fit(torch.randn(300, 152, generator=torch.Generator().manual_seed(0)))
    new = FcddModel(
        pre_trained=False, minmax="bottle", image_score="memory", fused_map=True, frozen_bn_train_mode=False
    )
    with caplog.at_level("WARNING"):
        new.load_state_dict(old.state_dict())
    assert new.map_fusion is None and new.memory is not None and new.image_score == "memory"
    assert "no spreads for the fused map" in caplog.text
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, actual = old.eval()(images), new.eval()(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)


def test_checkpoint_and_openvino_export_draw_the_fused_map(trained: FcddHsc, tmp_path: Path) -> None:
    checkpoint = tmp_path / "fused.ckpt"
    trained.trainer.save_checkpoint(checkpoint)
    reloaded = FcddHsc.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = trained(images)
        torch.testing.assert_close(reloaded.model.map_fusion.spreads, trained.model.map_fusion.spreads)
        torch.testing.assert_close(reloaded(images).anomaly_map, eager.anomaly_map)
    path = trained.to_openvino(tmp_path / "ov", onnx_kwargs={"opset_version": 18})
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(images.numpy())
    outputs = {output.any_name: result[output] for output in compiled.outputs}
    np.testing.assert_allclose(outputs["anomaly_map"], eager.anomaly_map.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), eager.pred_score.numpy().reshape(-1), atol=1e-4)


def test_a_pickled_model_leaves_the_calibration_sample_behind(trained: FcddHsc) -> None:
    # Engine.export(..., "torch") pickles the module: the 10,000 training positions would triple the artefact.
    assert trained._calibration is not None
    restored = pickle.loads(pickle.dumps(trained))
    assert restored._calibration is None
    torch.testing.assert_close(restored.model.map_fusion.spreads, trained.model.map_fusion.spreads)
    assert restored.model.map_fusion.ready
