"""Models shipped by anomalib-fcdd."""

from .fcdd import Fcdd, FcddHsc

__all__ = ["Fcdd", "FcddHsc"]
