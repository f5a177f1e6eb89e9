"""Checks of ``--ckpt_path`` before a run, so that a wrong checkpoint is one line instead of a traceback.

Lightning reports a missing file with a traceback, a truncated one with ``OSError: [Errno 22] Invalid argument``,
and a checkpoint of another backbone with 148 lines of mismatched state-dict keys. The checkpoint is read here with
``weights_only=True`` (no code runs): options the user left at their defaults are taken from its saved
``hyper_parameters`` (:func:`options_from_checkpoint`), so ``test``/``export`` need no training option typed again,
and a backbone the user did set is compared with the checkpoint's (:func:`check_checkpoint`).
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any

from .errors import UserInputError


class CheckpointError(UserInputError):
    """``--ckpt_path`` names no file, an unreadable file, or a checkpoint of another network."""


def read_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's contents, or ``None`` when it holds objects that ``weights_only`` refuses (others' models).

    Raises:
        CheckpointError: the file is missing, not a file, truncated or corrupted.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"Checkpoint {path} {what} (--ckpt_path). Training writes it to "
            "<default_root_dir>/<Model>/<Data>/<category>/latest/weights/lightning/model.ckpt."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only" in str(error):
            return None  # readable, but holds classes only the model's own loader allows; Lightning loads it
        raise _unreadable(path, error) from error
    except Exception as error:  # truncated zip, bad magic number, EOF: torch raises several unrelated types
        raise _unreadable(path, error) from error
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        raise CheckpointError(
            f"{path} (--ckpt_path) is not a Lightning checkpoint (no 'state_dict' entry); pass the model.ckpt "
            "that training wrote under weights/lightning/."
        )
    return loaded


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return CheckpointError(
        f"Cannot read checkpoint {path} (--ckpt_path): it is truncated or corrupted ({type(error).__name__}: "
        f"{first_line}). Copy it again, or train anew."
    )


def saved_options(path: str | Path) -> dict[str, Any]:
    """The checkpoint's saved ``hyper_parameters`` (empty where ``weights_only`` refuses the file).

    ``anomalib-fcdd`` asks twice per run (options before the model is built, the backbone check before the run), so
    the options are kept per file version (path, modification time, size) and the file is read once; the state dict
    is not kept.

    Raises:
        CheckpointError: the file is missing, not a file, truncated or corrupted.
    """
    resolved = Path(path).expanduser()
    stat = resolved.stat() if resolved.is_file() else None
    return _saved_options(str(resolved), stat.st_mtime_ns if stat else None, stat.st_size if stat else None)


@functools.lru_cache(maxsize=4)
def _saved_options(path: str, mtime_ns: int | None, size: int | None) -> dict[str, Any]:
    del mtime_ns, size  # part of the cache key only
    loaded = read_checkpoint(path)
    saved = loaded.get("hyper_parameters") if loaded is not None else None
    return dict(saved) if isinstance(saved, dict) else {}


def check_checkpoint(path: str | Path, backbone: str | None) -> None:
    """Refuse an unreadable checkpoint, and one trained with another backbone than ``backbone`` (when given).

    Raises:
        CheckpointError: naming the file and, for a backbone mismatch, the option to pass.
    """
    trained = saved_options(path).get("backbone")
    if backbone is not None and isinstance(trained, str) and trained != backbone:
        raise CheckpointError(
            f"--ckpt_path {Path(path).expanduser()}: this checkpoint was trained with {trained}, not {backbone}; "
            f"pass --model.backbone {trained}."
        )


def options_from_checkpoint(path: str | Path, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's saved value of every option in ``options`` that is still at its value in ``defaults`` and was
    trained with another value (so a network is rebuilt as it was trained, e.g. its backbone, head and input size).

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    return {
        name: value
        for name, value in saved_options(path).items()
        if name in options and name in defaults and options[name] == defaults[name] and value != options[name]
    }
