"""FCDD's heads: the plain forward, and the mlp head's BatchNorm statistics taken from the real features only."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from anomalib_fcdd.errors import ConfigurationError
from anomalib_fcdd.models.fcdd.head import LinearHead, MlpHead, build_head
from anomalib_fcdd.models.fcdd.torch_model import FcddModel


def _mlp(seed: int = 0, channels: int = 6, hidden: int = 4) -> MlpHead:
    torch.manual_seed(seed)
    head = MlpHead(channels, hidden)
    with torch.no_grad():  # non-trivial affine parameters, so a wrong scale or shift shows
        head[1].weight.uniform_(0.5, 2.0)
        head[1].bias.uniform_(-1.0, 1.0)
    return head


def _by_hand(head: MlpHead, features: torch.Tensor, reference: int) -> torch.Tensor:
    """conv -> (x - mean) / sqrt(var + eps) * gamma + beta with mean/var over the first ``reference`` samples -> relu
    -> conv, written out with functional calls."""
    project, norm, _, score = head
    hidden = functional.conv2d(features, project.weight, project.bias)
    real = hidden[:reference].transpose(0, 1).reshape(hidden.shape[1], -1)
    mean = real.mean(dim=1).view(1, -1, 1, 1)
    variance = ((real - real.mean(dim=1, keepdim=True)) ** 2).mean(dim=1).view(1, -1, 1, 1)
    normalised = (hidden - mean) / torch.sqrt(variance + norm.eps)
    affine = normalised * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    return functional.conv2d(affine.clamp_min(0), score.weight, score.bias)


def test_copies_are_normalised_with_the_real_features_statistics() -> None:
    head = _mlp().train()
    features = torch.randn(5, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    features[3:] = features[3:] * 4 + 2  # the "copies": another mean and spread
    with torch.no_grad():
        expected = _by_hand(head, features, reference=3)
        whole_batch = _by_hand(head, features, reference=5)
    got = head(features, reference=3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, whole_batch, atol=1e-3), "the copies changed the batch statistics"


def test_running_statistics_come_from_the_real_features_only() -> None:
    head = _mlp().train()
    features = torch.randn(4, 6, 2, 2, generator=torch.Generator().manual_seed(2))
    features[2:] += 10.0
    head(features, reference=2)
    with torch.no_grad():
        hidden = functional.conv2d(features[:2], head[0].weight, head[0].bias).transpose(0, 1).reshape(4, -1)
    momentum, count = head[1].momentum, hidden.shape[1]
    mean = hidden.mean(dim=1)
    unbiased = ((hidden - mean[:, None]) ** 2).sum(dim=1) / (count - 1)
    torch.testing.assert_close(head[1].running_mean, momentum * mean)
    torch.testing.assert_close(head[1].running_var, (1 - momentum) + momentum * unbiased)
    assert int(head[1].num_batches_tracked) == 1


@pytest.mark.parametrize("reference", [None, 4])
def test_without_copies_or_at_inference_it_is_the_plain_sequence(reference: int | None) -> None:
    features = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(3))
    head = _mlp()
    plain = torch.nn.Sequential(*head)
    torch.testing.assert_close(head.train()(features, reference), plain.train()(features))
    torch.testing.assert_close(head.eval()(features, 2), plain.eval()(features))


def test_gradients_reach_every_parameter_through_the_reference_statistics() -> None:
    head = _mlp().train()
    features = torch.randn(4, 6, 2, 2, generator=torch.Generator().manual_seed(4), requires_grad=True)
    head(features, reference=2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert features.grad[:2].abs().sum() > 0 and features.grad[2:].abs().sum() > 0


def test_linear_head_is_the_papers_1x1_convolution() -> None:
    head = build_head("linear", 6)
    assert isinstance(head, LinearHead) and isinstance(head, torch.nn.Conv2d)
    features = torch.randn(3, 6, 2, 2, generator=torch.Generator().manual_seed(5))
    expected = torch.einsum("bchw,c->bhw", features, head.weight.view(-1)) + head.bias
    torch.testing.assert_close(head(features, reference=1), expected.unsqueeze(1))
    with pytest.raises(ConfigurationError, match="Unknown head"):
        build_head("transformer", 6)


def test_state_dict_names_are_those_of_the_plain_layers() -> None:
    """Checkpoints written before the heads had their own classes load unchanged."""
    assert set(build_head("mlp", 6).state_dict()) == set(torch.nn.Sequential(*_mlp()).state_dict())
    assert set(build_head("linear", 6).state_dict()) == {"weight", "bias"}


def test_training_with_feature_noise_keeps_running_statistics_of_the_real_features() -> None:
    """A training step of the whole network: the head's running mean follows the real features' hidden layer only."""
    torch.manual_seed(0)
    model = FcddModel("vgg11_bn", pre_trained=False, minmax="bottle", head="mlp", feature_noise=3.0).train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        features = model.backbone_features(images)  # train-mode BatchNorms: batch statistics, the same features again
    before = model.head[1].running_mean.clone()
    model(images)
    project = model.head[0]
    hidden = functional.conv2d(features.float(), project.weight, project.bias)
    expected = (1 - model.head[1].momentum) * before + model.head[1].momentum * hidden.mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.head[1].running_mean, expected, rtol=1e-4, atol=1e-5)
