"""Datamodules, dataset checks and generated data for anomalib-fcdd."""

from .loading import ContinuousPassLoader, PassBatchSampler
from .mvtec import MVTec, MVTecFewAnomalies, select_anomalies
from .synthetic import make_synthetic_mvtec
from .validation import DatasetError, validate_mvtec_layout

__all__ = [
    "ContinuousPassLoader",
    "DatasetError",
    "MVTec",
    "MVTecFewAnomalies",
    "PassBatchSampler",
    "make_synthetic_mvtec",
    "select_anomalies",
    "validate_mvtec_layout",
]
