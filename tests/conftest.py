"""Shared fixtures: a small generated MVTec-layout dataset and deterministic seeds."""

from __future__ import annotations

import os
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch

from anomalib_fcdd.data import make_synthetic_mvtec
from anomalib_fcdd.models.fcdd.backbones import weights as weights_module

warnings.filterwarnings("ignore", category=FutureWarning)
REPO_ROOT = Path(__file__).resolve().parents[1]


def mvtec_root() -> Path:
    """Where the real MVTec-AD categories live (``FCDD_MVTEC_ROOT``, default ``../shared/data/mvtec_ad``)."""
    return Path(os.environ.get("FCDD_MVTEC_ROOT", REPO_ROOT.parent / "shared" / "data" / "mvtec_ad"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/synthetic``: 16 train, 4 good + 4 defective test images of 128 x 128."""
    root = tmp_path_factory.mktemp("data")
    make_synthetic_mvtec(root, "synthetic", n_train=16, n_test_good=4, n_test_defect=4, size=128, seed=0)
    return root


@pytest.fixture
def offline_imagenet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network and an empty torch hub cache, so VGG-11-BN's ImageNet file cannot be had; returns ``TORCH_HOME``."""
    torch_home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(weights_module.torch.hub, "download_url_to_file", refuse)
    return torch_home
