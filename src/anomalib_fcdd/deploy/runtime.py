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


class OpenVINOModel:
    """A compiled OpenVINO model (``.xml`` or ``.onnx``) called on NCHW float32 batches, returning named outputs."""

    def __init__(self, path: Path | str, precision: str = "f32", device: str = "CPU", **config: Any) -> None:
        import openvino as ov

        settings = {**(OV_PRECISION[precision] or {}), **config}
        self.compiled = ov.Core().compile_model(str(path), device, settings)
        self.request = self.compiled.create_infer_request()

    @property
    def execution_precision(self) -> str:
        """What the device actually runs in (e.g. ``f32`` or ``bf16``)."""
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; outputs are copied so the next call cannot overwrite them."""
        results = self.request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return {output.any_name: np.array(results[output]) for output in self.compiled.outputs}


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
