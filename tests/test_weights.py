"""Weight files load only as tensor-only state dicts; broken, tampered or missing files are explained."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from torchvision.models import vgg11_bn

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.models.fcdd.backbones.weights import WeightsError, load_state_dict_file


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "vgg11_bn_random.pth"
    torch.save(vgg11_bn(weights=None).state_dict(), path)
    return path


def test_weights_path_loads_a_full_vgg_state_dict(vgg_file: Path) -> None:
    expected = torch.load(vgg_file, weights_only=True)
    model = FcddHsc(backbone="vgg11_bn", weights_path=str(vgg_file))
    torch.testing.assert_close(model.model.features[0].weight, expected["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        model.model.features[19].running_var, expected["features.19.running_var"], rtol=0, atol=0
    )


def test_truncated_file_is_refused_with_its_path(vgg_file: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(vgg_file.read_bytes()[: vgg_file.stat().st_size // 3])
    with pytest.raises(WeightsError, match=rf"Cannot read weight file {truncated}: it is truncated"):
        load_state_dict_file(truncated)


def test_tampered_file_is_refused(vgg_file: Path, tmp_path: Path) -> None:
    data = bytearray(vgg_file.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    tampered = tmp_path / f"vgg11_bn-{digest[:8]}.pth"  # hub-style name: the hash prefix is checked
    tampered.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"corrupted or tampered"):
        load_state_dict_file(tampered)
    original = tmp_path / f"vgg11_bn-{digest[:8]}-copy.pth"
    original.write_bytes(vgg_file.read_bytes())
    assert load_state_dict_file(original, expected_sha256=digest)


class Payload:
    def __reduce__(self) -> tuple:
        return (print, ("code ran",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    malicious = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "extra": Payload()}, malicious, pickle_module=pickle)
    with pytest.raises(WeightsError, match="holds more than tensors"):
        load_state_dict_file(malicious)


def test_wrong_architecture_names_missing_tensors(tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(WeightsError, match="does not fit the backbone"):
        FcddHsc(backbone="vgg11_bn", weights_path=str(other))


def test_offline_without_cache_names_file_and_remedies(offline_imagenet: Path) -> None:
    model = FcddHsc(backbone="vgg11_bn", pre_trained=True)  # built (a checkpoint could still supply the weights) ...
    with pytest.raises(WeightsError) as error:  # ... but never run on random weights
        model.eval()(torch.rand(1, 3, 64, 64))
    message = str(error.value)
    assert "vgg11_bn-6002323d.pth" in message
    assert str(offline_imagenet / "hub" / "checkpoints") in message
    assert "weights_path" in message and "pre_trained=False" in message
    assert not (offline_imagenet / "hub" / "checkpoints" / "vgg11_bn-6002323d.pth").exists()


def test_missing_file() -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict_file("/nonexistent/weights.pth")
