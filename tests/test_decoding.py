"""Every image mode decodes to the same [0, 1] RGB pixels in training/testing and in ``predict-openvino``.

Each case writes a tiny file with hand-chosen values and states the expected RGB floats by hand; the pixels are then
read through the ``Folder`` and ``MVTec`` datamodules (what training and testing see) and through
``predict-openvino``'s loader. 16-bit, 32-bit-integer and EXIF-rotated files fail without the shared decoder
(anomalib clips values above 255 and ignores EXIF); the 8-bit modes guard that the shared decoder keeps their
meaning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_fcdd.data import DatasetError, Folder, MVTec, inspect_image
from anomalib_fcdd.deploy import predict as predict_module

Writer = Callable[[Path], None]


def _uint16(path: Path) -> None:
    Image.fromarray(np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)).save(path)  # PIL reads I;16


def _int32(path: Path) -> None:
    Image.fromarray(np.array([[0, 1000], [32768, 65535]], dtype=np.int32)).save(path)  # TIFF, PIL reads I


def _palette(path: Path) -> None:
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 9))
    image.save(path)


def _gray(path: Path) -> None:
    Image.fromarray(np.array([[0, 51], [102, 255]], dtype=np.uint8), mode="L").save(path)


def _rgba(path: Path) -> None:
    pixels = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]], [[255, 0, 0, 128], [0, 0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(pixels, mode="RGBA").save(path)


def _float(path: Path) -> None:
    Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)).save(path)


def _gray3(values: list[list[float]]) -> np.ndarray:
    return np.repeat(np.array(values, dtype=np.float32)[..., None], 3, axis=2)


CASES: dict[str, tuple[str, Writer, np.ndarray]] = {
    "16-bit PNG (I;16)": (".png", _uint16, _gray3([[0, 1000 / 65535], [32768 / 65535, 1]])),
    "32-bit TIFF holding 16-bit values (I)": (".tif", _int32, _gray3([[0, 1000 / 65535], [32768 / 65535, 1]])),
    "palette (P)": (".png", _palette, np.array([[[1, 0, 0], [0, 0, 1]], [[10 / 255, 20 / 255, 30 / 255], [0, 0, 1]]])),
    "grayscale (L)": (".png", _gray, _gray3([[0, 0.2], [0.4, 1]])),
    "RGBA, alpha dropped": (".png", _rgba, np.array([[[10, 20, 30], [40, 50, 60]], [[255, 0, 0], [0, 0, 0]]]) / 255),
    "float in [0, 1] (F)": (".tif", _float, _gray3([[0, 0.25], [0.5, 1]])),
}


def _decoded_by_datamodules(path: Path) -> list[np.ndarray]:
    """The training images as the Folder datamodule (and, for PNGs, the MVTec datamodule) serve them."""
    results = []
    folder = Folder(
        root=path.parent, normal_dir=".", num_workers=0, validate=False, test_split_mode="none", val_split_mode="none"
    )
    folder.setup()
    results.append(folder.train_data[0].image.permute(1, 2, 0).numpy())
    if path.suffix == ".png":
        category = path.parent / "mvtec" / "cat"
        for split in ("train/good", "test/good"):
            (category / split).mkdir(parents=True)
            (category / split / path.name).write_bytes(path.read_bytes())
        mvtec = MVTec(root=path.parent / "mvtec", category="cat", num_workers=0, validate=False, val_split_mode="none")
        mvtec.setup()
        results.append(mvtec.train_data[0].image.permute(1, 2, 0).numpy())
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_each_mode_decodes_to_the_same_pixels_in_training_and_prediction(tmp_path: Path, case: str) -> None:
    suffix, write, expected = CASES[case]
    path = tmp_path / "data" / f"image{suffix}"
    path.parent.mkdir()
    write(path)
    for decoded in [*_decoded_by_datamodules(path), predict_module.load_image(path).array]:
        assert decoded.shape == expected.shape
        np.testing.assert_allclose(decoded, expected, atol=1e-6)


def _exif_rotated_jpeg(path: Path) -> None:
    """Stored 32 wide x 16 high, left half black; EXIF orientation 6 shows it 16 wide x 32 high, top half black."""
    stored = np.full((16, 32), 255, dtype=np.uint8)
    stored[:, :16] = 0
    exif = Image.Exif()
    exif[274] = 6
    Image.fromarray(stored, mode="L").save(path, quality=95, exif=exif.tobytes())


def test_exif_rotated_jpeg_is_upright_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "data" / "photo.jpg"
    path.parent.mkdir()
    _exif_rotated_jpeg(path)
    assert inspect_image(path).size == (16, 32), "the dataset check compares masks with the upright size"
    for decoded in [*_decoded_by_datamodules(path), predict_module.load_image(path).array]:
        assert decoded.shape == (32, 16, 3)
        assert decoded[2:14].max() < 0.05 and decoded[18:30].min() > 0.95  # away from JPEG ringing at the edge


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        (
            "wide.tif",
            np.array([[0, 70000]], dtype=np.int32),
            r"a 32-bit integer image with values in \[0, 70000\], beyond 16 bits",
        ),
        (
            "bright.tif",
            np.array([[0.0, 2.0]], dtype=np.float32),
            r"a float image with values in \[0, 2\], not \[0, 1\]",
        ),
    ],
)
def test_images_without_an_unambiguous_reading_are_refused_by_name(
    tmp_path: Path, name: str, values: np.ndarray, message: str
) -> None:
    path = tmp_path / name
    Image.fromarray(values).save(path)
    with pytest.raises(DatasetError, match=rf"{path} is {message}\. Save it as an 8- or 16-bit PNG"):
        inspect_image(path)
    with pytest.raises(ValueError, match=message):
        predict_module.load_image(path)
