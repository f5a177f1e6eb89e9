"""Speed benchmarks run end to end on tiny generated data and report what they measured."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from benchmarks import bench_data_cache, bench_heads, bench_openvino_batch, bench_training, paper_timing


@pytest.mark.slow
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
    assert "paper epoch 2:" in capsys.readouterr().out


def test_stand_in_has_bottles_counts_and_a_mask_for_every_defect(tmp_path: Path) -> None:
    from anomalib_fcdd.data import validate_mvtec_layout

    paper_timing.stand_in_dataset(tmp_path, "bottle", scale=0.1)  # 209 x 0.1 -> 21 train, 2 good, 6 defective, 90 px
    base = tmp_path / "bottle"
    assert len(list((base / "train" / "good").glob("*.png"))) == 21
    assert len(list((base / "test" / "good").glob("*.png"))) == 2
    defects = sorted((base / "test").glob("s*/*.png"))
    assert len(defects) == 6
    for image in defects:
        assert (base / "ground_truth" / image.parent.name / f"{image.stem}_mask.png").is_file(), image
    validate_mvtec_layout(tmp_path, "bottle")  # raises on any missing or mismatched file


def test_paper_timing_names_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert paper_timing.main(["--mvtec-root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "t.md")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_variant_without_separable_upsampling_reaches_the_output_maps_upsampler() -> None:
    # The default model scores its map with its own (normalised) upsampler beside training's: both run the variant.
    variant = bench_training.Variant("2-D upsampling", bf16=False, accelerate=False, separable_upsampling=False)
    model = bench_training.build(variant).model
    assert model.map_upsampler is not model.upsampler
    assert not model.upsampler.separable and not model.map_upsampler.separable


@pytest.mark.slow
def test_training_benchmark_times_every_variant(tmp_path: Path) -> None:
    output = tmp_path / "training.md"
    argv = ["--batch", "2", "--rounds", "1", "--skip-memory", "--no-readme", "--output", str(output)]
    assert bench_training.main(argv) == 0
    rows = [
        line
        for line in output.read_text().splitlines()
        if line.startswith("| reference") or line.startswith("| default")
    ]
    assert len(rows) >= 5  # the reference, the default, and one row per trick switched off
    figures = [[float(cell) for cell in row.split("|")[2:6]] for row in rows]
    base_train, _, base_infer, _ = figures[0]
    for train, train_ratio, infer, infer_ratio in figures:
        assert train > 0 and infer > 0
        assert train_ratio == pytest.approx(
            train / base_train, rel=0.02, abs=0.01
        )  # from figures rounded to 2 decimals
        assert infer_ratio == pytest.approx(
            infer / base_infer, rel=0.02, abs=0.01
        )  # from figures rounded to 2 decimals


@pytest.mark.slow
def test_full_category_memory_reports_fit_time_rss_and_pss(synthetic_root: Path, tmp_path: Path) -> None:
    memory = bench_training.full_category_memory(synthetic_root, "synthetic", tmp_path, batch=8)
    assert memory["fit_seconds"] > 0
    assert 0.2 < memory["main_gib"] < 8, "torch alone is a few hundred MiB resident"
    assert memory["worker_gib"] > 0, "two DataLoader workers ran"
    if Path("/proc/self/smaps_rollup").exists():
        assert 0.2 < memory["total_pss_gib"] < memory["main_gib"] + 2 * memory["worker_gib"]


def test_heads_report_gives_medians_spreads_and_their_ratio() -> None:
    samples = {
        1: {"train": [10.0, 30.0, 20.0], "infer": [40.0, 40.0, 50.0]},
        4: {"train": [5.0, 15.0, 10.0], "infer": [40.0, 60.0, 80.0]},
    }
    section = bench_heads.report(samples, batch=16, rounds=3, command="python -m benchmarks.bench_heads")
    assert "| 1 | 20.0 (10.0-30.0) | 40.0 (40.0-50.0) |" in section
    assert "| 4 | 10.0 (5.0-15.0) | 60.0 (40.0-80.0) |" in section
    assert "training 0.50x, inference 1.50x" in section  # medians 10/20 and 60/40


@pytest.mark.slow
def test_heads_benchmark_times_both_variants(tmp_path: Path) -> None:
    output = tmp_path / "heads.md"
    bench_heads.main(["--batch", "2", "--rounds", "1", "--output", str(output)])
    rows = [line for line in output.read_text().splitlines() if line.startswith(("| 1 |", "| 4 |"))]
    assert len(rows) == 2
    assert all(float(row.split("|")[2].split()[0]) > 0 for row in rows)


def test_data_cache_benchmark_names_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_data_cache.main(["--mvtec-root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "c.md")]) == 2
    assert "--mvtec-root" in capsys.readouterr().err
    assert not (tmp_path / "c.md").exists()


@pytest.mark.slow
def test_data_cache_benchmark_times_both_variants(synthetic_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "cache.md"
    arguments = ["--mvtec-root", str(synthetic_root), "--category", "synthetic", "--passes", "1", "--rounds", "1"]
    assert bench_data_cache.main([*arguments, "--workdir", str(tmp_path / "w"), "--output", str(output)]) == 0
    rows = [
        line for line in output.read_text().splitlines() if line.startswith("| kept") or line.startswith("| decoded")
    ]
    assert len(rows) == 2
    assert all(float(row.split("|")[2].split()[0]) > 0 and float(row.split("|")[4]) > 0.1 for row in rows)


def test_openvino_batch_variants_fix_what_they_say(tmp_path: Path) -> None:
    """The compiled variants of one dynamic graph: the batch-fixed one takes exactly that batch at any size."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    image = ops.parameter([-1, 3, -1, -1], np.float32, name="image")
    xml = tmp_path / "dynamic.xml"
    ov.save_model(ov.Model([ops.relu(image)], [image], "dynamic"), xml)
    requests = bench_openvino_batch.compile_variants(xml, batch=2)
    assert list(requests) == list(bench_openvino_batch.VARIANTS)
    fixed = requests[bench_openvino_batch.FIXED_BATCH]
    shape = fixed.model_inputs[0].get_partial_shape()
    assert shape[0].get_length() == 2 and shape[2].is_dynamic and shape[3].is_dynamic
    images = -np.ones((2, 3, 224, 224), dtype=np.float32)
    for request in requests.values():
        assert float(np.asarray(request.infer({0: images})[0]).max()) == 0.0  # relu of -1
    assert bench_openvino_batch.throughput(fixed, images, seconds=0.05) > 0


def test_inference_rounds_alternate_the_order_and_report_the_median() -> None:
    import numpy as np
    from benchmarks import bench_inference

    visits: list[str] = []

    def runner(name: str) -> Callable[[object], None]:  # a stand-in for a compiled model
        return lambda batch: visits.append(name)

    candidates = [bench_inference.Candidate(name, "rt", "a", 1.0, {1: runner(name)}) for name in ("first", "second")]
    old = bench_inference.ARGS.seconds
    bench_inference.ARGS.seconds = 0.0  # one warm-up and one timed call per measurement
    try:
        rows = bench_inference.measure_rows(candidates, np.zeros((1, 3, 2, 2), np.float32), rounds=3)
    finally:
        bench_inference.ARGS.seconds = old
    # Each measurement is a warm-up and a timed call; rounds go forward, backward, forward.
    assert visits == ["first"] * 2 + ["second"] * 4 + ["first"] * 4 + ["second"] * 2
    for row in rows:
        assert len(row.rounds[1]) == 3
        assert row.throughput[1] == sorted(row.rounds[1])[1]  # the median of three


def test_throughput_goal_takes_ratios_within_rounds_against_the_same_and_the_fastest_patchcore() -> None:
    from benchmarks.bench_inference import DEFAULT_FCDD, Row, throughput_goal

    def row(model: str, runtime: str, rounds: list[float]) -> Row:
        return Row(model, runtime, "a", 1.5, {1: sorted(rounds)[1]}, None, {1: rounds})

    rows = [
        row("patchcore", "OpenVINO FP16 (bf16)", [100.0, 50.0, 100.0]),  # median 100
        row("patchcore", "OpenVINO INT8_PTQ (bf16)", [120.0, 60.0, 110.0]),  # median 110: the fastest
        row("patchcore", "torch fp32", [900.0, 900.0, 900.0]),  # not an OpenVINO row: ignored
        row(DEFAULT_FCDD, "OpenVINO INT8 (bf16)", [240.0, 150.0, 198.0]),  # no PatchCore INT8 row
        row(DEFAULT_FCDD, "OpenVINO FP16 (bf16)", [180.0, 90.0, 220.0]),
        row(DEFAULT_FCDD, "OpenVINO FP16 (bf16), dynamic batch", [1.0, 1.0, 1.0]),  # left out
    ]
    header, rule, int8, fp16 = throughput_goal(rows, [1])
    assert header.startswith(f"| {DEFAULT_FCDD} |") and rule.startswith("|---|")
    # INT8 / fastest (INT8_PTQ), round by round: 240/120 = 2.0, 150/60 = 2.5, 198/110 = 1.8.
    assert int8 == "| OpenVINO INT8 (bf16) | 1.50 | 1 | - | 2.00x (1.80-2.50) met (INT8_PTQ (bf16)) |"
    # FP16 / PatchCore's FP16: 1.8, 1.8, 2.2; FP16 / the fastest: 1.5, 1.5, 2.0.
    same, fastest = "1.80x (1.80-2.20) NOT met", "1.50x (1.50-2.00) NOT met (INT8_PTQ (bf16))"
    assert fp16 == f"| OpenVINO FP16 (bf16) | 1.50 | 1 | {same} | {fastest} |"
