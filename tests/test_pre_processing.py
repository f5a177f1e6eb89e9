"""LCN and min-max normalisation against hand computations; constants computed from a generated dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_fcdd.errors import ConfigurationError
from anomalib_fcdd.models.fcdd.pre_processing import (
    MVTEC_MINMAX,
    FcddPreProcessor,
    InputNormalization,
    MinMaxAccumulator,
    aspect_preserving_size,
    local_contrast_normalization,
    median_aspect_ratio,
    resolve_minmax,
    smooth_resize,
)


def test_lcn_by_hand() -> None:
    image = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0]).view(1, 3, 2, 2)
    values = image.flatten().tolist()
    mean = sum(values) / len(values)
    mad = sum(abs(v - mean) for v in values) / len(values)
    expected = torch.tensor([(v - mean) / mad for v in values]).view(1, 3, 2, 2)
    torch.testing.assert_close(local_contrast_normalization(image), expected)


def test_lcn_is_per_image_and_constant_image_is_only_centred() -> None:
    batch = torch.stack([torch.full((3, 2, 2), 0.7), torch.arange(12.0).view(3, 2, 2)])
    out = local_contrast_normalization(batch)
    assert torch.equal(out[0], torch.zeros(3, 2, 2))
    assert out[1].abs().mean().item() == pytest.approx(1.0)


def test_minmax_by_hand() -> None:
    norm = InputNormalization([-1.0, -2.0, -3.0, 1.0, 2.0, 5.0])
    image = torch.tensor([0.0, 1.0]).repeat_interleave(6).view(1, 3, 2, 2)  # LCN: -1 / +1 per half
    lcn = local_contrast_normalization(image)
    out = norm(image)
    lows, highs = (-1.0, -2.0, -3.0), (1.0, 2.0, 5.0)
    for c in range(3):
        expected = (lcn[0, c] - lows[c]) / (highs[c] - lows[c])
        torch.testing.assert_close(out[0, c], expected)


def test_shipped_mvtec_constants() -> None:
    table = resolve_minmax("bottle")
    assert table.shape == (2, 3)
    assert table[0, 0].item() == pytest.approx(-1.3336724042892456)
    assert table[1, 2].item() == pytest.approx(1.3779616355895996)
    assert len(MVTEC_MINMAX) == 15


@pytest.mark.parametrize(
    ("constants", "message"),
    [([1.0, 2.0, 3.0], "need 6 numbers"), ("not_a_category", "No shipped"), ([0, 0, 0, 1, 1, -1], "above its minimum")],
)
def test_bad_constants_are_explained(constants: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_minmax(constants)


def test_constants_computed_from_generated_dataset(synthetic_root) -> None:
    files = sorted((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))
    accumulator = MinMaxAccumulator()
    for start in range(0, len(files), 5):  # batches of 5, to exercise the running update
        batch = [
            torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) / 255
            for f in files[start : start + 5]
        ]
        accumulator.update(torch.stack(batch))
    # Independent computation with numpy over all images at once.
    arrays = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) / 255 for f in files])
    centred = arrays - arrays.mean(axis=(1, 2, 3), keepdims=True)
    lcn = centred / np.abs(centred).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(accumulator.table()[0].numpy(), lcn.min(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(accumulator.table()[1].numpy(), lcn.max(axis=(0, 1, 2)), rtol=1e-5)
    assert accumulator.count == len(files)


def test_normalization_refuses_to_run_on_placeholder_constants() -> None:
    """No constants, no scores: set ones, or ones loaded with a checkpoint, make it run; unready ones stop it again."""
    images = torch.rand(1, 3, 8, 8)
    norm = InputNormalization(None)
    assert not bool(norm.ready)
    with pytest.raises(ConfigurationError, match="no min-max constants yet"):
        norm(images)
    norm.set_constants(torch.tensor([[-1.0, -2, -4], [1, 2, 4]]))
    assert bool(norm.ready)
    expected = (local_contrast_normalization(images) - torch.tensor([-1.0, -2, -4]).view(1, 3, 1, 1)) / torch.tensor(
        [2.0, 4, 8]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(images), expected)

    restored = InputNormalization(None)
    restored.load_state_dict(norm.state_dict())
    torch.testing.assert_close(restored(images), expected)
    restored.load_state_dict(InputNormalization(None).state_dict())
    with pytest.raises(ConfigurationError, match="no min-max constants yet"):
        restored(images)


def test_a_module_pickled_without_the_readiness_mirror_still_runs() -> None:
    """Whole models saved (``torch.save``) by earlier versions lack ``_has_constants``; ``ready`` decides then."""
    norm = InputNormalization("bottle")
    del norm.__dict__["_has_constants"]
    images = torch.rand(1, 3, 8, 8)
    table = torch.tensor(MVTEC_MINMAX["bottle"]).view(2, 3)
    expected = (local_contrast_normalization(images) - table[0].view(1, 3, 1, 1)) / (table[1] - table[0]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(norm(images), expected)


def test_an_untrained_model_without_constants_refuses_to_score() -> None:
    from anomalib_fcdd.models.fcdd.torch_model import FcddModel

    model = FcddModel(backbone="efficientnet_lite0", pre_trained=False).eval()
    with torch.no_grad(), pytest.raises(ConfigurationError, match="Train the model first"):
        model(torch.rand(1, 3, 32, 32))


def test_input_normalization_follows_the_backbone_and_can_be_overridden() -> None:
    from anomalib_fcdd.models.fcdd.pre_processing import InputNormalization, WeightsNormalization
    from anomalib_fcdd.models.fcdd.torch_model import FcddModel

    lite = FcddModel(backbone="efficientnet_lite0", pre_trained=True)
    assert lite.input_normalization == "weights" and isinstance(lite.normalization, WeightsNormalization)
    images = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(lite.normalization(images)[0, :, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))  # [-1, 1]
    assert FcddModel(backbone="vgg11_bn", pre_trained=False, minmax="bottle").input_normalization == "lcn_minmax"
    untrained = FcddModel(backbone="efficientnet_lite0", pre_trained=False, minmax="bottle")
    assert isinstance(untrained.normalization, InputNormalization)  # no weights, so no weight statistics
    forced = FcddModel(backbone="efficientnet_lite0", pre_trained=True, input_normalization="lcn_minmax")
    assert isinstance(forced.normalization, InputNormalization)
    with pytest.raises(ConfigurationError, match="input_normalization"):
        FcddModel(backbone="efficientnet_lite0", input_normalization="zscore")


# ---------------------------------------------------------------------------------------------------------------------
# keep_aspect_ratio: the longer side from the training images' aspect ratio
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("side", "ratio", "expected"),
    [
        (224, 4 / 3, (224, 296)),  # 224 * 4/3 = 298.7 -> 37.3 cells of 8 -> 37 -> 296
        (224, 3 / 4, (296, 224)),  # portrait: the width is the shorter side
        (224, 1.0, (224, 224)),
        (64, 1.5, (64, 96)),
        (32, 1.01, (32, 32)),  # 32.3 rounds back to 32: never shorter than the side
    ],
)
def test_aspect_preserving_size_by_hand(side: int, ratio: float, expected: tuple[int, int]) -> None:
    assert aspect_preserving_size(side, ratio) == expected


def test_median_aspect_ratio_reads_upright_headers(tmp_path) -> None:
    """Three landscape 60 x 40 files, one of them stored as 40 x 60 with EXIF "rotate 90" (orientation 6)."""
    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.jpg"
        if index == 2:
            exif = Image.Exif()
            exif[274] = 6
            Image.new("RGB", (40, 60)).save(path, exif=exif)
        else:
            Image.new("RGB", (60, 40)).save(path)
        paths.append(path)
    Image.new("RGB", (90, 40)).save(tmp_path / "wide.png")
    assert median_aspect_ratio(paths) == (1.5, 1.5, 1.5)
    assert median_aspect_ratio([*paths, tmp_path / "wide.png"]) == (1.5, 1.5, 2.25)
    with pytest.raises(ConfigurationError, match="training set is empty"):
        median_aspect_ratio([])


def test_keep_aspect_ratio_takes_one_side() -> None:
    with pytest.raises(ConfigurationError, match=r"keep_aspect_ratio takes --model\.image_size as one side"):
        FcddPreProcessor(image_size=(64, 96), keep_aspect_ratio=True)
    assert FcddPreProcessor(image_size=64, keep_aspect_ratio=True).aspect_side == 64
    assert FcddPreProcessor(image_size=64).aspect_side is None


# ---------------------------------------------------------------------------------------------------------------------
# The resize: nearest (the paper's pipeline) or antialiased bilinear (pretrained weights)
def test_smooth_resize_by_hand() -> None:
    """4 -> 2 pixels: scale 2, so the triangle spans 2 input pixels each side of the output centre (1.0 and 3.0).

    Output 0 weighs inputs at 0.5, 1.5, 2.5 by 0.75, 0.75, 0.25 (sum 1.75); output 1 symmetrically."""
    row = torch.tensor([1.0, 2.0, 4.0, 8.0])
    images = row.view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()  # constant columns: rows shrink to the same values
    out = smooth_resize(images, (2, 2))
    first = (0.75 * 1 + 0.75 * 2 + 0.25 * 4) / 1.75
    second = (0.25 * 2 + 0.75 * 4 + 0.75 * 8) / 1.75
    torch.testing.assert_close(out, torch.tensor([[first, second], [first, second]]).view(1, 1, 2, 2))


@pytest.mark.parametrize(
    ("height", "width", "size"), [(900, 900, (224, 224)), (160, 160, (224, 224)), (333, 517, (240, 200))]
)
def test_smooth_resize_matches_torchs_antialiased_bilinear(height: int, width: int, size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(smooth_resize(images, size), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"backbone": "efficientnet_lite0_multiscale"}, "nearest"),
        ({"backbone": "vgg11_bn", "pre_trained": False}, "nearest"),
        ({"backbone": "efficientnet_lite0_multiscale", "resize": "bilinear"}, "bilinear"),
    ],
)
def test_model_resizes_the_same_way_everywhere(options: dict, expected: str) -> None:
    from torchvision.transforms.v2 import InterpolationMode

    from anomalib_fcdd import FcddHsc

    model = FcddHsc(minmax="bottle", **options)
    interpolation = InterpolationMode.NEAREST if expected == "nearest" else InterpolationMode.BILINEAR
    assert model.resize == expected and model.pre_processor.resize == expected
    assert model.pre_processor.transform.interpolation == interpolation
    assert model.pre_processor.train_transform.interpolation == interpolation
    assert model.augmentation.resize == expected


def test_an_unknown_resize_is_one_line() -> None:
    from anomalib_fcdd import FcddHsc

    with pytest.raises(ConfigurationError, match=r"Unknown resize 'bicubic' \(--model\.resize\)"):
        FcddHsc(resize="bicubic")


def test_a_restored_pre_processor_keeps_its_resize() -> None:
    trained = FcddPreProcessor(image_size=96, resize="bilinear")
    restored = FcddPreProcessor(image_size=96)
    restored.load_checkpoint_config(trained.checkpoint_config())
    assert restored.resize == "bilinear" and restored.train_transform.antialias
    images = torch.rand(1, 3, 130, 170, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(restored(images), smooth_resize(images, (96, 96)))


def test_a_model_takes_the_resize_of_its_restored_pre_processor() -> None:
    from anomalib_fcdd import FcddHsc

    model = FcddHsc(backbone="vgg11_bn", pre_trained=False, minmax="bottle")
    model.pre_processor.load_checkpoint_config(FcddPreProcessor(image_size=224, resize="bilinear").checkpoint_config())
    model._adopt_input_size()  # what on_load_checkpoint runs after anomalib restored the pre-processor
    assert model.resize == "bilinear" and model.augmentation.resize == "bilinear"
