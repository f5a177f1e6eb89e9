"""Frozen BatchNorm written into the convolution's output: the same numbers as the layer, one activation less."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import assert_same_trainable_gradients
from torch import nn

from anomalib_fcdd.models.fcdd import lean_features
from anomalib_fcdd.models.fcdd.frozen_batchnorm import batchnorm_into_input, inplace_batchnorm_indices
from anomalib_fcdd.models.fcdd.lean_features import run_features
from anomalib_fcdd.models.fcdd.torch_model import FcddModel


def random_batchnorm(channels: int, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, momentum=momentum)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
        norm.bias.uniform_(-1, 1, generator=generator)
        norm.running_mean.uniform_(-1, 1, generator=generator)
        norm.running_var.uniform_(0.5, 2, generator=generator)
    for parameter in norm.parameters():
        parameter.requires_grad_(False)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_the_layer_bit_for_bit(
    dtype: torch.dtype, channels_last: bool, training: bool, momentum: float | None
) -> None:
    x = torch.randn(4, 8, 10, 12, generator=torch.Generator().manual_seed(0)) * 3 + 1
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference, inplace = random_batchnorm(8, momentum).train(training), random_batchnorm(8, momentum).train(training)
    for _ in range(2):  # twice: the second call sees updated running statistics (and, for momentum None, a count of 2)
        expected = reference(x.clone())
        buffer = x.clone()
        actual = batchnorm_into_input(inplace, buffer)
        assert actual.data_ptr() == buffer.data_ptr(), "written into its input"
        assert actual.dtype == dtype
        assert torch.equal(actual, expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(inplace, name), getattr(reference, name)), name
    assert int(inplace.num_batches_tracked) == (2 if training else 0)


def test_batch_statistics_are_the_hand_computed_ones() -> None:
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 4.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])  # B=2, C=2, 1 x 2
    norm = nn.BatchNorm2d(2, momentum=0.5).train().requires_grad_(False)
    batchnorm_into_input(norm, x)
    # channel 0: values 1 3 5 7 -> mean 4, biased var 5, unbiased 20/3; channel 1: 0 4 2 2 -> mean 2, var 2, 8/3
    torch.testing.assert_close(x[:, 0].flatten(), (torch.tensor([1.0, 3, 5, 7]) - 4) / (5 + 1e-5) ** 0.5)
    torch.testing.assert_close(norm.running_mean, torch.tensor([0.5 * 4, 0.5 * 2]))
    torch.testing.assert_close(norm.running_var, torch.tensor([0.5 + 0.5 * 20 / 3, 0.5 + 0.5 * 8 / 3]))


def test_only_frozen_batchnorms_right_after_a_conv_qualify() -> None:
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3),  # 0
        nn.BatchNorm2d(4),  # 1: frozen, after a conv
        nn.ReLU(),  # 2
        nn.BatchNorm2d(4),  # 3: frozen, but after a ReLU (its input may be needed elsewhere)
        nn.Conv2d(4, 4, 3),  # 4
        nn.BatchNorm2d(4, track_running_stats=False),  # 5: no running statistics
        nn.Conv2d(4, 4, 3),  # 6
        nn.BatchNorm2d(4),  # 7: not frozen
    )
    frozen = [features[index] for index in (1, 3, 5)]
    assert inplace_batchnorm_indices(features, frozen) == {1}
    assert inplace_batchnorm_indices(nn.ModuleList(features), frozen) == frozenset()


def test_a_batchnorm_unfrozen_later_runs_as_the_plain_layer() -> None:
    features = nn.Sequential(nn.Conv2d(3, 4, 3), random_batchnorm(4)).train()
    inplace = inplace_batchnorm_indices(features, [features[1]])
    features[1].requires_grad_(True)
    output = run_features(features, torch.rand(2, 3, 8, 8), inplace)
    output.sum().backward()
    assert features[1].weight.grad is not None


def test_input_that_needs_gradients_runs_the_plain_layers() -> None:
    features = nn.Sequential(nn.Conv2d(3, 4, 3), random_batchnorm(4)).train()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    frozen_conv_output = features[0](x).detach()
    output = run_features(features, x, inplace_batchnorm_indices(features, [features[1]]))
    assert output.requires_grad
    output.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(output.detach(), random_batchnorm(4).train()(frozen_conv_output))


@pytest.mark.parametrize("bf16", [False, True])
def test_vgg_training_forward_is_unchanged_and_saves_the_first_block_activation(
    bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = FcddModel(backbone="vgg11_bn", pre_trained=False, channels_last=True, minmax="bottle").train()
    assert model._inplace_batchnorms == {1, 5, 9, 12}, "the frozen VGG BatchNorms (the first 15 modules)"
    plain = copy.deepcopy(model)
    plain.inplace_frozen_batchnorm = False
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    written_into_input: list[bool] = []

    def spy(norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        pointer = x.data_ptr()
        out = batchnorm_into_input(norm, x)
        written_into_input.append(out.data_ptr() == pointer)
        return out

    monkeypatch.setattr(lean_features, "batchnorm_into_input", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        expected, actual = plain(images), model(images)
    assert written_into_input == [True] * 4, "each frozen BatchNorm wrote into the convolution's output"
    assert torch.equal(actual.low_res, expected.low_res)
    for mine, theirs in zip(model.features.modules(), plain.features.modules(), strict=True):
        if isinstance(mine, nn.BatchNorm2d):
            assert torch.equal(mine.running_mean, theirs.running_mean)
            assert torch.equal(mine.running_var, theirs.running_var)
    # the gradient still reaches every trainable weight, and only those
    assert_same_trainable_gradients(model, plain, actual.anomaly_map, expected.anomaly_map)


def test_a_hook_that_keeps_the_convolution_output_sees_it_unchanged() -> None:
    features = nn.Sequential(nn.Conv2d(3, 4, 3), random_batchnorm(4)).train().requires_grad_(False)
    kept: list[torch.Tensor] = []
    features[0].register_forward_hook(lambda module, inputs, output: kept.append(output))
    output = run_features(features, torch.rand(2, 3, 8, 8), inplace_batchnorm_indices(features, [features[1]]))
    assert kept[0].data_ptr() != output.data_ptr(), "a hooked layer's output is never overwritten"
    torch.testing.assert_close(output, random_batchnorm(4).train()(kept[0]))
