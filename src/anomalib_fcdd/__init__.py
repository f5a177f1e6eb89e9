"""anomalib-fcdd: FCDD with a selectable hypersphere loss as an anomalib 2.7 plugin.

Importing the package registers the models with anomalib, so that ``anomalib.models.get_model("fcdd_hsc")`` and
``anomalib benchmark`` configs with ``class_path: FcddHsc`` work in this process.
"""

from .models import Fcdd, FcddHsc
from .models.fcdd import ConfettiAnomalyGenerator, ConfettiNoise, FcddLoss, FcddModel
from .registration import register

__version__ = "0.1.0"

register()

__all__ = ["ConfettiAnomalyGenerator", "ConfettiNoise", "Fcdd", "FcddHsc", "FcddLoss", "FcddModel", "register"]
