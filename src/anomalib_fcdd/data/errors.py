"""The dataset error, in a module of its own so that the decoder and the checks can both raise it."""

from __future__ import annotations

from ..errors import UserInputError


class DatasetError(UserInputError, ValueError):
    """The dataset on disk cannot be used as it is; the message names the path and the fix."""
