"""The paper-setting timing script runs end to end on a tiny synthetic stand-in and reports what it measured."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks import paper_timing


def test_paper_timing_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "timing.md"
    argv = [
        "--synthetic",
        "--synthetic-scale",
        "0.03",
        "--epochs",
        "2",
        "--passes-per-epoch",
        "1",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--precision",
        "32-true",
        "--output",
        str(output),
    ]
    assert paper_timing.main(argv) == 0
    text = output.read_text()
    assert text.startswith("# FCDD training time at the paper's settings")
    assert "2 epochs x 1 passes, batch 4" in text
    assert "precision 32-true" in text
    row = next(line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit())
    fit, validation, images_per_second, seconds_per_pass = (float(cell) for cell in row.split("|")[1:5])
    assert fit > validation > 0
    assert images_per_second > 0
    assert seconds_per_pass > 0
    assert "not on an H200" in text
    assert "paper epoch 2:" in capsys.readouterr().out


def test_paper_timing_names_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert paper_timing.main(["--mvtec-root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "t.md")]) == 2
    assert "nowhere" in capsys.readouterr().err
