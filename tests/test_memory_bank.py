"""The memory of normal features behind ``image_score="memory"``: pool, PCA basis, coreset, distances, training,
checkpoints and export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchvision.transforms.v2.functional import InterpolationMode, resize

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.data import MVTec
from anomalib_fcdd.data.decode import decode_image_tensor
from anomalib_fcdd.errors import ConfigurationError
from anomalib_fcdd.models.fcdd import FcddModel
from anomalib_fcdd.models.fcdd.anomaly_map import ReceptiveFieldUpsampler
from anomalib_fcdd.models.fcdd.backbones import build_backbone
from anomalib_fcdd.models.fcdd.backbones.efficientnet_lite import stage_channel_ranges
from anomalib_fcdd.models.fcdd.memory_bank import (
    FeatureMemory,
    PositionPool,
    greedy_coreset,
    local_features,
    principal_basis,
    select_channels,
)


def average_over_neighbours(features: torch.Tensor, zero_padded: bool = True, size: int = 3) -> torch.Tensor:
    """Each position's ``size`` x ``size`` window, one position at a time: its sum over the part inside the grid
    divided by ``size ** 2`` (zeros outside) or by the number of positions inside."""
    height, width = features.shape[-2:]
    reach = size // 2
    averaged = torch.zeros_like(features)
    for row in range(height):
        for col in range(width):
            window = features[:, :, max(0, row - reach) : row + reach + 1, max(0, col - reach) : col + reach + 1]
            count = size * size if zero_padded else window.shape[2] * window.shape[3]
            averaged[:, :, row, col] = window.sum(dim=(2, 3)) / count
    return averaged


# ---------------------------------------------------------------------------------------------------------------------
# The parts, against hand computations
# ---------------------------------------------------------------------------------------------------------------------
def test_greedy_coreset_adds_the_point_farthest_from_those_chosen() -> None:
    # On a line at 0, 1, 2, 3, 10: start at 0, then 10 (farthest), then 3 (3 from 0, 7 from 10); then 1 and 2 both lie
    # 1 from a chosen point (0 and 3), and the first of the tie, index 1, comes fourth.
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert greedy_coreset(points, 3).tolist() == [0, 4, 3]
    assert greedy_coreset(points, 4).tolist() == [0, 4, 3, 1]
    assert sorted(greedy_coreset(points, 9).tolist()) == [0, 1, 2, 3, 4]  # at most every point


def test_principal_basis_finds_the_axes_of_an_elongated_cloud() -> None:
    # Points spread 10 along the second axis, 1 along the third and not at all along the first, centred at (5, 1, -2).
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(2000, 3, generator=generator) * torch.tensor([0.0, 10.0, 1.0])
    mean, basis = principal_basis(offsets + torch.tensor([5.0, 1.0, -2.0]), 2)
    torch.testing.assert_close(mean, torch.tensor([5.0, 1.0, -2.0]), atol=0.6, rtol=0)
    torch.testing.assert_close(basis, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), atol=1e-2, rtol=0)


def test_position_pool_takes_the_same_number_of_distinct_positions_from_every_image() -> None:
    # 3 images of 2 x 3 positions; each vector encodes (image, position) so the draw can be read back.
    images, positions = 3, 6
    codes = torch.arange(images * positions, dtype=torch.float32).view(images, 1, 2, 3)
    features = torch.cat([codes, -codes], dim=1)  # B x 2 x 2 x 3
    pool = PositionPool(capacity=7, images=images, generator=torch.Generator().manual_seed(0))
    assert pool.per_image == math.ceil(7 / 3) == 3
    pool.add(features[:2])
    pool.add(features[2:])
    pool.add(features)  # full: ignored
    vectors = pool.vectors()
    assert vectors.shape == (7, 2)
    torch.testing.assert_close(vectors[:, 1], -vectors[:, 0])
    drawn = vectors[:, 0].long()
    assert len(set(drawn.tolist())) == 7, "no position twice"
    assert (drawn // positions).tolist().count(0) == 3 and (drawn // positions).tolist().count(1) == 3


def test_empty_pool_says_why() -> None:
    with pytest.raises(ValueError, match="no normal image"):
        PositionPool(capacity=5, images=2).vectors()


def test_a_full_dimensional_memory_measures_plain_euclidean_distances() -> None:
    # PCA with every dimension is a rotation about the mean: distances in it are the original ones. With room for
    # every pool vector, the map is each position's distance to its nearest pool vector, computed here by brute force.
    generator = torch.Generator().manual_seed(1)
    pool = torch.randn(40, 5, generator=generator) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1])
    memory = FeatureMemory(size=40, dim=5)
    memory.fit(pool)
    features = torch.randn(2, 5, 3, 4, generator=generator)
    queries = features.flatten(2).transpose(1, 2)  # 2 x 12 x 5
    expected = (queries[:, :, None, :] - pool[None, None]).pow(2).sum(-1).amin(-1).sqrt().view(2, 1, 3, 4)
    torch.testing.assert_close(memory.distance_map(features), expected, atol=1e-4, rtol=1e-4)
    # a pool vector itself lies at distance 0
    torch.testing.assert_close(
        memory.distance_map(pool[:3].T.reshape(1, 5, 1, 3)), torch.zeros(1, 1, 1, 3), atol=2e-3, rtol=0
    )


def test_a_one_dimensional_memory_measures_along_the_main_axis_only() -> None:
    # Pool on the x axis at -2, 0, 2 (mean 0) plus a tiny y spread: one PCA dimension keeps x. A query at (1.5, 7)
    # projects to x = 1.5, whose nearest memory point is 2: distance 0.5, the y offset ignored.
    pool = torch.tensor([[-2.0, 0.01], [0.0, -0.02], [2.0, 0.01]])  # x and y uncorrelated
    memory = FeatureMemory(size=3, dim=1)
    memory.fit(pool)
    query = torch.tensor([1.5, 7.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(memory.distance_map(query), torch.tensor([[[[0.5]]]]), atol=1e-4, rtol=0)


def test_unbuilt_memory_says_how_to_get_one() -> None:
    with pytest.raises(RuntimeError, match="Train it"):
        FeatureMemory().distance_map(torch.zeros(1, 4, 2, 2))


def test_a_trained_memory_loads_into_a_fresh_model() -> None:
    memory = FeatureMemory(size=4, dim=2)
    memory.fit(torch.randn(20, 3, generator=torch.Generator().manual_seed(2)))
    fresh = FeatureMemory(size=4, dim=2)
    assert not fresh.ready
    fresh.load_state_dict(memory.state_dict())
    assert fresh.ready
    features = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(fresh.distance_map(features), memory.distance_map(features))


def test_only_memory_scored_models_carry_a_memory() -> None:
    assert FcddModel(pre_trained=False, image_score="max").memory is None
    model = FcddModel(pre_trained=False, image_score="memory", memory_size=7, memory_dim=3, frozen_bn_train_mode=False)
    assert (model.memory.size, model.memory.dim) == (7, 3)
    assert not model.features_change_in_training, "the multi-scale backbone is frozen and its BatchNorms in eval"
    assert FcddModel(backbone="vgg11_bn", pre_trained=False).features_change_in_training


@pytest.mark.parametrize(("name", "value"), [("memory_size", 0), ("memory_dim", 2.5)])
def test_impossible_memory_options_are_refused(name: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=name):
        FcddHsc(pre_trained=False, image_score="memory", **{name: value})


# ---------------------------------------------------------------------------------------------------------------------
# Training, checkpoint and export
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FcddHsc, Engine]:
    seed_everything(0, workers=True)
    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0)
    # the heads' map alone here; the fused one: test_map_fusion.py
    model = FcddHsc(
        image_score="memory", fused_map=False, memory_size=300, memory_dim=16, image_size=64, epochs=1,
        passes_per_epoch=1,
    )  # fmt: skip
    engine = Engine(
        default_root_dir=tmp_path_factory.mktemp("memory_run"),
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=datamodule)
    return model.eval(), engine


def test_training_builds_the_memory_from_the_normal_training_images(trained: tuple[FcddHsc, Engine]) -> None:
    model, _ = trained
    memory = model.model.memory
    # 16 training images of 8 x 8 positions at 64 px: 1,024 candidates, 300 kept, 16 PCA dimensions of the 40 + 112
    # channels of the stride-8 and deepest stages, averaged over 5 x 5 neighbours with zeros past the border (the
    # multi-scale backbone's defaults)
    assert (memory.channels, memory.neighbourhood, memory.zero_padded) == (((0, 40), (120, 232)), 5, True)
    assert memory.vectors.shape == (300, 16) and memory.basis.shape == (152, 16) and memory.mean.shape == (152,)
    torch.testing.assert_close(memory.basis.T @ memory.basis, torch.eye(16), atol=1e-4, rtol=0)


def test_image_score_is_the_peak_of_the_upsampled_memory_distances(trained: tuple[FcddHsc, Engine]) -> None:
    model, _ = trained
    net = model.model
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = net(images)
        features = net.backbone_features(images)
        compared = average_over_neighbours(torch.cat([features[:, :40], features[:, 120:]], dim=1), size=5)
        vectors = (compared.flatten(2).transpose(1, 2) - net.memory.mean) @ net.memory.basis
        nearest = torch.cdist(vectors, net.memory.vectors[None].expand(2, -1, -1)).amin(-1).view(2, 1, 8, 8)
        expected = net.upsampler(nearest, (64, 64)).amax(dim=(1, 2, 3))
        low_res = net.low_resolution_map(images)
        # the map stays FCDD's: its heads' scores upsampled as a weighted mean (the default normalized_map) of a
        # Gaussian of sigma 8 (the default map_gauss_std); the image score keeps the training loss's sigma 12
        sum_of_gaussians = ReceptiveFieldUpsampler(net.upsampler.receptive_field, 8.0)
        heads_map = sum_of_gaussians(low_res, (64, 64)) / sum_of_gaussians(torch.ones_like(low_res[:1]), (64, 64))
    torch.testing.assert_close(output.pred_score, expected, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(output.anomaly_map, heads_map)


def test_checkpoint_and_openvino_export_score_with_the_memory(trained: tuple[FcddHsc, Engine], tmp_path: Path) -> None:
    model, engine = trained
    callback = engine.trainer.checkpoint_callback
    checkpoint = callback.best_model_path or callback.last_model_path
    reloaded = FcddHsc.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model.model(images).pred_score
        torch.testing.assert_close(reloaded.model(images).pred_score, expected)
        eager = model(images)
    path = model.to_openvino(tmp_path / "ov", onnx_kwargs={"opset_version": 18})
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(images.numpy())
    outputs = {output.any_name: result[output] for output in compiled.outputs}
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), eager.pred_score.numpy().reshape(-1), atol=1e-4)
    np.testing.assert_allclose(outputs["anomaly_map"], eager.anomaly_map.numpy(), atol=1e-4)


def test_the_memory_sees_training_images_resized_once_as_test_images_are(trained: tuple[FcddHsc, Engine]) -> None:
    # Training decodes images to 240/224 of the input size (69 px here) and crops them in the model; the memory
    # compares test images, decoded and resized once to 64 px, so it must see the training images that way too.
    model, _ = trained
    seen = next(iter(model._normal_training_images(as_tested=True)))
    paths = model.trainer.datamodule.train_data.samples.image_path.iloc[: len(seen)]
    originals = [decode_image_tensor(path) for path in paths]
    expected = torch.stack([resize(image, [64, 64], InterpolationMode.NEAREST) for image in originals])
    torch.testing.assert_close(seen, expected)
    # training's own batches stay at the training size
    assert next(iter(model._normal_training_images())).shape[-2:] == (69, 69)


@pytest.mark.parametrize(("backbone", "builds"), [("efficientnet_lite0_multiscale", 1), ("efficientnet_lite0", 2)])
def test_the_memory_is_rebuilt_only_when_training_changes_the_features(
    backbone: str, builds: int, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two paper epochs, each validated: the frozen multi-scale backbone's memory is built once; efficientnet_lite0
    # trains its stride-8 stage, so its memory is rebuilt before the second validation, and not again at the end.
    calls = []
    original = FcddHsc._build_memory
    monkeypatch.setattr(FcddHsc, "_build_memory", lambda self: (calls.append(self.trainer.global_step), original(self)))
    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = FcddHsc(
        backbone=backbone, pre_trained=False, image_score="memory", memory_size=50, image_size=64, epochs=2,
        passes_per_epoch=1, frozen_bn_train_mode=False, visualizer=False,
    )  # fmt: skip
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    assert len(calls) == builds
    assert model.model.memory.ready


def test_weights_saved_without_a_memory_load_and_score_by_the_maps_peak(caplog: pytest.LogCaptureFixture) -> None:
    # A checkpoint of the multi-scale model from before the memory became its default holds no memory keys.
    old = FcddModel(pre_trained=False, minmax="bottle", image_score="max", frozen_bn_train_mode=False).eval()
    new = FcddModel(pre_trained=False, minmax="bottle", image_score="memory", frozen_bn_train_mode=False)
    with caplog.at_level("WARNING"):
        new.load_state_dict(old.state_dict())
    assert new.memory is None and new.image_score == "max"
    assert "no image-score memory" in caplog.text
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, actual = old(images), new.eval()(images)
    torch.testing.assert_close(actual.pred_score, expected.anomaly_map.amax(dim=(1, 2, 3)))
    torch.testing.assert_close(actual.pred_score, expected.pred_score)


def test_local_features_count_zeros_past_the_border_as_patchcore_pools() -> None:
    grid = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)  # 0 1 2 / 3 4 5 / 6 7 8
    pooled = local_features(grid, 3)
    assert pooled[0, 0, 1, 1] == 4.0  # the mean of all nine
    assert pooled[0, 0, 0, 0] == (0 + 1 + 3 + 4) / 9  # a corner: four neighbours and five zeros
    assert pooled[0, 0, 0, 1] == (0 + 1 + 2 + 3 + 4 + 5) / 9  # an edge: six and three zeros
    assert torch.equal(local_features(grid, 1), grid)


def test_local_features_without_zero_padding_average_the_neighbours_that_exist() -> None:
    grid = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)
    pooled = local_features(grid, 3, zero_padded=False)
    assert pooled[0, 0, 1, 1] == 4.0
    assert pooled[0, 0, 0, 0] == (0 + 1 + 3 + 4) / 4  # a corner has four
    assert pooled[0, 0, 0, 1] == (0 + 1 + 2 + 3 + 4 + 5) / 6  # an edge six


def test_a_neighbourhood_memory_compares_averaged_features() -> None:
    # Fitted on pooled vectors, a 3 x 3 memory scores features as a plain memory scores their hand-made averages.
    generator = torch.Generator().manual_seed(6)
    pool = torch.randn(30, 4, generator=generator)
    features = torch.randn(1, 4, 3, 3, generator=generator)
    plain = FeatureMemory(size=30, dim=4)
    plain.fit(pool)
    for zero_padded in (True, False):
        local = FeatureMemory(size=30, dim=4, neighbourhood=3, zero_padded=zero_padded)
        local.fit(pool)
        averaged = average_over_neighbours(features, zero_padded)
        torch.testing.assert_close(local.distance_map(features), plain.distance_map(averaged), atol=1e-4, rtol=1e-4)


def test_even_neighbourhoods_are_refused() -> None:
    with pytest.raises(ValueError, match="odd"):
        FeatureMemory(neighbourhood=2)
    with pytest.raises(ConfigurationError, match="memory_neighbourhood"):
        FcddHsc(pre_trained=False, image_score="memory", memory_neighbourhood=2)


def test_select_channels_joins_the_ranges_in_order() -> None:
    features = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1)  # channel c holds c
    assert select_channels(features, ((4, 6), (0, 2))).flatten().tolist() == [4.0, 5.0, 0.0, 1.0]
    assert torch.equal(select_channels(features, ()), features)
    with pytest.raises(ValueError, match="ranges"):
        FeatureMemory(channels=((3, 3),))


def test_the_multiscale_memory_reads_the_stride_8_and_deepest_stages() -> None:
    # The ranges come from Lite0's stage widths; check them against the real stage outputs' channel counts.
    assert stage_channel_ranges((2, 3, 4), (2, 4)) == ((0, 40), (120, 232))
    built = build_backbone("efficientnet_lite0_multiscale", pre_trained=False)
    trunk, taps = built.features.trunk, built.features.taps
    widths, x = [], torch.zeros(1, 3, 32, 32)
    for index, layer in enumerate(trunk):
        x = layer(x)
        if index in taps:
            widths.append(x.shape[1])
    assert widths == [40, 80, 112] and built.memory_channels == ((0, 40), (40 + 80, 40 + 80 + 112))
    assert build_backbone("efficientnet_lite0", pre_trained=False).memory_channels == ()  # one stage: all of it
    default = FcddHsc(pre_trained=False).model.memory
    assert (default.channels, default.neighbourhood, default.zero_padded) == (((0, 40), (120, 232)), 5, True)
    assert FcddHsc(pre_trained=False, memory_neighbourhood=1).model.memory.neighbourhood == 1


def test_a_saved_memory_reads_features_as_it_was_built() -> None:
    # How a memory reads features travels with it: loaded into a memory built with other settings, it scores as saved.
    generator = torch.Generator().manual_seed(7)
    saved = FeatureMemory(size=10, dim=2, neighbourhood=3, channels=((1, 3),), zero_padded=False)
    saved.fit(torch.randn(30, 2, generator=generator))
    other = FeatureMemory(size=10, dim=2)
    other.load_state_dict(saved.state_dict())
    assert (other.channels, other.neighbourhood, other.zero_padded) == (((1, 3),), 3, False)
    features = torch.randn(1, 4, 3, 3, generator=generator)
    torch.testing.assert_close(other.distance_map(features), saved.distance_map(features))


def test_a_memory_saved_before_its_reading_was_stored_compares_every_channel_unaveraged() -> None:
    generator = torch.Generator().manual_seed(8)
    plain = FeatureMemory(size=10, dim=3)
    plain.fit(torch.randn(30, 3, generator=generator))
    legacy = {key: value for key, value in plain.state_dict().items() if not key.endswith("_extra_state")}
    fresh = FeatureMemory(size=10, dim=3, neighbourhood=3, channels=((0, 2),))  # today's kind of default
    fresh.load_state_dict(legacy)
    assert (fresh.channels, fresh.neighbourhood) == ((), 1)
    features = torch.randn(2, 3, 4, 4, generator=generator)
    torch.testing.assert_close(fresh.distance_map(features), plain.distance_map(features))


def test_a_memory_saved_before_borders_were_zero_padded_averages_the_neighbours_that_exist() -> None:
    # Its saved reading has channels and a neighbourhood but no zero_padded: it loads as built, without zeros.
    generator = torch.Generator().manual_seed(9)
    built = FeatureMemory(size=10, dim=3, neighbourhood=3, zero_padded=False)
    built.fit(torch.randn(30, 3, generator=generator))
    state = built.state_dict()
    state["_extra_state"] = {"channels": [], "neighbourhood": 3}
    fresh = FeatureMemory(size=10, dim=3, neighbourhood=3)
    fresh.load_state_dict(state)
    assert fresh.zero_padded is False
    features = torch.randn(2, 3, 4, 4, generator=generator)
    torch.testing.assert_close(fresh.distance_map(features), built.distance_map(features))
