"""Deployment: export to torch / ONNX / OpenVINO (FP32, FP16, INT8) and OpenVINO inference on images.

:func:`export_all` writes every variant of a trained model into named folders; ``anomalib-fcdd predict-openvino``
(:func:`anomalib_fcdd.deploy.predict.main`) scores images with one of them, needing nothing but the exported files.
"""

from .export import VARIANTS, ExportedArtefact, TrainingImagesForCalibration, export_all, export_variant

__all__ = ["VARIANTS", "ExportedArtefact", "TrainingImagesForCalibration", "export_all", "export_variant"]
