"""2 x 2 max-pooling without argmax indices: max_pool2d's values, no index tensor, the caller's input untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import assert_same_trainable_gradients
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils._python_dispatch import TorchDispatchMode

from anomalib_fcdd.models.fcdd.lean_features import run_features
from anomalib_fcdd.models.fcdd.max_pooling import is_plain_2x2_max_pool, max_pool_2x2
from anomalib_fcdd.models.fcdd.torch_model import FcddModel


class OpRecorder(TorchDispatchMode):
    """Names of the ATen ops that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_hand_computed_maxima() -> None:
    x = torch.tensor([[[[1.0, 5.0, 2.0, 0.0, 9.0], [3.0, 4.0, -1.0, 7.0, 9.0], [8.0, 8.0, 6.0, 6.0, 9.0]]]])
    # 3 x 5 -> 1 x 2 (floor mode drops the last row and column): max(1, 5, 3, 4) = 5, max(2, 0, -1, 7) = 7
    assert max_pool_2x2(x).tolist() == [[[[5.0, 7.0]]]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("overwrite_input", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_equals_max_pool2d(
    dtype: torch.dtype, channels_last: bool, overwrite_input: bool, size: tuple[int, int]
) -> None:
    x = torch.randn(3, 5, *size, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0, 0, 0], x[1, 2, 3, 1], x[2, 4, :2, :2] = float("nan"), float("-inf"), float("inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.max_pool2d(x, 2)
    actual = max_pool_2x2(x.clone(), overwrite_input=overwrite_input)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert actual.dtype == dtype
    assert actual.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_overwrite_only_touches_the_even_rows_and_leaves_the_input_alone_otherwise() -> None:
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    kept = x.clone()
    max_pool_2x2(x)
    assert torch.equal(x, kept)
    max_pool_2x2(x, overwrite_input=True)
    assert torch.equal(x[..., 1::2, :], kept[..., 1::2, :])
    assert torch.equal(x[..., 0::2, :], torch.maximum(kept[..., 0::2, :], kept[..., 1::2, :]))


def test_which_layers_qualify() -> None:
    assert is_plain_2x2_max_pool(nn.MaxPool2d(2))
    assert is_plain_2x2_max_pool(nn.MaxPool2d((2, 2), stride=(2, 2)))
    for layer in (
        nn.MaxPool2d(3, 2),
        nn.MaxPool2d(2, 1),
        nn.MaxPool2d(2, padding=1),
        nn.MaxPool2d(2, dilation=2),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.MaxPool2d(2, return_indices=True),
        nn.AvgPool2d(2),
        type("MyPool", (nn.MaxPool2d,), {})(2),
    ):
        assert not is_plain_2x2_max_pool(layer), layer


def test_a_pool_on_the_callers_input_leaves_it_unchanged() -> None:
    features = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 4, 1)).requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kept = x.clone()
    output = run_features(features, x, indexless_pooling=True)
    assert torch.equal(x, kept)
    torch.testing.assert_close(output, features(kept), rtol=0, atol=0)


def test_a_pool_with_a_hook_or_an_input_that_needs_gradients_runs_as_it_is() -> None:
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2))
    calls: list[int] = []
    features[1].register_forward_hook(lambda *args: calls.append(1))
    with OpRecorder() as recorder:
        run_features(features.requires_grad_(False), torch.rand(2, 3, 10, 10), indexless_pooling=True)
    assert calls == [1]
    assert "max_pool2d_with_indices.default" in recorder.ops
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2))  # trainable conv: the pool's input needs a gradient
    output = run_features(plain, torch.rand(2, 3, 10, 10), indexless_pooling=True)
    output.sum().backward()
    assert plain[0].weight.grad is not None


@pytest.mark.parametrize("training", [True, False])
def test_vgg_runs_no_index_tensor_and_computes_the_same(training: bool) -> None:
    torch.manual_seed(0)
    model = FcddModel(backbone="vgg11_bn", pre_trained=False, channels_last=True, minmax="bottle").train(training)
    plain = copy.deepcopy(model)
    plain.indexless_max_pool = False
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
        expected = plain(images)
        with OpRecorder() as recorder:
            actual = model(images)
    # VGG-11-BN's three pools all lie in the frozen layers: no gradient flows through any of them
    assert not [op for op in recorder.ops if op.startswith("max_pool2d")]
    assert torch.equal(actual.anomaly_map, expected.anomaly_map)
    if training:
        assert_same_trainable_gradients(model, plain, actual.anomaly_map, expected.anomaly_map)
