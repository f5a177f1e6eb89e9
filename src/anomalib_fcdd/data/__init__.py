"""Datamodules, dataset checks and generated data for anomalib-fcdd."""

from .mvtec import MVTec, MVTecFewAnomalies, select_anomalies
from .synthetic import make_synthetic_mvtec
from .validation import DatasetError, validate_mvtec_layout

__all__ = [
    "DatasetError",
    "MVTec",
    "MVTecFewAnomalies",
    "make_synthetic_mvtec",
    "select_anomalies",
    "validate_mvtec_layout",
]
