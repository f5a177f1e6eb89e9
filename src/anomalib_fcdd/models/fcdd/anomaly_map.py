"""Gaussian receptive-field upsampling of FCDD's low-resolution anomaly map.

FCDD scores every output pixel of a stride-``j`` network, and each of those pixels "sees" an ``r x r`` patch of the
input centred at ``j * i + s``. The reference upsamples by drawing, for every low-resolution pixel, an (unnormalised)
Gaussian of the receptive-field size at that centre and summing them: a transposed convolution with stride ``j`` and
a fixed Gaussian kernel, followed by a crop that aligns the centres. Because the kernel is not normalised, a constant
map is amplified by about 3.7 in the interior and about 1.0 at the corners; the loss is computed on this scaled map, so
a faithful implementation must keep it that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one output pixel of a fully convolutional network.

    Attributes:
        size: side ``r`` of the square input patch one output pixel depends on.
        stride: distance ``j`` in input pixels between two neighbouring output pixels.
        offset: input coordinate ``s`` of the centre of output pixel 0 (pixel ``i`` is centred at ``j*i + s``).
    """

    size: int
    stride: int
    offset: float


def gaussian_window(size: int, std: float) -> torch.Tensor:
    """1-D Gaussian window with peak 1, built as the reference does for even sizes.

    For an odd ``size`` this is ``exp(-0.5 * ((k - (size-1)/2) / std)^2)``. For an even ``size`` the reference samples
    an odd window of ``size - 1`` points and duplicates its centre sample, so the two middle taps both equal 1.
    """
    if size < 1:
        raise ValueError(f"Gaussian window size must be positive, got {size}.")
    odd = size if size % 2 == 1 else size - 1
    k = torch.arange(odd, dtype=torch.float64) - (odd - 1) / 2
    window = torch.exp(-0.5 * (k / std) ** 2)
    if odd != size:
        centre = (odd - 1) // 2
        window = torch.cat([window[: centre + 1], window[centre:]])
    return window


def receptive_field_kernel(size: int, std: float) -> torch.Tensor:
    """The reference's unnormalised 2-D kernel: outer product of ``gaussian_window / 2`` with itself.

    For ``size=62, std=12`` the peak is 0.25 and the sum about 236.4.
    """
    window = gaussian_window(size, std) / 2
    return torch.outer(window, window)


#: Gaussian taps further than this many standard deviations from the centre are below 3.4e-4 of the peak.
KERNEL_STDS = 4


def kernel_size(receptive_field_size: int, std: float) -> int:
    """The receptive field's size, capped at ``2 * ceil(4 std) + 1`` taps.

    The reference sizes the kernel by the receptive field (62 for VGG, below the cap of 97 at sigma 12, so unchanged).
    A multi-scale backbone's field spans hundreds of pixels, whose outer taps are zero to float precision but would
    make the transposed convolution several times slower.
    """
    return min(receptive_field_size, 2 * math.ceil(KERNEL_STDS * std) + 1)


class ReceptiveFieldUpsampler(nn.Module):
    """Upsample a ``B x 1 x h x w`` map to the input resolution with the fixed Gaussian receptive-field kernel.

    ``out = crop(conv_transpose2d(x, G, stride=j))`` where ``G`` is :func:`receptive_field_kernel` and the crop starts
    at ``(r - 1) // 2 - floor(s)`` so that low-resolution pixel ``i`` lands centred at ``j*i + s``. The output size is
    an argument, so any input resolution works.

    Args:
        receptive_field: receptive field of the network's output pixels.
        std: standard deviation of the Gaussian in input pixels (12 in the reference's MVTec config).
        separable: the kernel is an outer product of a 1-D window ``g``, so compute the cropped result directly as two
            matrix products, ``out = U_H x U_W^T`` with ``U[y, i] = g[y + c - j i]`` (``c`` the crop start; 0 outside
            the window): the same sums up to float rounding (~1e-7 relative), without the rows and columns the crop
            throws away. A one-channel ``r x r`` transposed convolution has no fast kernel in oneDNN or OpenVINO's CPU
            plugin and otherwise dominates FCDD's run time; two 1-D transposed convolutions, the form used before,
            still computed a 313 x 313 map to keep 224 x 224 of it. The products made a four-head training step about
            16 % shorter (``benchmarks/results/heads.md``) and the deployed FP16 graph 1.3-1.4x as fast
            (``benchmarks/results/offline/ANALYSIS.md``). ``False`` runs the reference's 2-D transposed convolution.
        normalized: divide every output pixel by the kernel mass it receives, ``out / upsample(1)``: a weighted mean
            of the low-resolution scores around it instead of their Gaussian-weighted sum. The reference's sum
            scales a constant map by about 3.5 in the interior and 0.27 in the corners (at sigma 12 on a stride-8
            grid), so a defect at the image's edge scores several times lower than the same defect in the middle.
            Separable, ``upsample(1)`` is the outer product of the two matrices' row sums, so dividing each
            matrix's rows by their sums does it at no cost.
    """

    def __init__(
        self, receptive_field: ReceptiveField, std: float = 12.0, separable: bool = True, normalized: bool = False
    ) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError(f"gauss_std must be positive, got {std}.")
        self.receptive_field = receptive_field
        self.std = float(std)
        self.kernel_size = kernel_size(receptive_field.size, self.std)
        kernel = receptive_field_kernel(self.kernel_size, std).to(torch.float32)
        self.register_buffer("kernel", kernel[None, None], persistent=False)
        window = (gaussian_window(self.kernel_size, std) / 2).to(torch.float32)
        self.register_buffer("window", window, persistent=False)
        self.separable = separable
        self.normalized = normalized
        self.crop_start = (self.kernel_size - 1) // 2 - math.floor(receptive_field.offset)
        if self.crop_start < 0:
            raise ValueError(f"Receptive field {receptive_field} gives a negative crop; offset larger than r/2.")
        self._matrices: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def forward(self, low_res: torch.Tensor, output_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Upsample ``low_res`` (B x 1 x h x w) to ``output_size`` (H, W)."""
        if low_res.dim() != 4 or low_res.shape[1] != 1:
            raise ValueError(f"Expected a B x 1 x h x w map, got shape {tuple(low_res.shape)}.")
        if torch.is_autocast_enabled(low_res.device.type):
            # Scores must not be rounded to bf16 (it would create ties in the pixel ranking): run in fp32.
            with torch.autocast(low_res.device.type, enabled=False):
                return self.forward(low_res.float(), output_size)
        if self.separable:
            rows = self.upsampling_matrix(low_res.shape[-2], output_size[0], low_res.device)
            columns = self.upsampling_matrix(low_res.shape[-1], output_size[1], low_res.device)
            return rows.to(low_res.dtype) @ low_res @ columns.T.to(low_res.dtype)
        summed = self._transposed_sum(low_res, output_size)
        if self.normalized:  # divided by the mass each pixel receives: the same sum of a map of ones
            return summed / self._transposed_sum(torch.ones_like(low_res[:1]), output_size)
        return summed

    def _transposed_sum(self, low_res: torch.Tensor, output_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """The reference's Gaussian-weighted sum as one 2-D transposed convolution, cropped to ``output_size``."""
        stride = self.receptive_field.stride
        full = F.conv_transpose2d(low_res, self.kernel.to(dtype=low_res.dtype), stride=stride)
        # A spare stride of zeros on the bottom/right covers input sizes that are not a multiple of the stride:
        # pixels past the last low-resolution centre get no mass from outside the image, as with the reference's
        # output_padding.
        full = F.pad(full, (0, stride, 0, stride))
        start = self.crop_start
        return full[:, :, start : start + output_size[0], start : start + output_size[1]]

    def upsampling_matrix(self, low: int, high: int, device: torch.device) -> torch.Tensor:
        """``high x low`` matrix of one axis: ``U[y, i] = g[y + c - j i]``, 0 where that is outside the window; with
        ``normalized`` each row divided by its sum."""
        key = (low, high, device)
        if key not in self._matrices:
            if len(self._matrices) >= 8:  # a few training sizes at most; never grows without bound
                self._matrices.clear()
            taps = torch.arange(high)[:, None] + self.crop_start - self.receptive_field.stride * torch.arange(low)
            inside = (taps >= 0) & (taps < self.kernel_size)
            window = self.window.cpu()
            matrix = torch.where(inside, window[taps.clamp(0, self.kernel_size - 1)], torch.zeros(()))
            if self.normalized:
                matrix = matrix / matrix.sum(dim=1, keepdim=True)
            self._matrices[key] = matrix.to(device)
        return self._matrices[key]
