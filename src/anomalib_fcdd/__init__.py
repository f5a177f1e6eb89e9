"""anomalib-fcdd: FCDD with a selectable hypersphere loss as an anomalib 2.7 plugin.

The classes below are imported on first use (PEP 562), so that ``anomalib-fcdd --help`` does not pay for torch and
anomalib (12 s). Using any of them (``from anomalib_fcdd import FcddHsc``) also registers the models with anomalib,
so that ``anomalib.models.get_model("fcdd_hsc")`` and ``anomalib benchmark`` configs with ``class_path: FcddHsc``
work in this process; ``anomalib_fcdd.register()`` does the same explicitly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ConfettiAnomalyGenerator", "ConfettiNoise", "Fcdd", "FcddHsc", "FcddLoss", "FcddModel", "register"]
#: Where each public name lives, relative to this package.
_HOMES = {
    "Fcdd": ".models",
    "FcddHsc": ".models",
    "ConfettiAnomalyGenerator": ".models.fcdd",
    "ConfettiNoise": ".models.fcdd",
    "FcddLoss": ".models.fcdd",
    "FcddModel": ".models.fcdd",
    "register": ".registration",
}

if TYPE_CHECKING:
    from .models import Fcdd, FcddHsc
    from .models.fcdd import ConfettiAnomalyGenerator, ConfettiNoise, FcddLoss, FcddModel
    from .registration import register


def __getattr__(name: str) -> Any:
    """Import ``name`` on first use and register the models with anomalib."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    importlib.import_module(".registration", __name__).register()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
