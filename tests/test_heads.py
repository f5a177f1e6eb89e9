"""Several heads side by side (``heads``): each is a separate head, trained on its own loss, and the map is the mean."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.errors import ConfigurationError
from anomalib_fcdd.models.fcdd.loss import FcddLoss
from anomalib_fcdd.models.fcdd.torch_model import MLP_HIDDEN, FcddModel, build_head


def _randomise_batchnorm(head: torch.nn.Module, seed: int) -> None:
    """Give the hidden BatchNorm non-trivial running statistics and affine weights."""
    generator = torch.Generator().manual_seed(seed)
    norm = head[1]
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator))
        norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
        norm.weight.copy_(torch.randn(norm.num_features, generator=generator))
        norm.bias.copy_(torch.randn(norm.num_features, generator=generator))


def test_k_mlp_heads_compute_what_k_separate_heads_would() -> None:
    """Head k of the grouped module, by hand: its 128 rows of the first layer, its BatchNorm channels, ReLU, and its
    own 128 weights of the second layer."""
    torch.manual_seed(0)
    channels, heads = 6, 3
    head = build_head("mlp", channels, heads).eval()
    _randomise_batchnorm(head, 1)
    features = torch.randn(2, channels, 4, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = head(features)
    assert got.shape == (2, heads, 4, 5)
    first, norm, _, second = head
    vectors = features.permute(0, 2, 3, 1).reshape(-1, channels).double()  # one row per feature vector
    for k in range(heads):
        rows = slice(k * MLP_HIDDEN, (k + 1) * MLP_HIDDEN)
        hidden = vectors @ first.weight[rows, :, 0, 0].double().T + first.bias[rows].double()
        scale = norm.weight[rows].double() / torch.sqrt(norm.running_var[rows].double() + norm.eps)
        hidden = (hidden - norm.running_mean[rows].double()) * scale + norm.bias[rows].double()
        phi = hidden.clamp_min(0) @ second.weight[k, :, 0, 0].double() + second.bias[k].double()
        torch.testing.assert_close(got[:, k].reshape(-1).double(), phi, rtol=1e-5, atol=1e-5)


def test_a_single_head_keeps_the_state_dict_of_earlier_versions() -> None:
    """``heads=1`` must load checkpoints written before there were several heads."""
    shapes = {key: tuple(value.shape) for key, value in build_head("mlp", 40).state_dict().items()}
    assert shapes == {
        "0.weight": (128, 40, 1, 1),
        "0.bias": (128,),
        "1.weight": (128,),
        "1.bias": (128,),
        "1.running_mean": (128,),
        "1.running_var": (128,),
        "1.num_batches_tracked": (),
        "3.weight": (1, 128, 1, 1),
        "3.bias": (1,),
    }
    assert tuple(build_head("linear", 40).weight.shape) == (1, 40, 1, 1)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_each_head_starts_from_its_own_random_weights_with_a_lone_heads_scale(name: str) -> None:
    torch.manual_seed(3)
    head = build_head(name, 232, 4)
    last = head if name == "linear" else head[3]
    weights = last.weight.flatten(1)  # one row per head
    assert not torch.allclose(weights[0], weights[1])
    fan_in = 232 if name == "linear" else MLP_HIDDEN  # PyTorch's default init: uniform(+-1/sqrt(fan_in))
    assert weights.abs().max() <= 1 / math.sqrt(fan_in)
    assert weights.abs().max() > 0.9 / math.sqrt(fan_in)


def test_a_heads_loss_reaches_only_its_own_weights() -> None:
    """The grouped layout must not couple the heads: a score of head 0 has no gradient on head 1's weights."""
    torch.manual_seed(4)
    head = build_head("mlp", 8, 2).train()
    head(torch.randn(3, 8, 5, 5))[:, 0].square().sum().backward()
    first, norm, _, second = head
    theirs = slice(MLP_HIDDEN, 2 * MLP_HIDDEN)
    others = (first.weight.grad[theirs], first.bias.grad[theirs], norm.weight.grad[theirs], second.weight.grad[1])
    for gradient in others:
        assert torch.count_nonzero(gradient) == 0
    assert torch.count_nonzero(first.weight.grad[:MLP_HIDDEN]) > 0


def test_the_loss_of_several_maps_is_the_mean_of_their_eq5_losses_by_hand() -> None:
    """Two heads' maps of one 2 x 2 image, mask with one anomalous pixel: eq. (5) per map, then the mean."""
    maps = torch.tensor([[[[0.1, 0.2], [0.3, 2.0]], [[0.4, 0.0], [0.5, 1.0]]]])  # 1 x 2 heads x 2 x 2
    mask = torch.tensor([[[[False, False], [False, True]]]])
    push = lambda x: -math.log(1 - math.exp(-x))  # noqa: E731
    balance = 3 / 1  # |J0| / |J1|
    first = (0.1 + 0.2 + 0.3 + balance * push(2.0)) / 4
    second = (0.4 + 0.0 + 0.5 + balance * push(1.0)) / 4
    got = FcddLoss("pixel_balanced")(maps, mask)
    assert got.item() == pytest.approx((first + second) / 2, rel=1e-5)


@pytest.mark.parametrize("name", ["fcdd", "per_image", "pixel_balanced"])
def test_every_loss_of_k_maps_averages_the_k_single_map_losses(name: str) -> None:
    generator = torch.Generator().manual_seed(5)
    maps = torch.rand(3, 4, 16, 16, generator=generator) * 2
    masks = torch.rand(3, 1, 16, 16, generator=generator) > 0.8
    masks[1] = False  # an image without anomalous pixels
    loss = FcddLoss(name)
    singles = [loss(maps[:, k : k + 1], masks) for k in range(4)]
    torch.testing.assert_close(loss(maps, masks), torch.stack(singles).mean())
    noisy = torch.rand(3, 4, 2, 2, generator=generator)
    with_noise = [loss(maps[:, k : k + 1], masks, noisy[:, k : k + 1]) for k in range(4)]
    torch.testing.assert_close(loss(maps, masks, noisy), torch.stack(with_noise).mean())


def test_the_map_is_the_mean_of_the_heads_pseudo_huber_maps() -> None:
    torch.manual_seed(6)
    model = FcddModel(backbone="efficientnet_lite0", pre_trained=False, minmax="bottle", head="mlp", heads=3)
    _randomise_batchnorm(model.head, 7)
    model.eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        output = model(images)
        phi = model.head(model.backbone_features(images).float()).double()
    assert phi.shape == (2, 3, 8, 8)
    by_hand = (torch.sqrt(phi**2 + 1) - 1).mean(dim=1, keepdim=True)
    torch.testing.assert_close(model.low_resolution_map(images).double(), by_hand, rtol=1e-4, atol=1e-6)
    upsampled = model.upsampler(by_hand.float(), (64, 64))
    torch.testing.assert_close(output.anomaly_map, upsampled, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(output.pred_score, by_hand.flatten(1).mean(1).float(), rtol=1e-4, atol=1e-6)


def test_training_keeps_one_map_per_head() -> None:
    torch.manual_seed(9)
    model = FcddModel(backbone="efficientnet_lite0", pre_trained=False, minmax="bottle", heads=2, feature_noise=1.0)
    model.feature_noise.set_spread(torch.ones(1, 40, 1, 1))
    model.train()
    output = model(torch.rand(3, 3, 64, 64))
    assert output.low_res.shape == output.feature_anomalies.shape == (3, 2, 8, 8)
    assert output.anomaly_map.shape == (3, 2, 64, 64)
    for k in range(2):  # each head's full map is the upsampling of its own low-resolution map
        own = model.upsampler(output.low_res[:, k : k + 1], (64, 64))
        torch.testing.assert_close(output.anomaly_map[:, k : k + 1], own)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4"])
def test_heads_must_be_a_whole_number_of_at_least_one(value: object) -> None:
    with pytest.raises(ConfigurationError, match="heads"):
        FcddHsc(pre_trained=False, heads=value)


def test_default_model_averages_four_heads_and_the_option_overrides() -> None:
    from anomalib_fcdd.models.fcdd.backbones import training_defaults

    assert training_defaults("efficientnet_lite0_multiscale").heads == 4
    assert training_defaults("vgg11_bn").heads == 1, "the paper's single head"
    assert FcddHsc(pre_trained=False).model.head[3].out_channels == 4
    assert FcddHsc(pre_trained=False, heads=1).model.head[3].out_channels == 1
    assert FcddHsc(backbone="vgg11_bn", pre_trained=False, minmax="bottle").model.head.out_channels == 1


def test_a_normalized_map_is_the_weighted_mean_at_inference_and_the_reference_sum_in_training() -> None:
    torch.manual_seed(10)
    kwargs = {"backbone": "efficientnet_lite0", "pre_trained": False, "minmax": "bottle", "heads": 2}
    model = FcddModel(**kwargs, normalized_map=True)
    reference = FcddModel(**kwargs)
    assert model.state_dict().keys() == reference.state_dict().keys()  # parameter-free: checkpoints unchanged
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    model.eval()
    with torch.no_grad():
        low_res = model.low_resolution_map(images)
        sums, mass = model.upsampler(low_res, (64, 64)), model.upsampler(torch.ones_like(low_res[:1]), (64, 64))
        torch.testing.assert_close(model(images).anomaly_map, sums / mass)
    assert mass.max() / mass.min() > 2  # the reference's sum fades towards the border: the two differ
    model.train()
    output = model(images)
    for k in range(2):  # the loss still sees the reference's sums
        torch.testing.assert_close(
            output.anomaly_map[:, k : k + 1], model.upsampler(output.low_res[:, k : k + 1], (64, 64))
        )


def test_the_multiscale_default_normalizes_its_map_and_the_papers_backbones_do_not() -> None:
    assert FcddHsc(pre_trained=False).model.map_upsampler.normalized
    paper = FcddHsc(backbone="vgg11_bn", pre_trained=False, minmax="bottle").model
    assert paper.map_upsampler is paper.upsampler and not paper.upsampler.normalized
    assert not FcddHsc(pre_trained=False, normalized_map=False).model.map_upsampler.normalized


def test_the_multiscale_default_upsamples_its_map_with_sigma_8_and_trains_with_the_references_12() -> None:
    from anomalib_fcdd.models.fcdd.anomaly_map import gaussian_window

    model = FcddHsc(pre_trained=False).model
    assert model.upsampler.std == 12.0 and model.map_upsampler.std == 8.0
    # The map's kernel is exp(-k^2 / (2 * 8^2)) over 2 * ceil(4 * 8) + 1 = 65 taps (by hand: its ends at k = +-32).
    assert model.map_upsampler.kernel_size == 65
    window = gaussian_window(65, 8.0)
    assert window[0].item() == pytest.approx(math.exp(-0.5 * (32 / 8) ** 2))
    assert window[32].item() == 1.0
    paper = FcddHsc(backbone="vgg11_bn", pre_trained=False, minmax="bottle").model
    assert paper.map_upsampler is paper.upsampler and paper.upsampler.std == 12.0
    chosen = FcddHsc(pre_trained=False, map_gauss_std=12.0).model
    assert chosen.map_upsampler.std == 12.0 and chosen.map_upsampler.normalized
    assert set(chosen.state_dict()) == set(model.state_dict())  # parameter-free: checkpoints keep their keys


def test_the_map_width_changes_the_output_map_only() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    sharp = FcddHsc(pre_trained=False, minmax="bottle", map_gauss_std=4.0, fused_map=False, image_score="max").model
    wide = FcddHsc(pre_trained=False, minmax="bottle", map_gauss_std=16.0, fused_map=False, image_score="max").model
    wide.load_state_dict(sharp.state_dict())
    sharp.eval(), wide.eval()
    with torch.no_grad():
        low_res = sharp.map_of_features(sharp.backbone_features(images))
        a, b = sharp(images).anomaly_map, wide(images).anomaly_map
    # Each map is the weighted mean of the same low-resolution scores: sum_j w_ij s_j / sum_j w_ij, within their range.
    for upsampled in (a, b):
        assert low_res.min() - 1e-5 <= upsampled.min() and upsampled.max() <= low_res.max() + 1e-5
    # The sharper Gaussian keeps more of the low-resolution map's spread.
    assert a.std() > b.std()
    sharp.train(), wide.train()
    with torch.no_grad():
        torch.manual_seed(1)
        trained_a = sharp(images).anomaly_map
        torch.manual_seed(1)
        trained_b = wide(images).anomaly_map
    torch.testing.assert_close(trained_a, trained_b)  # the loss's maps keep gauss_std
