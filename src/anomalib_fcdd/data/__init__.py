"""Datamodules, dataset checks, image decoding and generated data for anomalib-fcdd."""

from .base import CheckedDataModule, default_num_workers
from .decode import ImageDecodeError, decode_image_tensor, decode_rgb, inspect_image
from .errors import DatasetError
from .folder import Folder, FolderFewAnomalies
from .mvtec import MVTec, MVTecFewAnomalies, select_anomalies
from .synthetic import make_synthetic_mvtec
from .validation import validate_mvtec_layout

__all__ = [
    "CheckedDataModule",
    "DatasetError",
    "Folder",
    "FolderFewAnomalies",
    "ImageDecodeError",
    "MVTec",
    "MVTecFewAnomalies",
    "decode_image_tensor",
    "decode_rgb",
    "default_num_workers",
    "inspect_image",
    "make_synthetic_mvtec",
    "select_anomalies",
    "validate_mvtec_layout",
]
