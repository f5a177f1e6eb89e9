"""The ``anomalib-fcdd`` command: anomalib's CLI with short names for this plugin's classes.

``anomalib-fcdd train --model fcdd_hsc --data MVTec --data.root DIR --data.category bottle`` is rewritten to
``anomalib train --model anomalib_fcdd.FcddHsc --data anomalib_fcdd.data.MVTec ...`` and handed to anomalib's own CLI,
so every anomalib subcommand (fit, validate, test, train, predict, export, benchmark) and flag works unchanged.
anomalib 2.7's CLI accepts neither snake-case model names nor ``MVTec``.
"""

from __future__ import annotations

import difflib
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
    "anomalib_fcdd.data.MVTecFewAnomalies": "MVTecFewAnomalies",
}
#: Subcommands that read the datamodule, whose folder check runs before the Engine opens a results folder.
_DATA_SUBCOMMANDS = {"fit", "validate", "test", "train", "predict"}
HELP_PREFACE = """anomalib-fcdd: anomalib's command line with FCDD's short names, and two commands of its own.

  anomalib-fcdd demo --help               the offline demo: FCDD on real texture photographs, with a report
  anomalib-fcdd predict-openvino --help   score images with an exported OpenVINO model (CSV and heatmaps)

  Short names: --model fcdd_hsc | fcdd, --data MVTec | MVTecFewAnomalies (full class paths work as well).
  Example: anomalib-fcdd train --model fcdd_hsc --data MVTec --data.root ./datasets/MVTecAD --data.category bottle

anomalib's own help follows.
"""


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
    """anomalib's CLI, checking an MVTec folder before the Engine opens a results folder for the run."""
    from anomalib.cli.cli import AnomalibCLI

    from .data import MVTec
    from .models.fcdd.lightning_model import check_options

    class FcddCLI(AnomalibCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            model = self._get(self.config, "model")
            if _is_fcdd(getattr(model, "class_path", None)):
                check_options(dict(vars(model.init_args)) if model.init_args is not None else {})

        def _run_subcommand(self) -> None:
            datamodule: Any = getattr(self, "datamodule", None)
            if self.subcommand in _DATA_SUBCOMMANDS and isinstance(datamodule, MVTec):
                # A bad dataset then stops the run before anomalib creates the next version folder and points
                # ``latest`` at it, so the last good run's ``latest`` stays where it was.
                datamodule.prepare_data()
            super()._run_subcommand()

    return FcddCLI


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
    arguments = list(sys.argv[1:] if arguments is None else arguments)
    if arguments and arguments[0] == "demo":
        from .demo.cli import main as demo_main

        raise SystemExit(demo_main(arguments[1:]))
    if arguments and arguments[0] == "predict-openvino":
        from anomalib_fcdd.deploy.predict import main as predict_openvino

        raise SystemExit(predict_openvino(arguments[1:]))
    if not arguments or arguments[0] in {"-h", "--help"}:
        print(HELP_PREFACE)
    from anomalib.loggers import configure_logger

    import anomalib_fcdd  # noqa: F401  (registers the classes for benchmark configs)

    try:
        rewritten = rewrite_arguments(arguments)
        configure_logger()
        _fcdd_cli()(args=rewritten)
    except UserInputError as error:
        _report(error)


if __name__ == "__main__":
    main()
