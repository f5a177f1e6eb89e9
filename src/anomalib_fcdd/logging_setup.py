"""Console output of ``anomalib-fcdd``: each log line once, and no third-party chatter when nothing is wrong.

Why not anomalib's ``configure_logger``: it calls ``logging.basicConfig`` (a plain stream handler on the root logger)
*and* adds a ``RichHandler`` to the root logger, so every record is printed twice; it then adds another
``RichHandler`` to ``lightning.pytorch``. Here the root logger gets exactly one handler, and Lightning's loggers,
which install their own stream handler when they are imported before any logging is set up, hand their records to
it instead.

What is kept out, narrowly (by logger name or message, so anything else still shows):

* the ``FutureWarning`` s that importing anomalib raises on every command (``timm.models.layers`` and anomalib's
  deprecated ``dinov2`` package, both imported by anomalib's own models, not by this package);
* the ONNX exporter's progress (``onnx_ir``/``onnxscript`` INFO records, ``torch.onnx``'s opset note and its
  ``[torch.onnx] ...`` progress prints) and onnxscript's "Failed to convert the model to the target version"
  warning with a traceback, which is printed on *successful* exports: the fallback it reports keeps the exporter's
  opset, and a real failure raises an exception anyway;
* Lightning's advertisement for ``litlogger``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import TextIO

FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
#: (message regex, category) of warnings raised by third-party imports on every command.
IMPORT_WARNINGS = (
    (r"Importing from timm\.models\.layers is deprecated", FutureWarning),
    (r"The anomalib\.models\.components\.dinov2 package is deprecated", FutureWarning),
)
#: Loggers whose INFO records narrate an ONNX export step by step; only their warnings and errors are shown.
EXPORT_CHATTER = ("onnx_ir", "onnxscript", "onnx", "torch.onnx")
#: Loggers whose warnings describe a fallback that worked (onnxscript's opset conversion, torch choosing opset 18
#: for the requested 14); only their errors are shown.
FALLBACK_WARNINGS = ("onnxscript.version_converter", "torch.onnx._internal.exporter._compat")
#: Loggers that install their own stream handler when imported before logging is configured.
LIBRARY_HANDLERS = ("lightning.pytorch", "lightning_fabric", "lightning.fabric")
#: Substrings of log messages that are advertisements, not information about the run.
ADVERTISEMENTS = ("litlogger",)


class ConsoleHandler(logging.StreamHandler):
    """The one handler ``anomalib-fcdd`` puts on the root logger (a class of its own, so it is never added twice)."""


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in ADVERTISEMENTS)


def silence_import_warnings() -> None:
    """Ignore the third-party ``FutureWarning`` s listed in :data:`IMPORT_WARNINGS` (call before importing anomalib)."""
    for message, category in IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def configure_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """One console handler on the root logger at ``level``; idempotent. Returns the handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, ConsoleHandler):
            root.removeHandler(handler)
    handler = ConsoleHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_DropAdvertisements())
    root.addHandler(handler)
    root.setLevel(level)
    route_library_loggers()
    return handler


def route_library_loggers() -> None:
    """Send Lightning's records to the root handler only, and quieten the exporters (after they are imported too)."""
    for name in LIBRARY_HANDLERS:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if type(handler) is logging.StreamHandler or type(handler).__name__ == "RichHandler":
                library.removeHandler(handler)
        library.propagate = True
    for name in EXPORT_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in FALLBACK_WARNINGS:
        logging.getLogger(name).setLevel(logging.ERROR)


class _LineFilter(io.TextIOBase):
    """A text stream that forwards every line except those starting with one of ``prefixes``."""

    def __init__(self, target: TextIO, prefixes: tuple[str, ...]) -> None:
        self.target, self.prefixes, self.pending = target, prefixes, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not line.startswith(self.prefixes):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not self.pending.startswith(self.prefixes):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Drop the ``[torch.onnx] ...`` progress lines that ``torch.onnx.export`` prints to stdout during an export."""
    route_library_loggers()  # torch may have reset its loggers' levels when it was imported
    filtered = _LineFilter(sys.stdout, ("[torch.onnx]",))
    with contextlib.redirect_stdout(filtered):  # type: ignore[type-var]
        try:
            yield
        finally:
            filtered.flush()
