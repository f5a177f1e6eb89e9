"""FCDD's INT8 post-training quantisation: integer convolutions, float everything around them.

nncf's default ``quantize`` also puts 8-bit fake-quantisers in front of the element-wise ops and reductions of
FCDD's graph: the input's LCN and min-max, the pseudo-Huber distance ``sqrt(phi^2 + 1) - 1``, the Gaussian upsampler
(two ``MatMul``; the reference's 2-D form is a ``ConvolutionBackpropData``), the image score's mean and anomalib's score
normalisation. Rounding the one-channel anomaly map to 256 levels before it is upsampled and averaged ties pixels and
images that the float model ranks apart, and that is where the default INT8_PTQ artefact lost its accuracy (bottle:
image AUROC 0.94 -> 0.85, measured with ``benchmarks/export_accuracy.py``-style scoring). Keeping those op types in
float leaves every backbone convolution and the head in INT8 -- nearly all of the compute -- and costs almost nothing
in speed.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: OpenVINO op types that stay in float: the element-wise maths and reductions around the CNN (LCN, min-max,
#: pseudo-Huber, the image score's mean, score normalisation), the upsampler (matrix products, or the reference's
#: transposed convolution) and the bilinear resize's matrix products.
FLOAT_OP_TYPES = (
    "ConvolutionBackpropData",
    "MatMul",
    "Multiply",
    "Divide",
    "Add",
    "Subtract",
    "Sqrt",
    "Abs",
    "Power",
    "ReduceMean",
    "ReduceSum",
    "ReduceMin",
    "ReduceMax",
)


def _images(batch: Any) -> Any:
    """nncf's transform: the image tensor of a calibration batch (anomalib batches and plain dicts alike)."""
    return batch["image"]


def quantize_post_training(model: Any, datamodule: Any) -> Any:
    """INT8 post-training quantisation of an OpenVINO FCDD graph, calibrated on ``datamodule.val_dataloader()``.

    The same contract as anomalib's ``ExportMixin._post_training_quantization_ov`` (which this replaces for FCDD):
    ``datamodule`` is set up for ``fit``, its batch size follows a static batch dimension, and its validation loader
    supplies the calibration images (:class:`~.export.TrainingImagesForCalibration` answers that with *training*
    images). Ops of :data:`FLOAT_OP_TYPES` are excluded from quantisation.

    Raises:
        ValueError: no datamodule (calibration needs images).
    """
    import nncf

    if datamodule is None:
        raise ValueError(
            "INT8_PTQ needs calibration images: pass a datamodule (Engine.export(..., datamodule=...), "
            "anomalib_fcdd.deploy.export_all(model, root, datamodule)), or use INT8 weight compression instead."
        )
    datamodule.setup("fit")
    model_input = model.input(0)
    if model_input.partial_shape[0].is_static:
        datamodule.train_batch_size = model_input.shape[0]
    loader = datamodule.val_dataloader()
    logger.info("INT8_PTQ: calibrating on %d images; float ops: %s", len(loader.dataset), ", ".join(FLOAT_OP_TYPES))
    ignored = nncf.IgnoredScope(types=list(FLOAT_OP_TYPES), validate=False)
    return nncf.quantize(model, nncf.Dataset(loader, _images), subset_size=len(loader), ignored_scope=ignored)
