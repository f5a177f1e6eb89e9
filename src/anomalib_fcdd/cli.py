"""The ``anomalib-fcdd`` command: anomalib's CLI with short names for this plugin's classes.

``anomalib-fcdd train --model fcdd_hsc --data MVTec --data.root DIR --data.category bottle`` is rewritten to
``anomalib train --model anomalib_fcdd.FcddHsc --data anomalib_fcdd.data.MVTec ...`` and handed to anomalib's own CLI,
so every anomalib subcommand (fit, validate, test, train, predict, export, benchmark) and flag works unchanged.
anomalib 2.7's CLI accepts neither snake-case model names nor ``MVTec``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

MODEL_ALIASES = {
    "fcdd": "anomalib_fcdd.Fcdd",
    "fcdd_hsc": "anomalib_fcdd.FcddHsc",
    "fcddhsc": "anomalib_fcdd.FcddHsc",
}
DATA_ALIASES = {
    "mvtec": "anomalib_fcdd.data.MVTec",
    "mvtecfewanomalies": "anomalib_fcdd.data.MVTecFewAnomalies",
    "mvtec_few_anomalies": "anomalib_fcdd.data.MVTecFewAnomalies",
}
_ALIASES = {"--model": MODEL_ALIASES, "--data": DATA_ALIASES}


def rewrite_arguments(arguments: Sequence[str]) -> list[str]:
    """Replace short ``--model``/``--data`` values (``--flag value`` or ``--flag=value``) by full class paths."""
    rewritten: list[str] = []
    pending: dict[str, str] | None = None
    for argument in arguments:
        if pending is not None:
            rewritten.append(pending.get(argument.lower(), argument))
            pending = None
            continue
        flag, sep, value = argument.partition("=")
        if flag in _ALIASES and sep:
            rewritten.append(f"{flag}={_ALIASES[flag].get(value.lower(), value)}")
        else:
            rewritten.append(argument)
            pending = _ALIASES.get(argument)
    return rewritten


def main(arguments: Sequence[str] | None = None) -> None:
    """Entry point of ``anomalib-fcdd``."""
    arguments = list(sys.argv[1:] if arguments is None else arguments)
    if arguments and arguments[0] == "demo":
        from .demo.cli import main as demo_main

        raise SystemExit(demo_main(arguments[1:]))
    if arguments and arguments[0] == "predict-openvino":
        from anomalib_fcdd.deploy.predict import main as predict_openvino

        raise SystemExit(predict_openvino(arguments[1:]))
    from anomalib.cli.cli import AnomalibCLI
    from anomalib.loggers import configure_logger

    import anomalib_fcdd  # noqa: F401  (registers the classes for benchmark configs)

    configure_logger()
    AnomalibCLI(args=rewrite_arguments(arguments))


if __name__ == "__main__":
    main()
