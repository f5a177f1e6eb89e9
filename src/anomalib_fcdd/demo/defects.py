"""Realistic surface defects drawn onto texture windows, reproducibly on every machine.

Each defect takes a grayscale-photo window (``H x W x 3`` float64, values 0-255) and returns the damaged window in the
same format; the caller rounds both the clean and the damaged crop to uint8 and marks exactly the pixels that differ.
A window is the test crop plus a margin, so that folds and pastes can draw on texture from just outside the crop.

Cross-machine determinism: random numbers come from a ``numpy.random.Generator`` (a stable bit stream), smooth noise
is made with integer box blurs, and every floating-point step is an elementwise ``+ - * /`` or ``sqrt`` (correctly
rounded in IEEE 754, SIMD or not). Transcendental functions (``exp``, ``sin``) and float reductions, whose last bits
depend on the CPU's code path, are not used on images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Window = np.ndarray  # H x W x 3 float64 in [0, 255]


@dataclass(frozen=True)
class DefectContext:
    """What a defect may use besides its own window.

    Attributes:
        donors: photographs of *other* textures (``H x W`` uint8) for cut-and-paste defects.
        crop_origin: ``(row, col)`` of the crop inside the window (the margin); defects are centred in the crop.
        crop_size: side of the crop.
    """

    donors: Sequence[np.ndarray]
    crop_origin: tuple[int, int]
    crop_size: int


DefectFunction = Callable[[np.random.Generator, Window, DefectContext], Window]


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic building blocks
# ---------------------------------------------------------------------------------------------------------------------
def unit_vector(rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly random direction ``(dy, dx)`` without trigonometric functions."""
    while True:
        dy, dx = (float(v) for v in rng.normal(size=2))
        norm = math.sqrt(dy * dy + dx * dx)
        if norm > 1e-6:
            return dy / norm, dx / norm


def _box_blur(values: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Integer moving average of width ``2 * radius + 1`` along ``axis`` (edges repeated), exact on every machine."""
    pad = [(0, 0)] * values.ndim
    pad[axis] = (radius + 1, radius)
    sums = np.cumsum(np.pad(values, pad, mode="edge"), axis=axis)
    width = 2 * radius + 1
    upper = np.take(sums, np.arange(width, sums.shape[axis]), axis=axis)
    lower = np.take(sums, np.arange(0, sums.shape[axis] - width), axis=axis)
    return (upper - lower) // width


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Blotchy noise in [-1, 1] with features of about ``cell`` pixels (random grid, three integer box blurs)."""
    rows, cols = shape[0] // cell + 2, shape[1] // cell + 2
    field = rng.integers(0, 1024, size=(rows, cols), dtype=np.int64)
    field = np.repeat(np.repeat(field, cell, axis=0), cell, axis=1)[: shape[0], : shape[1]]
    radius = max(cell // 2, 1)
    for _ in range(3):
        field = _box_blur(_box_blur(field, radius, 0), radius, 1)
    low, high = int(field.min()), int(field.max())
    return (field - low).astype(np.float64) / max(high - low, 1) * 2.0 - 1.0


def _grid(shape: tuple[int, int], centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets of every pixel from ``centre``."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    return rows - centre[0], cols - centre[1]


def irregular_blob(
    rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radius: float, roughness: float
) -> np.ndarray:
    """Approximate signed distance (pixels, positive inside) to a random, rotated, ragged ellipse.

    The ellipse has mean radius ``radius`` and aspect up to 2; ``roughness`` (fraction of the radius) bends its outline
    with smooth noise, so no two blobs look alike and none is a geometric primitive.
    """
    dy, dx = _grid(shape, centre)
    axis_y, axis_x = unit_vector(rng)
    along = dx * axis_x + dy * axis_y
    across = dy * axis_x - dx * axis_y
    aspect = float(rng.uniform(1.0, 2.0))
    semi_a, semi_b = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    normalised = np.sqrt((along / semi_a) * (along / semi_a) + (across / semi_b) * (across / semi_b))
    noise = smooth_noise(rng, shape, max(int(radius // 2), 2))
    return (1.0 - normalised) * radius + roughness * radius * noise


def coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the region ``signed_distance > 0`` (a one-pixel linear ramp)."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _centre_in_crop(rng: np.random.Generator, context: DefectContext, inset: float = 0.2) -> tuple[float, float]:
    """A random point in the inner part of the crop, in window coordinates."""
    low, high = inset * context.crop_size, (1.0 - inset) * context.crop_size
    row, col = rng.uniform(low, high, size=2)
    return context.crop_origin[0] + float(row), context.crop_origin[1] + float(col)


def _blend(window: Window, target: Window, alpha: np.ndarray) -> Window:
    """``window`` moved towards ``target`` by ``alpha`` (``H x W``), clipped to the 8-bit range."""
    return np.clip(window + alpha[..., None] * (target - window), 0.0, 255.0)


def _segment_distance(
    dy: np.ndarray, dx: np.ndarray, start: tuple[float, float], end: tuple[float, float]
) -> np.ndarray:
    """Distance of every pixel (given by offsets from the origin) to the segment ``start``-``end``."""
    sy, sx = end[0] - start[0], end[1] - start[1]
    length2 = sy * sy + sx * sx
    py, px = dy - start[0], dx - start[1]
    t = np.clip((py * sy + px * sx) / length2, 0.0, 1.0)
    ry, rx = py - t * sy, px - t * sx
    return np.sqrt(ry * ry + rx * rx)


# ---------------------------------------------------------------------------------------------------------------------
# Defect types
# ---------------------------------------------------------------------------------------------------------------------
def scratch(rng: np.random.Generator, window: Window, context: DefectContext) -> Window:
    """A thin, slightly bent dark groove or bright scrape (an anti-aliased polyline of 2-4 segments)."""
    dy, dx = _grid(window.shape[:2], (0.0, 0.0))
    point = _centre_in_crop(rng, context, inset=0.15)
    direction = unit_vector(rng)
    distance = np.full(window.shape[:2], np.inf)
    for _ in range(int(rng.integers(2, 5))):
        step = float(rng.uniform(0.12, 0.25)) * context.crop_size
        bend_y, bend_x = rng.normal(scale=0.35, size=2)
        vy, vx = direction[0] + float(bend_y), direction[1] + float(bend_x)
        norm = math.sqrt(vy * vy + vx * vx)
        direction = (vy / norm, vx / norm)
        end = (point[0] + step * direction[0], point[1] + step * direction[1])
        distance = np.minimum(distance, _segment_distance(dy, dx, point, end))
        point = end
    half_width = float(rng.uniform(0.9, 1.8))
    alpha = coverage(half_width - distance) * float(rng.uniform(0.8, 1.0))
    if rng.random() < 0.6:
        target = window * 0.2 + float(rng.uniform(5, 25))
    else:
        target = window * 0.2 + float(rng.uniform(180, 215))
    return _blend(window, target, alpha)


def foreign_patch(rng: np.random.Generator, window: Window, context: DefectContext) -> Window:
    """An irregular piece of another texture's photograph pasted in (contamination, a wrong-material repair)."""
    donor = context.donors[int(rng.integers(len(context.donors)))]
    height, width = window.shape[:2]
    row = int(rng.integers(0, donor.shape[0] - height + 1))
    col = int(rng.integers(0, donor.shape[1] - width + 1))
    piece = donor[row : row + height, col : col + width].astype(np.float64)
    piece = np.rot90(piece, int(rng.integers(4))) if height == width else piece
    radius = float(rng.uniform(0.08, 0.16)) * context.crop_size
    blob = irregular_blob(rng, window.shape[:2], _centre_in_crop(rng, context), radius, roughness=0.35)
    return _blend(window, np.repeat(piece[..., None], 3, axis=2), coverage(blob))


def stain(rng: np.random.Generator, window: Window, context: DefectContext) -> Window:
    """A smooth, blotchy discolouration (oil, rust or bleach) with a soft edge and uneven strength."""
    radius = float(rng.uniform(0.1, 0.2)) * context.crop_size
    blob = irregular_blob(rng, window.shape[:2], _centre_in_crop(rng, context), radius, roughness=0.3)
    feather = float(rng.uniform(3.0, 7.0))
    strength = 0.75 + 0.25 * smooth_noise(rng, window.shape[:2], max(int(radius // 3), 2))
    alpha = np.clip(blob / feather, 0.0, 1.0) * strength
    tints = {"oil": (0.5, 0.5, 0.55), "rust": (1.05, 0.68, 0.42), "bleach": (1.4, 1.4, 1.35)}
    tint = np.array(tints[str(rng.choice(sorted(tints)))]) * float(rng.uniform(0.9, 1.1))
    return _blend(window, window * tint, alpha)


def hole(rng: np.random.Generator, window: Window, context: DefectContext) -> Window:
    """A dark, ragged hole with a lighter broken rim around it."""
    radius = float(rng.uniform(0.05, 0.1)) * context.crop_size
    blob = irregular_blob(rng, window.shape[:2], _centre_in_crop(rng, context), radius, roughness=0.4)
    inside = coverage(blob)
    rim_width = float(rng.uniform(1.5, 3.0))
    rim = coverage(blob + rim_width) - inside
    dark = window * 0.12 + float(rng.uniform(8, 25))
    light = np.minimum(window * 1.25 + 30.0, 255.0)
    return _blend(_blend(window, light, rim * 0.8), dark, inside)


def fold(rng: np.random.Generator, window: Window, context: DefectContext) -> Window:
    """A fold across the crop: a band of texture pulled over its neighbour (a shifted seam), in its own shade.

    The flap is lit differently from the flat surface (darker or lighter), has a dark crease where it starts and a
    light ridge where it bends back.
    """
    height, width = window.shape[:2]
    point = _centre_in_crop(rng, context, inset=0.3)
    normal = unit_vector(rng)
    dy, dx = _grid((height, width), point)
    signed = dy * normal[0] + dx * normal[1]
    band = float(rng.uniform(0.04, 0.06)) * context.crop_size
    shift = float(rng.uniform(0.08, 0.12)) * context.crop_size
    rows = np.clip(np.arange(height) + round(shift * normal[0]), 0, height - 1)
    cols = np.clip(np.arange(width) + round(shift * normal[1]), 0, width - 1)
    shade = float(rng.uniform(0.45, 0.6)) if rng.random() < 0.5 else float(rng.uniform(1.4, 1.6))
    inside = coverage(signed) * coverage(band - signed)
    folded = _blend(window, window[rows][:, cols] * shade, inside)
    ridge = np.clip(1.0 - np.abs(signed - band), 0.0, 1.0) * 0.6
    folded = _blend(folded, np.minimum(window * 1.3 + 30.0, 255.0), ridge)
    crease = np.clip(1.5 - np.abs(signed), 0.0, 1.0) * 0.8
    return _blend(folded, window * 0.2, crease)


#: Defect types of the demo, by folder name (``test/<name>``, ``ground_truth/<name>``).
DEFECTS: dict[str, DefectFunction] = {
    "scratch": scratch,
    "foreign_patch": foreign_patch,
    "stain": stain,
    "hole": hole,
    "fold": fold,
}
