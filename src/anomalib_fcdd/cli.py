"""The ``anomalib-fcdd`` command: anomalib's CLI with short names for this plugin's classes.

``anomalib-fcdd train --model fcdd_hsc --data MVTec --data.root DIR --data.category bottle`` is rewritten to
``anomalib train --model anomalib_fcdd.FcddHsc --data anomalib_fcdd.data.MVTec ...`` and handed to anomalib's own CLI,
so every anomalib subcommand (fit, validate, test, train, predict, export, benchmark) and flag works unchanged.
anomalib 2.7's CLI accepts neither snake-case model names nor ``MVTec``.

Around anomalib's CLI it adds: checks that run before the Engine opens a results folder (dataset, model options,
``--ckpt_path``, ``export`` without a checkpoint), run folders that are never left broken (:mod:`.runs`), a last line
naming the checkpoint, metrics and heatmaps, one log handler and no third-party chatter (:mod:`.logging_setup`), and
a top-level ``--help`` that imports no torch (:mod:`.cli_help`). User mistakes end in one ``anomalib-fcdd: error:``
line and exit code 2.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import UserInputError

MODEL_ALIASES = {
    "fcdd_hsc": "anomalib_fcdd.FcddHsc",
    "fcddhsc": "anomalib_fcdd.FcddHsc",
    "fcdd": "anomalib_fcdd.Fcdd",
}
DATA_ALIASES = {
    "mvtec": "anomalib_fcdd.data.MVTec",
    "folder": "anomalib_fcdd.data.Folder",
    "folderfewanomalies": "anomalib_fcdd.data.FolderFewAnomalies",
    "folder_few_anomalies": "anomalib_fcdd.data.FolderFewAnomalies",
    "mvtecfewanomalies": "anomalib_fcdd.data.MVTecFewAnomalies",
    "mvtec_few_anomalies": "anomalib_fcdd.data.MVTecFewAnomalies",
}
_ALIASES = {
    "--model": MODEL_ALIASES,
    "--data": DATA_ALIASES,
    "--model.help": MODEL_ALIASES,
    "--data.help": DATA_ALIASES,
}
#: How the help and the errors spell each class's short name.
_SHOWN_NAMES = {
    "anomalib_fcdd.Fcdd": "fcdd",
    "anomalib_fcdd.FcddHsc": "fcdd_hsc",
    "anomalib_fcdd.data.MVTec": "MVTec",
    "anomalib_fcdd.data.Folder": "Folder",
    "anomalib_fcdd.data.FolderFewAnomalies": "FolderFewAnomalies",
    "anomalib_fcdd.data.MVTecFewAnomalies": "MVTecFewAnomalies",
}
#: Subcommands that read the datamodule, whose folder check runs before the Engine opens a results folder.
_DATA_SUBCOMMANDS = {"fit", "validate", "test", "train", "predict"}
#: Subcommands for which the Engine creates the next ``vN`` and moves ``latest`` to it.
_VERSIONED_SUBCOMMANDS = {"fit", "train"}
#: Subcommands that end with a line naming the checkpoint, the metrics and the heatmaps.
_SUMMARY_SUBCOMMANDS = {"fit", "train", "test"}
#: Arguments that ask for the top-level help only (answered without importing torch or anomalib).
_TOP_LEVEL_HELP = ([], ["-h"], ["--help"])


class UsageError(UserInputError):
    """A command-line value that cannot be right (a misspelt short name)."""


def _check_short_name(flag: str, value: str) -> None:
    """Refuse a value that looks like a misspelt short name, before jsonargparse's long "Expected a path" error."""
    if "." in value or "/" in value or value.lower() in _ALIASES[flag]:
        return
    import anomalib.data
    import anomalib.models

    if hasattr(anomalib.models if flag.startswith("--model") else anomalib.data, value):
        return  # anomalib's own class names (Padim, MVTecAD, ...)
    close = difflib.get_close_matches(value.lower(), list(_ALIASES[flag]), n=1, cutoff=0.75)
    if close:
        names = " | ".join(_SHOWN_NAMES[path] for path in dict.fromkeys(_ALIASES[flag].values()))
        suggestion = _SHOWN_NAMES[_ALIASES[flag][close[0]]]
        raise UsageError(
            f"{flag} {value}: unknown name; did you mean {suggestion!r}? Short names: {names} (or a full class path)."
        )


def rewrite_arguments(arguments: Sequence[str]) -> list[str]:
    """Replace short ``--model``/``--data`` values (``--flag value`` or ``--flag=value``) by full class paths.

    Raises:
        UsageError: a value that is close to a short name but none (``--model fcd_hsc``).
    """
    rewritten: list[str] = []
    pending: str | None = None
    for argument in arguments:
        if pending is not None:
            _check_short_name(pending, argument)
            rewritten.append(_ALIASES[pending].get(argument.lower(), argument))
            pending = None
            continue
        flag, sep, value = argument.partition("=")
        if flag in _ALIASES and sep:
            _check_short_name(flag, value)
            rewritten.append(f"{flag}={_ALIASES[flag].get(value.lower(), value)}")
        else:
            rewritten.append(argument)
            pending = argument if argument in _ALIASES else None
    return rewritten


def _fcdd_cli() -> type:
    """anomalib's CLI with checks before the Engine opens a results folder, and run folders never left broken."""
    from anomalib.cli.cli import AnomalibCLI

    from .checkpoints import check_checkpoint
    from .data import CheckedDataModule
    from .models.fcdd.lightning_model import FcddHsc, check_options
    from .runs import RunFolder, RunWatch, category_folder

    class FcddCLI(AnomalibCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            model = self._get(self.config, "model")
            if _is_fcdd(getattr(model, "class_path", None)):
                checkpoint = self._get(self.config, "ckpt_path")
                if checkpoint and model.init_args is not None:
                    _adopt_checkpoint_options(model, checkpoint)
                check_options(dict(vars(model.init_args)) if model.init_args is not None else {})
                _refuse_overridden_trainer_flags(self._get(self.config, "trainer"))

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except ValueError:
                # jsonargparse reports an exception raised while building the model (a weight file that does not
                # load or fit) inside a long "does not validate against any of the Union subtypes" message.
                _raise_model_error(self._get(self.config, "model"))
                raise

        def instantiate_engine(self) -> None:
            self.run_watch = RunWatch()
            trainer = self._get(self.config_init, "trainer")
            if trainer is not None:
                callbacks = trainer.get("callbacks") or []
                trainer["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), self.run_watch]
            super().instantiate_engine()

        def _run_subcommand(self) -> None:
            datamodule: Any = getattr(self, "datamodule", None)
            model: Any = getattr(self, "model", None)
            if self.subcommand in _DATA_SUBCOMMANDS and isinstance(datamodule, CheckedDataModule):
                # A bad dataset then stops the run before anomalib creates the next version folder and points
                # ``latest`` at it, so the last good run's ``latest`` stays where it was.
                datamodule.prepare_data()
            checkpoint = self._get(self.config, "ckpt_path")
            fcdd = isinstance(model, FcddHsc)
            if checkpoint:
                check_checkpoint(checkpoint, model.hparams.get("backbone") if fcdd else None)
            elif self.subcommand == "export" and fcdd:
                raise UsageError(
                    "export needs a trained model: pass --ckpt_path <run>/weights/lightning/model.ckpt (written by "
                    "anomalib-fcdd train, e.g. results/FcddHsc/MVTec/bottle/latest/weights/lightning/model.ckpt). "
                    "Without one the export would hold an untrained network."
                )
            trainer = self._get(self.config, "trainer") or {}
            root = trainer.get("default_root_dir") if self.subcommand in _DATA_SUBCOMMANDS else None
            folder = category_folder(root, model, datamodule) if root is not None else None
            if folder is None:
                super()._run_subcommand()
                return
            run = RunFolder(folder, creates_version=self.subcommand in _VERSIONED_SUBCOMMANDS)
            run.prepare()
            try:
                super()._run_subcommand()
            except BaseException as error:
                what_happened = run.failed(error, self.run_watch)
                if self.run_watch.started:  # a run that never started is simply gone; the error line says why
                    logging.getLogger(__name__).error("The run did not finish: %s.", what_happened)
                raise
            if self.subcommand in _SUMMARY_SUBCOMMANDS:
                line = self.run_watch.summary(checkpoint)
                if line:
                    print(line)

    return FcddCLI


def _raise_model_error(model: Any) -> None:
    """Build an FCDD model from its parsed options again, so that a :class:`UserInputError` it raises surfaces."""
    class_path = getattr(model, "class_path", None)
    if not _is_fcdd(class_path):
        return
    import importlib

    module, _, name = class_path.rpartition(".")
    init_args = dict(vars(model.init_args)) if model.init_args is not None else {}
    try:
        getattr(importlib.import_module(module), name)(**init_args)
    except UserInputError:
        raise
    except Exception:  # anything else: jsonargparse's own message stands
        return


#: Trainer flags that FCDD sets itself from its own options, which anomalib's Engine would silently override.
_MODEL_OWNED_TRAINER_FLAGS = {
    "max_epochs": "--model.epochs N (paper epochs) and --model.passes_per_epoch P: the trainer runs N x P passes",
    "precision": "--model.precision (auto, 32-true or bf16-mixed)",
}


def _refuse_overridden_trainer_flags(trainer: Any) -> None:
    """Refuse ``--trainer.max_epochs``/``--trainer.precision`` with FCDD instead of overriding them silently."""
    for flag, instead in _MODEL_OWNED_TRAINER_FLAGS.items():
        if trainer is not None and getattr(trainer, flag, None) is not None:
            raise UsageError(f"--trainer.{flag} is set by the FCDD model, which would override yours; use {instead}.")


def _adopt_checkpoint_options(model: Any, checkpoint: str) -> None:
    """Rebuild the network as it was trained: options left at their defaults take the checkpoint's values (logged)."""
    import importlib

    from .checkpoints import options_from_checkpoint

    module, _, name = model.class_path.rpartition(".")
    defaults = init_defaults(getattr(importlib.import_module(module), name))
    adopted = options_from_checkpoint(checkpoint, dict(vars(model.init_args)), defaults)
    for option, value in adopted.items():
        setattr(model.init_args, option, value)
    if adopted:
        logging.getLogger(__name__).info(
            "FCDD: options as trained, from the checkpoint: %s.",
            ", ".join(f"{option}={value}" for option, value in adopted.items()),
        )


def init_defaults(cls: type) -> dict[str, Any]:
    """Default of every ``__init__`` argument of ``cls``, the subclass's where it changes one (``Fcdd``)."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            if parameter.default is not inspect.Parameter.empty:
                defaults[parameter.name] = parameter.default
    return defaults


def _is_fcdd(class_path: str | None) -> bool:
    """Whether a jsonargparse ``class_path`` names one of this package's models."""
    if not class_path:
        return False
    import importlib

    from .models.fcdd.lightning_model import FcddHsc

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, FcddHsc)


def _report(error: UserInputError) -> None:
    """One error message instead of a traceback (unless ``FCDD_TRACEBACK`` is set)."""
    if os.environ.get("FCDD_TRACEBACK"):
        raise error
    print(f"anomalib-fcdd: error: {error}", file=sys.stderr)
    print("(set FCDD_TRACEBACK=1 to see the traceback)", file=sys.stderr)
    raise SystemExit(2) from None


def main(arguments: Sequence[str] | None = None) -> None:
    """Entry point of ``anomalib-fcdd``."""
    from .logging_setup import silence_import_warnings

    silence_import_warnings()
    arguments = list(sys.argv[1:] if arguments is None else arguments)
    if arguments and arguments[0] == "demo":
        from .demo.cli import main as demo_main

        raise SystemExit(demo_main(arguments[1:]))
    if arguments and arguments[0] == "predict-openvino":
        from anomalib_fcdd.deploy.predict import main as predict_openvino

        raise SystemExit(predict_openvino(arguments[1:]))
    if arguments in _TOP_LEVEL_HELP:
        from .cli_help import print_help

        print_help()
        raise SystemExit(0)
    from .logging_setup import configure_logging, quiet_export
    from .registration import register

    configure_logging()
    try:
        rewritten = rewrite_arguments(arguments)
        register()  # the short class names for benchmark configs (``class_path: FcddHsc``)
        with quiet_export() if arguments[0] == "export" else contextlib.nullcontext():
            _fcdd_cli()(args=rewritten)
    except UserInputError as error:
        _report(error)


if __name__ == "__main__":
    main()
