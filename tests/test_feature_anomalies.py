"""Feature-space anomalies: the noise model, their loss term and how the network and the module use them."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_fcdd.models.fcdd import FcddLoss, FcddModel
from anomalib_fcdd.models.fcdd.feature_anomalies import FeatureNoise, SpreadAccumulator
from anomalib_fcdd.models.fcdd.loss import feature_anomaly_loss, pixel_balanced_loss
from anomalib_fcdd.models.fcdd.torch_model import pseudo_huber


def test_noise_is_scaled_by_each_channels_spread() -> None:
    # Channel 0 alternates -2 / +2 (sample std 2 * sqrt(n / (n - 1))), channel 1 is constant (std 0).
    count = 4 * 16 * 16
    alternating = torch.tensor([-2.0, 2.0]).repeat(count // 2).view(4, 1, 16, 16)
    features = torch.cat([alternating, torch.full((4, 1, 16, 16), 3.0)], dim=1)
    torch.manual_seed(0)
    noisy = FeatureNoise(0.5)(features)
    noise = noisy - features
    expected_std = 0.5 * 2.0 * math.sqrt(count / (count - 1))
    assert noise[:, 0].std().item() == pytest.approx(expected_std, rel=0.06)
    assert noise[:, 0].mean().item() == pytest.approx(0.0, abs=0.1)
    assert torch.equal(noisy[:, 1], features[:, 1]), "a channel without spread gets no noise"


def test_a_measured_spread_replaces_the_batchs_own() -> None:
    features = torch.zeros(2, 2, 40, 40)
    noise_model = FeatureNoise(2.0)
    noise_model.set_spread(torch.tensor([0.5, 3.0]))
    torch.manual_seed(0)
    noise = noise_model(features)  # the batch itself has no spread at all
    assert noise[:, 0].std().item() == pytest.approx(1.0, rel=0.06)
    assert noise[:, 1].std().item() == pytest.approx(6.0, rel=0.06)
    assert "spread" not in noise_model.state_dict(), "a training statistic, measured again for every training"
    with pytest.raises(ValueError, match="2 channels"):
        noise_model(torch.zeros(1, 3, 4, 4))


def test_spread_accumulator_by_hand() -> None:
    accumulator = SpreadAccumulator()
    accumulator.update(torch.tensor([1.0, 3.0]).view(1, 1, 1, 2))  # channel values 1, 3
    accumulator.update(torch.tensor([5.0, 7.0]).view(1, 1, 2, 1))  # then 5, 7: mean 4, E[x^2] = 21
    assert accumulator.spread().item() == pytest.approx(math.sqrt(21 - 16))
    with pytest.raises(ValueError, match="no normal image"):
        SpreadAccumulator().spread()


def test_noise_follows_the_global_seed_and_keeps_dtype() -> None:
    features = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    torch.manual_seed(7)
    first = FeatureNoise(1.0)(features)
    torch.manual_seed(7)
    second = FeatureNoise(1.0)(features)
    assert first.dtype == torch.bfloat16 and torch.equal(first, second)
    with pytest.raises(ValueError, match="above 0"):
        FeatureNoise(0.0)


def test_feature_anomaly_loss_is_the_mean_push_by_hand() -> None:
    values = torch.tensor([[[[0.5, 2.0], [1.0, 4.0]]]])
    by_hand = sum(-math.log(1 - math.exp(-v)) for v in (0.5, 2.0, 1.0, 4.0)) / 4
    assert feature_anomaly_loss(values, eps=0.0).item() == pytest.approx(by_hand, rel=1e-6)


def test_fcdd_loss_adds_the_feature_term_to_the_selected_loss() -> None:
    generator = torch.Generator().manual_seed(3)
    amap = torch.rand(2, 1, 8, 8, generator=generator) * 3
    mask = torch.rand(2, 1, 8, 8, generator=generator) > 0.8
    noisy = torch.rand(2, 1, 2, 2, generator=generator) * 3
    loss = FcddLoss("pixel_balanced")
    expected = pixel_balanced_loss(amap, mask) + feature_anomaly_loss(noisy)
    torch.testing.assert_close(loss(amap, mask, noisy), expected)
    torch.testing.assert_close(loss(amap, mask), pixel_balanced_loss(amap, mask))


def _models(head: str) -> tuple[FcddModel, FcddModel]:
    """The same weights with and without feature noise."""
    torch.manual_seed(0)
    options = dict(backbone="efficientnet_lite0", pre_trained=False, minmax="bottle", head=head)
    plain = FcddModel(**options)
    noisy = FcddModel(**options, feature_noise=0.5)
    noisy.load_state_dict(plain.state_dict())
    return plain, noisy


def test_training_output_scores_the_noisy_features_with_the_same_head() -> None:
    plain, noisy = _models("linear")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    plain.train(), noisy.train()
    torch.manual_seed(5)
    output = noisy(images)
    assert plain(images).feature_anomalies is None
    with torch.no_grad():
        features = plain.backbone_features(images)
        torch.manual_seed(5)
        by_hand = pseudo_huber(plain.head(FeatureNoise(0.5)(features)))
        torch.testing.assert_close(output.low_res, plain(images).low_res)
    assert output.feature_anomalies.shape == output.low_res.shape == (2, 1, 8, 8)
    torch.testing.assert_close(output.feature_anomalies, by_hand)
    assert output.anomaly_map.shape == (2, 1, 64, 64)


def test_inference_never_sees_the_noise() -> None:
    plain, noisy = _models("mlp")
    plain.eval(), noisy.eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, got = plain(images), noisy(images)
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(got.pred_score, expected.pred_score)


def test_feature_noise_defaults_per_backbone_and_overrides() -> None:
    from anomalib_fcdd import Fcdd, FcddHsc
    from anomalib_fcdd.errors import ConfigurationError
    from anomalib_fcdd.models.fcdd.backbones import training_defaults

    default = FcddHsc(pre_trained=False)
    assert default.model.feature_noise.sigma == training_defaults("efficientnet_lite0_multiscale").feature_noise > 0
    assert FcddHsc(pre_trained=False, feature_noise=0.3).model.feature_noise.sigma == 0.3
    assert FcddHsc(pre_trained=False, feature_noise=0).model.feature_noise is None
    assert FcddHsc(backbone="vgg11_bn", pre_trained=False, minmax="bottle").model.feature_noise is None, "the paper's"
    assert Fcdd(pre_trained=False).model.feature_noise is None, "original FCDD has no feature anomalies"
    with pytest.raises(ConfigurationError, match="feature_noise"):
        FcddHsc(pre_trained=False, feature_noise=-1.0)
