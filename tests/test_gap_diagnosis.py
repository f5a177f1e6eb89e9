"""benchmarks/gap_diagnosis.py: nearest-neighbour distances, a bounded memory draw, the package memory's options and
per-defect-type AUROC (the greedy selection itself: tests/test_memory_bank.py)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from benchmarks import gap_diagnosis


def test_nearest_distance_is_the_euclidean_distance_to_the_closest_memory_vector() -> None:
    # Three positions (0, 0), (3, 4), (1, 0) on a 1 x 3 grid; memory (0, 0) and (1, 1).
    features = torch.tensor([[[[0.0, 3.0, 1.0]], [[0.0, 4.0, 0.0]]]])
    memory = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    distances = gap_diagnosis.nearest_distance(features, memory)
    assert distances.shape == (1, 1, 1, 3)
    expected = [0.0, math.sqrt(2**2 + 3**2), 1.0]  # (3, 4) is sqrt(13) from (1, 1), 5 from (0, 0)
    assert distances.flatten().tolist() == pytest.approx(expected)


def test_projected_coreset_projects_wide_vectors_and_still_separates_far_clusters() -> None:
    # Two tight clusters of 300-dimensional vectors, far apart: a coreset of two takes one from each.
    generator = torch.Generator().manual_seed(0)
    near = torch.randn(20, 300, generator=generator) * 0.01
    far = near + 100.0
    chosen = gap_diagnosis.projected_coreset(torch.cat([near, far]), 2, projection_dim=16)
    assert chosen[0] == 0 and chosen[1] >= 20


class _Images(torch.utils.data.Dataset):
    """Images whose every feature vector is (image index, position index): the backbone stand-in is the identity."""

    def __init__(self, count: int, side: int) -> None:
        self.count, self.side = count, side

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        positions = torch.arange(self.side * self.side, dtype=torch.float32).view(1, self.side, self.side)
        return torch.cat([torch.full_like(positions, float(index)), positions])

    @staticmethod
    def collate_fn(items: list[torch.Tensor]) -> SimpleNamespace:
        return SimpleNamespace(image=torch.stack(items))


def test_normal_memory_draws_distinct_positions_spread_over_every_training_image() -> None:
    identity = SimpleNamespace(
        model=SimpleNamespace(backbone_features=lambda images: images), pre_processor=lambda images: images
    )
    pool = gap_diagnosis.PositionPool(capacity=10, images=5)
    images = _Images(count=5, side=4)
    memories = gap_diagnosis.normal_memories(identity, images, [5, 12], 2, seed=0, pools={((), 1, True): pool})
    assert pool.vectors().shape == (10, 2)  # the package memory's candidates come from the same pass
    alone = gap_diagnosis.normal_memories(identity, _Images(count=5, side=4), [12], batch_size=2, seed=0)
    assert torch.equal(memories[12], alone[12])  # a size draws the same vectors whichever sizes share the pass
    memory = memories[12]
    assert memory.shape == (12, 2)
    pairs = {tuple(row) for row in memory.int().tolist()}
    assert len(pairs) == 12  # no position twice
    per_image = [sum(1 for image, _ in pairs if image == index) for index in range(5)]
    assert max(per_image) <= math.ceil(12 / 5)  # at most ceil(M / images) from any one image
    assert all(0 <= position < 16 for _, position in pairs)


def test_auroc_table_scores_each_defect_type_against_all_good_images() -> None:
    labels = np.array([False, False, True, True, True, True])
    types = ["good", "good", "crack", "crack", "stain", "stain"]
    # Good images score 1 and 3; cracks 4 and 5 (both above every good: 1.0); stains 0 and 2 (one pair of four: 0.25).
    scores = {gap_diagnosis.FCDD: gap_diagnosis.Scores(image=[1, 3, 4, 5, 0, 2])}
    masks = np.zeros((6, 2, 2), dtype=bool)
    masks[2:, 0, 0] = True
    scores[gap_diagnosis.FCDD].maps = [np.where(masks, 1.0, 0.0)]  # a perfect pixel ranking
    scores["memory of 3"] = gap_diagnosis.Scores(image=[0, 0, 1, 1, 1, 1], maps=[np.zeros((6, 2, 2))])
    overall, per_type = gap_diagnosis.auroc_table(scores, masks, labels, types, stored={"memory of 3": 3 * 8})
    assert per_type[0] == "| scorer | crack | stain |"
    assert per_type[2] == f"| {gap_diagnosis.FCDD} | 1.000 | 0.250 |"
    # Image AUROC over all: of 8 (good, defective) pairs, the defective one is higher in 5 (4, 5 twice; 2 > 1).
    assert overall[0] == f"| {gap_diagnosis.FCDD} | – | {5 / 8:.3f} | 1.000 |"
    # The memory row: 24 stored values, every defective image above every good one, a constant map (AUROC 0.5).
    assert overall[1] == f"| memory of 3 | 24 ({24 * 2 / 2**20:.2f} MB FP16) | 1.000 | 0.500 |"
    assert per_type[3] == "| memory of 3 | 1.000 | 1.000 |"


def test_gap_diagnosis_names_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "gap.md"
    assert gap_diagnosis.main(["--mvtec-root", str(tmp_path / "nowhere"), "--output", str(output)]) == 2
    assert "--mvtec-root" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize(
    "spec", ["2000", "2000x", "0x64", "ax64", "2000x64x2", "1x2x3x4", "2000x64:some", "2000x64x3:all:all"]
)
def test_gap_diagnosis_refuses_malformed_pca_memories(spec: str) -> None:
    with pytest.raises(SystemExit):
        gap_diagnosis.parse_args(["--pca-memories", spec])


@pytest.mark.slow
def test_gap_diagnosis_reports_every_scorer(synthetic_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "gap.md"
    arguments = ["--mvtec-root", str(synthetic_root), "--category", "synthetic", "--epochs", "1"]
    arguments += ["--passes-per-epoch", "1", "--memory-sizes", "40,160", "--work-dir", str(tmp_path / "w")]
    arguments += ["--pca-memories", "50x8,50x8x3:all"]
    assert gap_diagnosis.main([*arguments, "--coreset-fraction", "0.01", "--output", str(output)]) == 0
    starts = ("| FCDD", "| memory", "| coreset", "| PCA")
    rows = [line.split("|") for line in output.read_text().splitlines() if line.startswith(starts)]
    # 16 training images, resized to the model's 224 px, give a 28 x 28 grid each: 12,544 positions, 1 % is 125.
    names = ["memory of 40", "memory of 160", "PCA memory 50 x 8, channels [(0, 40), (120, 232)]"]
    names += ["PCA memory 50 x 8, 3 x 3 mean, every channel"]
    names = [gap_diagnosis.FCDD, *names]
    assert [row[1].strip() for row in rows[:6]] == [*names, "coreset of 125"]
    assert rows[1][2].strip().startswith("9,280")  # 40 vectors x 232 channels
    assert rows[3][2].strip().startswith("1,768")  # 50 x 8 vectors, the 152 x 8 basis and the 152-long mean
    assert rows[4][2].strip().startswith("2,488")  # every channel: the 232 x 8 basis and the 232-long mean
    assert all(0.0 <= float(row[3]) <= 1.0 and 0.0 <= float(row[4]) <= 1.0 for row in rows[:6])


def test_gap_diagnosis_reads_pca_memory_items() -> None:
    args = gap_diagnosis.parse_args(["--pca-memories", "2000x96x3,1000x32:all,500x8x3:nopad:all,500x8:nopad"])
    assert args.pca_memories == [
        (2000, 96, 3, False, True),
        (1000, 32, 1, True, True),
        (500, 8, 3, True, False),
        (500, 8, 1, False, False),
    ]
    channels = ((0, 40), (120, 232))
    assert gap_diagnosis.reading(args.pca_memories[0], channels) == (channels, 3, True)
    assert gap_diagnosis.reading(args.pca_memories[1], channels) == ((), 1, True)
    assert gap_diagnosis.reading(args.pca_memories[2], channels) == ((), 3, False)
    assert gap_diagnosis.reading(args.pca_memories[3], channels) == (channels, 1, True)  # no means: no border
    assert args.pca_memories[2].label(channels) == "500 x 8, 3 x 3 mean without zeros, every channel"


def test_memory_readings_scores_every_reading_and_draw(synthetic_root: Path, tmp_path: Path) -> None:
    from benchmarks import memory_readings

    output = tmp_path / "readings.md"
    arguments = ["--mvtec-root", str(synthetic_root), "--category", "synthetic", "--output", str(output)]
    arguments += ["--readings", "40x8:all,40x8x3,40x8x3:nopad", "--pool-seeds", "0,1"]
    assert memory_readings.main(arguments) == 0
    rows = [line.split("|") for line in output.read_text().splitlines() if line.startswith("| 40 x 8")]
    assert [row[1].strip() for row in rows] == [
        "40 x 8, every channel",
        "40 x 8, 3 x 3 mean, channels [(0, 40), (120, 232)]",
        "40 x 8, 3 x 3 mean without zeros, channels [(0, 40), (120, 232)]",
    ]
    for row in rows:
        draws = [float(cell) for cell in row[2:4]]
        assert all(0.0 <= value <= 1.0 for value in draws)
        assert float(row[4]) == pytest.approx(np.mean(draws), abs=1e-3)  # the mean of the shown draws
        assert float(row[5]) == pytest.approx(max(draws) - min(draws), abs=1e-3)


def test_memory_readings_decodes_images_of_any_size_straight_to_the_input_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # anomalib's collate would resize a batch's images to the largest among them before the model resizes them
    from benchmarks import memory_readings
    from PIL import Image
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    from anomalib_fcdd.data import make_synthetic_mvtec
    from anomalib_fcdd.data.decode import decode_image_tensor

    make_synthetic_mvtec(tmp_path, "sizes", n_train=4, n_test_good=2, n_test_defect=2, size=128, seed=0)
    odd = sorted((tmp_path / "sizes" / "train" / "good").glob("*.png"))[1]
    with Image.open(odd) as image:
        image.resize((96, 160)).save(odd)
    seen = {}
    original = memory_readings.build_memories

    def recording(model: object, dataset: object, *args: object) -> object:
        seen.update({str(dataset[i].image_path): dataset[i].image for i in range(len(dataset))})
        return original(model, dataset, *args)

    monkeypatch.setattr(memory_readings, "build_memories", recording)
    arguments = ["--mvtec-root", str(tmp_path), "--category", "sizes", "--output", str(tmp_path / "readings.md")]
    assert memory_readings.main([*arguments, "--readings", "20x4x3", "--pool-seeds", "0"]) == 0
    assert {tuple(image.shape) for image in seen.values()} == {(3, 224, 224)}
    expected = resize(decode_image_tensor(odd), [224, 224], InterpolationMode.NEAREST)
    torch.testing.assert_close(seen[str(odd)], expected)


def test_memory_readings_names_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import memory_readings

    output = tmp_path / "readings.md"
    assert memory_readings.main(["--mvtec-root", str(tmp_path / "nowhere"), "--output", str(output)]) == 2
    assert "--mvtec-root" in capsys.readouterr().err and not output.exists()
    with pytest.raises(SystemExit):
        memory_readings.parse_args(["--pool-seeds", "a"])
