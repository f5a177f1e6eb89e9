"""Speed, behind one seam: bf16 autocast where it is native, channels-last tensors, BatchNorm folded at inference.

Everything here changes how fast FCDD runs, never what it computes beyond float rounding, and all of it is public
PyTorch API. The network (:mod:`.torch_model`) asks :class:`Acceleration` for its input layout and for the backbone
to run; ``FcddModel(accelerate=False)`` (``--model.accelerate false``) gives plain fp32-layout eager PyTorch, the
reference's kind of step. Precision is Lightning's: ``precision="auto"`` resolves to bf16 autocast only where the
hardware computes bf16 natively (CUDA GPUs that report it, x86 CPUs with AMX or AVX512-BF16); elsewhere, e.g. on
AVX2-only CPUs where oneDNN emulates bf16, that is slower than fp32, so ``auto`` keeps fp32.

What each part buys is measured in ``benchmarks/README.md`` (``python -m benchmarks.bench_training``).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ...errors import ConfigurationError

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


#: What ``precision`` accepts: ``auto`` and Lightning's precision strings.
PRECISIONS = (
    "auto",
    "32-true",
    "32",
    "bf16-mixed",
    "bf16",
    "16-mixed",
    "16",
    "bf16-true",
    "16-true",
    "64-true",
    "64",
    "transformer-engine",
    "transformer-engine-float16",
)


def check_precision(precision: str) -> str:
    """``precision`` as a string if it is ``auto`` or a Lightning precision; else a :class:`ConfigurationError`."""
    value = str(precision)
    if value not in PRECISIONS:
        raise ConfigurationError(
            f"Unknown precision {precision!r} (--model.precision). Use 'auto' (bf16 autocast where the hardware "
            "computes bf16 natively, fp32 elsewhere), '32-true' (fp32) or 'bf16-mixed'; Lightning also accepts "
            f"{', '.join(repr(p) for p in PRECISIONS if p not in {'auto', '32-true', 'bf16-mixed'})}."
        )
    return value


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


def fold_conv_batchnorm(features: nn.Module) -> nn.Sequential | None:
    """An eval-mode copy of ``features`` with each direct ``Conv2d -> BatchNorm2d`` pair folded into one ``Conv2d``.

    In eval mode a BatchNorm is a fixed per-channel affine map, so the pair equals one convolution with
    ``w' = w g / sqrt(v + eps)`` and ``b' = (b - m) g / sqrt(v + eps) + beta``: the same function up to float rounding,
    with one read and write of every activation less per BN layer. Only exact ``nn.Conv2d`` / ``nn.BatchNorm2d``
    children of an ``nn.Sequential`` fold (VGG's layout; timm's ``BatchNormAct2d`` carries an activation and stays).
    Returns ``None`` when nothing folds.
    """
    if not isinstance(features, nn.Sequential):
        return None
    layers = list(features.children())
    folded: list[nn.Module] = []
    index, count = 0, 0
    while index < len(layers):
        layer, following = layers[index], layers[index + 1] if index + 1 < len(layers) else None
        if type(layer) is nn.Conv2d and type(following) is nn.BatchNorm2d and following.running_mean is not None:
            folded.append(fuse_conv_bn_eval(copy.deepcopy(layer).eval(), copy.deepcopy(following).eval()))
            index, count = index + 2, count + 1
        else:
            folded.append(copy.deepcopy(layer).eval())
            index += 1
    if count == 0:
        return None
    network = nn.Sequential(*folded).eval().requires_grad_(False)
    return network


class Acceleration:
    """The speed seam of :class:`~.torch_model.FcddModel`: channels-last layout and a BN-folded inference backbone.

    The folded copy is built on the first inference call and kept until the weights may have changed: the model
    calls :meth:`forget` when it switches to train mode or loads a state dict, and a copy whose tensors live on
    another device or in another dtype than the original's is rebuilt. It is not a submodule, so it is never saved.

    Args:
        enabled: ``False`` turns every trick off (plain NCHW eager layers).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._folded: tuple[tuple, nn.Module | None] | None = None

    def prepare(self, module: nn.Module) -> nn.Module:
        """``module`` with its weights in channels-last layout (oneDNN and cuDNN convolutions run NHWC faster)."""
        return module.to(memory_format=torch.channels_last) if self.enabled else module

    def input(self, images: torch.Tensor) -> torch.Tensor:
        """The network input in the layout the weights are in (exports keep the traced default layout)."""
        if self.enabled and not torch.compiler.is_exporting():
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def backbone(self, features: nn.Module, training: bool) -> nn.Module:
        """The backbone to run: its BN-folded copy at inference (no autograd, no tracing), else ``features``."""
        if (
            not self.enabled
            or training
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
        ):
            return features
        key = tuple((t.data_ptr(), t.device, t.dtype) for t in features.parameters())
        if self._folded is None or self._folded[0] != key:
            folded = fold_conv_batchnorm(features)
            self._folded = (key, None if folded is None else self.prepare(folded))
        return self._folded[1] or features

    def forget(self) -> None:
        """Drop the folded copy (the original's weights are about to change)."""
        self._folded = None

    def __getstate__(self) -> dict:
        """Pickle without the folded copy, so ``to_torch`` exports stay the size of the weights."""
        return {"enabled": self.enabled, "_folded": None}
