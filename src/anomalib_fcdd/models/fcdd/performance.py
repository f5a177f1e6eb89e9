"""Choosing fast numerics for the hardware at hand: bf16 autocast where it is native, fp32 elsewhere.

bf16 only pays off where the hardware computes it natively: CUDA GPUs that report bf16 support, and x86 CPUs with
AMX or AVX-512-BF16 (oneDNN then runs bf16 convolutions on those units). Elsewhere -- e.g. AVX2-only CPUs, where
oneDNN emulates bf16 -- it is slower than fp32, so ``precision="auto"`` keeps fp32 there.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

#: /proc/cpuinfo flags of x86 CPUs with native bf16 matrix/vector instructions.
NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def native_bf16_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The AMX-BF16 / AVX512-BF16 flags the CPU advertises (Linux x86; empty where unknown)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return NATIVE_BF16_CPU_FLAGS & frozenset(line.split(":", 1)[-1].split())
    return frozenset()


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16 (Linux x86; False where unknown)."""
    return bool(native_bf16_cpu_flags(cpuinfo))


def resolve_precision(precision: str, accelerator: str | None = None) -> str:
    """Map ``"auto"`` to a Lightning precision string: ``"bf16-mixed"`` where bf16 is native, else ``"32-true"``.

    Any other value is returned unchanged, so users can force ``"32-true"`` or ``"bf16-mixed"``.
    """
    if precision != "auto":
        return precision
    use_cuda = accelerator in {"cuda", "gpu"} or (accelerator in {None, "auto"} and torch.cuda.is_available())
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
