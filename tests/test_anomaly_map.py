"""Gaussian receptive-field upsampler against the reference's numbers and an independent kernel build."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal.windows import gaussian

from anomalib_fcdd.models.fcdd.anomaly_map import ReceptiveField, ReceptiveFieldUpsampler, receptive_field_kernel

VGG_FIELD = ReceptiveField(size=62, stride=8, offset=3.5)
#: The upsampler runs as two matrix products (``separable``, the default) or as the reference's 2-D transposed
#: convolution: both must give the hand-computed maps.
MODES = pytest.mark.parametrize("separable", [True, False], ids=["matrices", "2-D transposed convolution"])


def upsampler_in(field: ReceptiveField, separable: bool, std: float = 12.0) -> ReceptiveFieldUpsampler:
    return ReceptiveFieldUpsampler(field, std=std, separable=separable)


def reference_kernel() -> np.ndarray:
    """The reference recipe with SciPy: 61-tap window, centre duplicated, halved, outer product."""
    window = gaussian(61, std=12)
    window = np.concatenate([window[:31], window[30:]]) / 2
    return np.outer(window, window)


def test_kernel_matches_scipy_recipe() -> None:
    expected = reference_kernel()
    kernel = receptive_field_kernel(62, 12).numpy()
    np.testing.assert_allclose(kernel, expected, rtol=1e-12)
    assert kernel.max() == pytest.approx(0.25)
    assert kernel.sum() == pytest.approx(236.4, abs=0.1)


@MODES
def test_output_size_and_gains(separable: bool) -> None:
    upsampler = upsampler_in(VGG_FIELD, separable)
    out = upsampler(torch.ones(1, 1, 28, 28), (224, 224))
    assert out.shape == (1, 1, 224, 224)
    assert out[0, 0, 112, 112].item() == pytest.approx(3.7, abs=0.05)
    for corner in (out[0, 0, 0, 0], out[0, 0, -1, -1], out[0, 0, 0, -1], out[0, 0, -1, 0]):
        assert corner.item() == pytest.approx(1.0, abs=0.1)


@MODES
@pytest.mark.parametrize(("row", "col"), [(5, 9), (14, 14), (20, 6)])
def test_one_hot_pixel_is_centred_at_8i_plus_3_5(row: int, col: int, separable: bool) -> None:
    low = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    low[0, 0, row, col] = 1
    out = upsampler_in(VGG_FIELD, separable)(low, (224, 224))[0, 0]
    rows = torch.arange(224, dtype=torch.float64)
    row_centre = (out.sum(1) * rows).sum() / out.sum()
    col_centre = (out.sum(0) * rows).sum() / out.sum()
    assert row_centre.item() == pytest.approx(8 * row + 3.5, abs=1e-6)
    assert col_centre.item() == pytest.approx(8 * col + 3.5, abs=1e-6)
    # The two central taps share the peak value 0.25.
    assert out[8 * row + 3, 8 * col + 3].item() == pytest.approx(0.25)
    assert out[8 * row + 4, 8 * col + 4].item() == pytest.approx(0.25)


@MODES
def test_other_input_sizes_work(separable: bool) -> None:
    upsampler = upsampler_in(VGG_FIELD, separable)
    assert upsampler(torch.ones(2, 1, 8, 12), (64, 100)).shape == (2, 1, 64, 100)
    assert upsampler(torch.ones(2, 1, 8, 8), (67, 67)).shape == (2, 1, 67, 67)


@MODES
def test_border_pixel_peak_position(separable: bool) -> None:
    low = torch.zeros(1, 1, 28, 28)
    low[0, 0, 0, 27] = 1
    out = upsampler_in(VGG_FIELD, separable)(low, (224, 224))[0, 0]
    assert out[3, 8 * 27 + 3].item() == pytest.approx(0.25)
    assert out[4, 8 * 27 + 4].item() == pytest.approx(0.25)
    assert out.max().item() == pytest.approx(0.25)


def test_separable_form_equals_the_2d_kernel() -> None:
    low = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    separable = ReceptiveFieldUpsampler(VGG_FIELD, std=12, separable=True).double().eval()
    full = ReceptiveFieldUpsampler(VGG_FIELD, std=12, separable=False).double().eval()
    # Equal up to the float32 rounding of the stored kernel and window (~6e-8 relative).
    torch.testing.assert_close(separable(low, (224, 224)), full(low, (224, 224)), rtol=2e-7, atol=1e-9)


@MODES
def test_a_wide_receptive_field_uses_a_capped_kernel_with_the_same_maps(separable: bool) -> None:
    """A 355-px field (the multi-scale backbone's) at sigma 12: 97 taps instead of 355, results equal to 1e-3 relative.

    Hand computation: the full 355 x 355 reference kernel as one transposed convolution, cropped to centre pixel ``i``
    at ``8 i + 11``.
    """
    import torch.nn.functional as F  # noqa: N812

    field = ReceptiveField(355, 8, 11.0)
    upsampler = upsampler_in(field, separable)
    assert upsampler.kernel_size == 97
    low = torch.rand(2, 1, 28, 28)
    full = F.conv_transpose2d(low, receptive_field_kernel(355, 12.0).float()[None, None], stride=8)
    start = (355 - 1) // 2 - 11
    expected = F.pad(full, (0, 8, 0, 8))[:, :, start : start + 224, start : start + 224]
    torch.testing.assert_close(upsampler(low, (224, 224)), expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(("low_size", "size"), [((28, 28), (224, 224)), ((30, 37), (240, 296)), ((8, 9), (67, 71))])
def test_the_matrix_form_keeps_the_convolutions_sums_and_gradients(
    low_size: tuple[int, int], size: tuple[int, int]
) -> None:
    """The matrix products and the reference's 2-D transposed convolution: the same map and the same gradient for the
    head, also for sizes that are not a multiple of the stride (where the crop reaches the zero padding)."""
    field = ReceptiveField(355, 8, 11.0)
    low = torch.rand(3, 1, *low_size, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(3, 1, *size, dtype=torch.float64)
    maps, gradients = [], []
    for separable in (True, False):
        out = upsampler_in(field, separable).double()(low, size)
        (gradient,) = torch.autograd.grad((out * weights).sum(), low)
        maps.append(out)
        gradients.append(gradient)
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# normalized=True: a weighted mean of the low-resolution scores instead of their sum
# ---------------------------------------------------------------------------------------------------------------------
def weighted_mean_by_hand(low: np.ndarray, size: int, field: ReceptiveField, std: float) -> np.ndarray:
    """Output pixel (y, x) as the mean of the low-resolution scores weighted by the Gaussian of each one's distance
    from it, pixel by pixel: w_ij = g(y - (j_s i + s)) g(x - (j_s j + s)), g(d) = exp(-d^2 / (2 std^2)) restricted to
    the kernel's taps. The reference's even window duplicates its centre tap, so two pixels per axis hold the peak;
    on the VGG field, with centres at 8 i + 3.5, that is a distance of 0.5 rounded down to 0 on both sides."""
    half = (62 - 1) // 2  # 30 taps either side of the duplicated centre

    def weight(distance: float) -> float:
        steps = math.floor(abs(distance))  # |d| = 0.5 -> the centre tap, 1.5 -> one tap out, ...
        return math.exp(-0.5 * (steps / std) ** 2) if steps <= half else 0.0

    out = np.zeros((size, size))
    for y in range(size):
        for x in range(size):
            numerator = denominator = 0.0
            for i in range(low.shape[0]):
                for j in range(low.shape[1]):
                    w = weight(y - (field.stride * i + field.offset)) * weight(x - (field.stride * j + field.offset))
                    numerator += w * low[i, j]
                    denominator += w
            out[y, x] = numerator / denominator
    return out


@MODES
def test_a_normalized_upsampler_gives_the_weighted_mean_of_the_scores(separable: bool) -> None:
    low = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    upsampler = ReceptiveFieldUpsampler(VGG_FIELD, std=12.0, separable=separable, normalized=True)
    out = upsampler(low, (32, 32))[0, 0].numpy()
    np.testing.assert_allclose(out, weighted_mean_by_hand(low[0, 0].numpy(), 32, VGG_FIELD, 12.0), rtol=1e-6)


@MODES
def test_a_normalized_upsampler_keeps_a_constant_map_constant_up_to_the_border(separable: bool) -> None:
    # The reference's sum scales a constant by 3.7 in the middle and 1.0 in the corners; the mean keeps it.
    upsampler = ReceptiveFieldUpsampler(VGG_FIELD, std=12.0, separable=separable, normalized=True)
    out = upsampler(torch.full((1, 1, 28, 28), 2.0), (224, 224))
    torch.testing.assert_close(out, torch.full_like(out, 2.0))
