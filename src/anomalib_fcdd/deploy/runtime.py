"""Small helpers shared by the export checks and benchmarks: batch runners for exported graphs and a machine summary.

``predict-openvino`` scores one image at a time through anomalib's ``OpenVINOInferencer``; evaluations and throughput
measurements want whole ``B x 3 x H x W`` batches and named outputs, which these thin wrappers give for OpenVINO and
ONNX Runtime alike.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

#: OpenVINO compile configs by precision name; ``default`` leaves the device's choice (bf16 on AMX/avx512_bf16 CPUs).
OV_PRECISION: dict[str, dict[str, str] | None] = {
    "f32": {"INFERENCE_PRECISION_HINT": "f32"},
    "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
    "f16": {"INFERENCE_PRECISION_HINT": "f16"},
    "default": None,
}


def with_fixed_batch(model: Any, batch_size: int) -> Any:
    """``model`` (an ``openvino.Model``) with the batch dimension of its one input fixed to ``batch_size``, in place.

    FCDD's graphs are exported with a dynamic batch (and height and width), so one artefact serves every batch size.
    OpenVINO's CPU plugin then keeps the element-wise steps on the 224 x 224 maps (score normalisation, clamping,
    thresholds) as separate, unfused kernels: the default model took 2.8-3.0 ms per image at batch 1, and 1.7 ms with
    the batch fixed, whether height and width stay dynamic or not (FP16 IR, 2-core AMD EPYC;
    ``benchmarks/results/offline_semi_confetti/inference.md``). Height and width keep what the export gave them. A
    model whose batch is already fixed, or that has several inputs, is returned unchanged.
    """
    if len(model.inputs) != 1:
        return model
    shape = model.input(0).get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4 or shape[0].is_static:
        return model
    shape[0] = batch_size
    model.reshape({model.input(0): shape})
    return model


def output_names(model: Any) -> list[str]:
    """The name of each output of ``model`` (an ``openvino.Model`` as read), in order.

    Look a compiled model's outputs up by these, by position: once the batch is fixed the CPU plugin fuses the last
    nodes, and a compiled output can carry the names of the tensors fused into it (``{"amax", "pred_score"}``), so
    its ``any_name`` is not always the exported one.
    """
    return [output.get_any_name() for output in model.outputs]


class OpenVINOModel:
    """A compiled OpenVINO model (``.xml`` or ``.onnx``) called on NCHW float32 batches, returning named outputs.

    ``batch_size`` fixes a dynamic batch dimension at compile time (:func:`with_fixed_batch`); the model then takes
    batches of exactly that size. ``None`` keeps the exported shape (any batch size).
    """

    def __init__(
        self,
        path: Path | str,
        precision: str = "f32",
        device: str = "CPU",
        batch_size: int | None = None,
        **config: Any,
    ) -> None:
        import openvino as ov

        settings = {**(OV_PRECISION[precision] or {}), **config}
        core = ov.Core()
        model = core.read_model(str(path))
        self.output_names = output_names(model)
        if batch_size is not None:
            with_fixed_batch(model, batch_size)
        self.compiled = core.compile_model(model, device, settings)
        self.request = self.compiled.create_infer_request()

    @property
    def execution_precision(self) -> str:
        """What the device actually runs in (e.g. ``f32`` or ``bf16``)."""
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; outputs are copied so the next call cannot overwrite them."""
        results = self.request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return {
            name: np.array(results[output])
            for name, output in zip(self.output_names, self.compiled.outputs, strict=True)
        }


@dataclass(frozen=True)
class Machine:
    """Where a measurement ran."""

    cpu: str
    cores: int
    threads: int
    isa: str
    date: str
    python: str

    def describe(self) -> str:
        """One line for result files."""
        return f"{self.cpu}, {self.cores} cores / {self.threads} threads, {self.isa}; Python {self.python}"


def machine() -> Machine:
    """CPU model (``lscpu``), core and thread counts, best SIMD extension (as torch sees it) and ``date``."""
    info = _lscpu()
    cpu = info.get("Model name") or platform.processor() or "unknown CPU"
    threads = int(info.get("CPU(s)", os.cpu_count() or 1))
    per_socket = int(info.get("Core(s) per socket", threads))
    sockets = int(info.get("Socket(s)", 1))
    try:
        import torch

        isa = str(torch.backends.cpu.get_cpu_capability())
    except ImportError:  # pragma: no cover - torch is a dependency
        isa = "unknown"
    return Machine(cpu, per_socket * sockets, threads, isa, _date(), platform.python_version())


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    pairs = (re.split(r":\s*", line, maxsplit=1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _date() -> str:
    """The output of ``date`` (falls back to the local time in the same style)."""
    try:
        return subprocess.run(["date"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return datetime.now().astimezone().strftime("%a %b %d %H:%M:%S %Z %Y")


def versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "anomalib", "openvino", "nncf", "onnxruntime"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
