"""A small, seeded MVTec-layout dataset generated offline, for tests and the quick-start run.

Normal images are a smooth periodic texture (a few random sinusoid gratings per colour channel, the same frequencies
for the whole category, with random phase and mild pixel noise). Defects are drawn on top with their exact masks:
dark scratches (thick line segments) and discoloured elliptical stains. None of them is confetti, so a model trained
with confetti must generalise to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, frequencies: np.ndarray, size: int) -> np.ndarray:
    """``size x size x 3`` uint8 texture: gratings with fixed frequencies and random phases, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size, 3))
    for channel in range(3):
        for fy, fx in frequencies[channel]:
            phase = rng.uniform(0, 2 * np.pi)
            image[..., channel] += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    image = 0.5 + 0.15 * image / len(frequencies[0]) + rng.normal(0, 0.02, image.shape)
    base_colour = np.array([0.55, 0.45, 0.35])
    return (np.clip(image * base_colour / 0.5, 0, 1) * 255).astype(np.uint8)


def _scratch(rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean mask of a thick line segment."""
    yy, xx = np.mgrid[0:size, 0:size]
    start = rng.uniform(0.2, 0.8, 2) * size
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.25, 0.5) * size
    direction = np.array([np.sin(angle), np.cos(angle)])
    rel = np.stack([yy - start[0], xx - start[1]], axis=-1)
    along = rel @ direction
    across = np.abs(rel @ np.array([-direction[1], direction[0]]))
    return (along >= 0) & (along <= length) & (across <= max(1.5, size / 60))


def _stain(rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean mask of a rotated ellipse."""
    yy, xx = np.mgrid[0:size, 0:size]
    centre = rng.uniform(0.25, 0.75, 2) * size
    radii = rng.uniform(0.06, 0.14, 2) * size
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1


def make_synthetic_mvtec(
    root: str | Path,
    category: str = "synthetic",
    n_train: int = 16,
    n_test_good: int = 4,
    n_test_defect: int = 4,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write ``root/category/{train/good, test/good, test/{scratch,stain}, ground_truth/...}`` and return its path.

    Defective test images are split between the two defect types; every defect image has a ``<stem>_mask.png`` with
    255 exactly on the pixels that differ from the defect-free image.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / category
    frequencies = rng.integers(1, 6, size=(3, 3, 2))
    folders = {"train/good": n_train, "test/good": n_test_good}
    for folder, count in folders.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(_texture(rng, frequencies, size)).save(base / folder / f"{index:03d}.png")
    defects = {"scratch": _scratch, "stain": _stain}
    for index in range(n_test_defect):
        name = list(defects)[index % len(defects)]
        (base / "test" / name).mkdir(parents=True, exist_ok=True)
        (base / "ground_truth" / name).mkdir(parents=True, exist_ok=True)
        normal = _texture(rng, frequencies, size)
        mask = defects[name](rng, size)
        colour = np.array([30, 25, 20]) if name == "scratch" else rng.integers(0, 256, 3)
        image = normal.copy()
        image[mask] = (0.2 * normal[mask] + 0.8 * colour).astype(np.uint8)
        changed = (image != normal).any(-1)
        stem = f"{index:03d}"
        Image.fromarray(image).save(base / "test" / name / f"{stem}.png")
        Image.fromarray((changed * 255).astype(np.uint8)).save(base / "ground_truth" / name / f"{stem}_mask.png")
    return base
