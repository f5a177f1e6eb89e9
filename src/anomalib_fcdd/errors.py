"""Errors that are the user's to fix: a path, a file, a name or a value that cannot be used as given.

Each message says what is wrong, naming the file or option, and how to fix it. The ``anomalib-fcdd`` command prints
these as a one-line error without a traceback (``FCDD_TRACEBACK=1`` shows it); any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Base class: something the user supplied cannot be used; the message names it and the fix."""


class ConfigurationError(UserInputError, ValueError):
    """An option of the model has an unknown name or an impossible value (``--model.loss``, ``--model.backbone``...)."""
