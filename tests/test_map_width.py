"""The map-width research script: its metrics against hand computations, and a clear error without data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from benchmarks import map_width


def test_pixel_metrics_match_hand_computations() -> None:
    scores = np.array([[[0.1, 0.4], [0.35, 0.8]]], dtype=np.float32)
    masks = np.array([[[False, False], [True, True]]])
    auroc, ap, _ = map_width.pixel_metrics(scores, masks)
    # Defect pixels 0.35 and 0.8 against normal 0.1 and 0.4: 3 of the 4 pairs ordered right.
    assert auroc == pytest.approx(0.75)
    # Ranked 0.8 (defect), 0.4, 0.35 (defect), 0.1: precision 1/1 and 2/3 at the two defects.
    assert ap == pytest.approx((1 + 2 / 3) / 2)
    # A map equal to the masks overlaps every region fully before any false positive.
    assert map_width.pixel_metrics(masks.astype(np.float32), masks)[2] == pytest.approx(1.0)


def test_map_width_names_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert map_width.main(["--mvtec-root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "w.md")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "w.md").exists()


def test_map_width_refuses_a_sigma_of_zero(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        map_width.parse_args(["--stds", "8,0", "--mvtec-root", str(tmp_path)])
