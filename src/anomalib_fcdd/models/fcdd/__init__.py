"""FCDD (Fully Convolutional Data Description) with a selectable hypersphere loss.

Liznerski et al., "Explainable Deep One-Class Classification", ICLR 2021; Bertoldo et al., "Adapting the Hypersphere
Loss Function from Anomaly Detection to Anomaly Segmentation".
"""

from .anomaly_generator import ConfettiAnomalyGenerator, ConfettiNoise
from .anomaly_map import ReceptiveField, ReceptiveFieldUpsampler
from .lightning_model import Fcdd, FcddHsc, FcddPreProcessor
from .loss import FcddLoss, fcdd_loss, per_image_loss, pixel_balanced_loss, push
from .torch_model import FcddModel

__all__ = [
    "ConfettiAnomalyGenerator",
    "ConfettiNoise",
    "Fcdd",
    "FcddHsc",
    "FcddLoss",
    "FcddModel",
    "FcddPreProcessor",
    "ReceptiveField",
    "ReceptiveFieldUpsampler",
    "fcdd_loss",
    "per_image_loss",
    "pixel_balanced_loss",
    "push",
]
