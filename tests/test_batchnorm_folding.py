"""BatchNorm folding at inference: the same function, a fresh copy whenever the weights change, never a stale one."""

from __future__ import annotations

import pickle

import torch
from torch import nn

from anomalib_fcdd.models.fcdd.batchnorm_folding import fold_conv_batchnorm
from anomalib_fcdd.models.fcdd.torch_model import FcddModel


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters (fresh BNs are the identity and would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(torch.rand(channels, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(channels, generator=generator) * 0.4 - 0.2)


def model() -> FcddModel:
    torch.manual_seed(0)
    network = FcddModel(pre_trained=False, minmax="bottle")
    randomise_batchnorms(network)
    return network.eval()


def test_one_pair_matches_the_hand_formula() -> None:
    """w' = w g / sqrt(v + eps), b' = (b - m) g / sqrt(v + eps) + beta, checked against numbers written out."""
    conv = nn.Conv2d(1, 1, kernel_size=1, bias=True)
    norm = nn.BatchNorm2d(1, eps=0.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
        norm.running_mean.fill_(3.0)
        norm.running_var.fill_(4.0)
        norm.weight.fill_(0.5)
        norm.bias.fill_(0.25)
    folded = fold_conv_batchnorm(nn.Sequential(conv, norm.eval()))
    assert folded is not None and len(folded) == 1
    # x = 5: conv 2*5 + 1 = 11, BN (11 - 3) / 2 * 0.5 + 0.25 = 2.25; folded w' = 0.5, b' = (1 - 3) * 0.25 + 0.25 = -0.25
    torch.testing.assert_close(folded[0].weight.flatten(), torch.tensor([0.5]))
    torch.testing.assert_close(folded[0].bias, torch.tensor([-0.25]))
    torch.testing.assert_close(folded(torch.full((1, 1, 1, 1), 5.0)).flatten(), torch.tensor([2.25]))


def test_folded_vgg_gives_the_same_maps_and_has_no_batchnorm() -> None:
    network = model()
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        network.fold_batchnorm = False
        reference = network(images).anomaly_map
        network.fold_batchnorm = True
        folded = network(images).anomaly_map
        used = network.inference_features()
    assert used is not network.features
    assert not any(isinstance(m, nn.BatchNorm2d) for m in used.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in network.features.modules()) == 6
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-6)


def test_copy_follows_weight_changes() -> None:
    network = model()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = network(images).anomaly_map
        network.features[4].weight.mul_(1.5)  # in place, as an optimizer step would
        network.features[5].running_var.mul_(2.0)
        after = network(images).anomaly_map
        network.fold_batchnorm = False
        unfolded_after = network(images).anomaly_map
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, unfolded_after, rtol=1e-4, atol=1e-6)

    other = model()
    randomise_batchnorms(other, seed=1)
    with torch.no_grad():
        network.fold_batchnorm = True
        network(images)  # builds a copy of the current weights
        network.load_state_dict(other.state_dict())
        loaded = network(images).anomaly_map
        expected = other(images).anomaly_map
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-6)


def test_not_used_when_gradients_or_training_need_the_real_layers() -> None:
    network = model()
    assert network.inference_features() is network.features  # autograd on
    with torch.no_grad():
        network.train()
        assert network.inference_features() is network.features
        network.eval()
        assert network.inference_features() is not network.features
    images = torch.rand(1, 3, 64, 64)
    network(images).anomaly_map.sum().backward()
    assert network.features[-3].weight.grad is not None  # gradients reach the real (trainable) conv


def test_timm_batchnorm_with_activation_is_left_alone() -> None:
    torch.manual_seed(0)
    lite = FcddModel(backbone="efficientnet_lite0", pre_trained=False, minmax="bottle").eval()
    with torch.no_grad():
        assert lite.inference_features() is lite.features  # nothing to fold at the top level


def test_pickle_leaves_the_copy_out() -> None:
    network = model()
    size_before = len(pickle.dumps(network))
    with torch.no_grad():
        network(torch.rand(1, 3, 64, 64))
    assert len(pickle.dumps(network)) < size_before * 1.05
    restored = pickle.loads(pickle.dumps(network))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored(images).anomaly_map, network(images).anomaly_map)
