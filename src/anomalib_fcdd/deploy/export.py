"""Export a trained FCDD model to every deployable format and precision in one call.

Each artefact is produced by anomalib's own exporters (``to_torch``, ``to_onnx``, ``to_openvino``), so the graph holds
the whole pipeline from a raw ``[0, 1]`` RGB image to the result: the pre-processor's resize, LCN and min-max (inside
``FcddModel``), the network, the pseudo-Huber map, the Gaussian upsampling and anomalib's score normalisation and
thresholds. Every variant is written to its own, plainly named folder under ``export_root``::

    export_root/
        torch/model.pt                      pickled AnomalibModule (needs this plugin installed to load)
        onnx/model.onnx (+ model.onnx.data)
        openvino_fp32/model.xml, model.bin
        openvino_fp16/...                   weights stored as fp16
        openvino_int8/...                   nncf weight compression (no data needed)
        openvino_int8_ptq/...               nncf post-training quantisation, calibrated on training images
        manifest.json                       what was written, sizes, input size, versions

Why calibrate INT8_PTQ on the *training* images: anomalib's ``INT8_PTQ`` calibrates on the datamodule's validation
loader, which for MVTec-AD is a copy of the test set. Feeding it the training split instead keeps test images out of
every step that shapes the deployed model.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from anomalib.deploy import CompressionType, ExportType
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2.functional import resize

logger = logging.getLogger(__name__)

#: ONNX opset for exports. torch's dynamo exporter emits opset 18 and cannot down-convert FCDD's graph to anomalib's
#: default of 14 (it logs a long traceback and keeps 18 anyway), so 18 is asked for directly.
ONNX_OPSET = 18

#: Variant name -> (export format, OpenVINO compression).
VARIANTS: dict[str, tuple[ExportType, CompressionType | None]] = {
    "torch": (ExportType.TORCH, None),
    "onnx": (ExportType.ONNX, None),
    "openvino_fp32": (ExportType.OPENVINO, None),
    "openvino_fp16": (ExportType.OPENVINO, CompressionType.FP16),
    "openvino_int8": (ExportType.OPENVINO, CompressionType.INT8),
    "openvino_int8_ptq": (ExportType.OPENVINO, CompressionType.INT8_PTQ),
}

_MODEL_SUFFIX = {ExportType.TORCH: ".pt", ExportType.ONNX: ".onnx", ExportType.OPENVINO: ".xml"}


@dataclass(frozen=True)
class ExportedArtefact:
    """One exported variant.

    Attributes:
        name: variant name (a key of :data:`VARIANTS`), also the folder name.
        path: the model file to load (``model.pt``, ``model.onnx`` or ``model.xml``).
        size_bytes: on-disk size of everything in the variant's folder (e.g. ``.xml`` + ``.bin``).
    """

    name: str
    path: Path
    size_bytes: int

    @property
    def folder(self) -> Path:
        """The variant's folder (what to copy to a device)."""
        return self.path.parent

    @property
    def size_mb(self) -> float:
        """Size in MB (10^6 bytes)."""
        return self.size_bytes / 1e6


class TrainingImagesForCalibration:
    """Present a datamodule's *training* images where anomalib's INT8_PTQ looks for validation data.

    anomalib's post-training quantisation calls ``setup("fit")`` and ``val_dataloader()`` on whatever it is given and
    feeds ``batch["image"]`` to nncf (after setting ``train_batch_size`` to the graph's batch size when that is
    fixed). This adapter answers ``val_dataloader()`` with an unshuffled loader over (at most ``max_images`` of) the
    training split, so calibration is deterministic and never sees test images. Images stay raw -- the graph resizes
    them -- unless the graph has a fixed ``image_size``, in which case they are resized to it (bilinear).

    Batches hold one image unless the graph's batch size is fixed: raw images may differ in size, and nncf counts
    each batch as one sample, so 32 images in one batch of the datamodule's size were "only 1 samples" to it (and
    images beyond the last full batch were dropped).
    """

    def __init__(self, datamodule: Any, max_images: int = 300, image_size: tuple[int, int] | None = None) -> None:
        self.datamodule = datamodule
        self.max_images = max_images
        self.image_size = image_size
        self.train_batch_size = 1  # the quantiser sets the graph's batch size here when it is fixed

    def setup(self, stage: str | None = None) -> None:
        """Set up the wrapped datamodule (idempotent in anomalib)."""
        self.datamodule.setup(stage)

    def val_dataloader(self) -> DataLoader:
        """The first ``max_images`` training images in dataset order, as ``{"image": B x 3 x H x W}`` batches."""
        dataset = self.datamodule.train_data
        # at least one full batch (a fixed-batch graph takes no other size): repeat images if there are too few
        count = max(min(len(dataset), self.max_images), self.train_batch_size)
        return DataLoader(
            Subset(dataset, [index % len(dataset) for index in range(count)]),
            batch_size=self.train_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            drop_last=True,
        )

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """Stack the items' images, resized first for a fixed-size graph."""
        images = [item.image for item in items]
        if self.image_size is not None:
            images = [resize(image, list(self.image_size), antialias=True) for image in images]
        return {"image": torch.stack(images)}


def folder_size(folder: Path) -> int:
    """Total size in bytes of the regular files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def export_variant(
    model: Any,
    name: str,
    export_root: Path | str,
    input_size: tuple[int, int] | None = None,
    datamodule: Any = None,
    calibration_images: int = 300,
    onnx_kwargs: dict[str, Any] | None = None,
) -> ExportedArtefact:
    """Export one variant of ``model`` into ``export_root/name`` (replacing what was there).

    anomalib writes to ``<root>/weights/<format>/``; the export runs in a temporary folder and the files are moved
    up, so each variant's folder holds nothing but its own model files. ``onnx_kwargs`` go to ``torch.onnx.export``
    (e.g. ``{"dynamic_shapes": ({0: 16},)}`` with ``input_size`` for a fully static graph).
    """
    if name not in VARIANTS:
        raise ValueError(f"Unknown export variant {name!r}; choose from {sorted(VARIANTS)}.")
    export_type, compression = VARIANTS[name]
    if compression == CompressionType.INT8_PTQ and datamodule is None:
        raise ValueError(f"Variant {name!r} needs a datamodule for calibration images.")
    model = model.cpu()
    target = Path(export_root) / name
    with tempfile.TemporaryDirectory(prefix=f"fcdd_{name}_") as scratch:
        written = _run_exporter(
            model, export_type, compression, Path(scratch), input_size, datamodule, calibration_images, onnx_kwargs
        )
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for file in written.parent.iterdir():
            shutil.move(str(file), target / file.name)
    path = target / f"model{_MODEL_SUFFIX[export_type]}"
    artefact = ExportedArtefact(name=name, path=path, size_bytes=folder_size(target))
    logger.info("Exported %s to %s (%.2f MB)", name, path, artefact.size_mb)
    return artefact


def _run_exporter(
    model: Any,
    export_type: ExportType,
    compression: CompressionType | None,
    scratch: Path,
    input_size: tuple[int, int] | None,
    datamodule: Any,
    calibration_images: int,
    onnx_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Call the matching anomalib exporter; returns the written model file."""
    onnx_options = {"opset_version": ONNX_OPSET, **(onnx_kwargs or {})}
    if export_type == ExportType.TORCH:
        return model.to_torch(scratch)
    if export_type == ExportType.ONNX:
        return model.to_onnx(scratch, input_size=input_size, **onnx_options)
    calibration = None
    if compression == CompressionType.INT8_PTQ:
        calibration = TrainingImagesForCalibration(datamodule, calibration_images, image_size=input_size)
    return model.to_openvino(
        scratch,
        input_size=input_size,
        compression_type=compression,
        datamodule=calibration,
        onnx_kwargs=onnx_options,
    )


def export_all(
    model: Any,
    export_root: Path | str,
    datamodule: Any = None,
    input_size: tuple[int, int] | None = None,
    variants: list[str] | tuple[str, ...] | None = None,
    calibration_images: int = 300,
) -> dict[str, ExportedArtefact]:
    """Export ``model`` as torch, ONNX and OpenVINO FP32 / FP16 / INT8 / INT8_PTQ into ``export_root``.

    Args:
        model: a trained FCDD ``AnomalibModule`` (its post-processor must hold fitted thresholds).
        export_root: folder that receives one sub-folder per variant plus ``manifest.json``.
        datamodule: source of calibration images for ``openvino_int8_ptq`` (its training split). Without it, the
            PTQ variant is skipped when ``variants`` is not given and is an error when it is asked for.
        input_size: ``None`` (default) exports a graph that takes any image size and resizes inside; ``(H, W)``
            fixes the input size.
        variants: subset of :data:`VARIANTS` to write; all by default.
        calibration_images: at most this many training images calibrate INT8_PTQ (nncf's default subset is 300).

    Returns:
        variant name -> :class:`ExportedArtefact` (model path and on-disk size), in export order.
    """
    names = list(variants) if variants is not None else list(VARIANTS)
    if variants is None and datamodule is None:
        names.remove("openvino_int8_ptq")
        logger.warning("No datamodule given: skipping openvino_int8_ptq (it needs calibration images).")
    root = Path(export_root)
    root.mkdir(parents=True, exist_ok=True)
    size = (int(input_size[0]), int(input_size[1])) if input_size is not None else None
    artefacts = {name: export_variant(model, name, root, size, datamodule, calibration_images) for name in names}
    write_manifest(root, artefacts, size)
    return artefacts


def write_manifest(root: Path, artefacts: dict[str, ExportedArtefact], input_size: tuple[int, ...] | None) -> Path:
    """Record what was exported, how large it is and with which tool versions (``manifest.json``)."""
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input_size": list(input_size) if input_size else "dynamic",
        "onnx_opset": ONNX_OPSET,
        "variants": {
            name: {"file": str(a.path.relative_to(root)), "size_bytes": a.size_bytes} for name, a in artefacts.items()
        },
        "versions": {package: _version(package) for package in ("anomalib", "torch", "openvino", "nncf")},
        "python": platform.python_version(),
    }
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
