"""One way to turn an image file into pixels, shared by the dataset check, the datamodules and ``predict-openvino``.

anomalib reads images with ``PIL.Image.open(path).convert("RGB")``. That is right for 8-bit images but clips 16-bit
ones (a 16-bit PNG opens as ``I;16``/``I``; every value above 255 becomes 255, so a typical scan turns white) and
ignores a camera's EXIF orientation, while ``predict-openvino`` handled both: training and deployment saw different
images. Here every file goes through :func:`decode_rgb`:

* the EXIF orientation is applied first (images arrive upright, as every viewer shows them; masks likewise);
* 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, and ``LA``/``PA``/``RGBA`` with alpha dropped, as
  anomalib does) are converted to RGB by PIL and divided by 255;
* 16-bit grayscale (``I;16*``, and ``I`` when every value lies in [0, 65535], which is how PIL opens 16-bit PNGs and
  TIFFs) is divided by 65535 and repeated over three channels -- one scale for the mode, never a per-image guess;
* float images (``F``) are used as they are when every value lies in [0, 1];
* anything else (32-bit integers beyond 16 bits, floats outside [0, 1], unknown modes) is refused with an
  :class:`ImageDecodeError` naming the file, by the dataset check before training and by ``predict-openvino``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError

#: Suffixes read as images (case-insensitive): the formats PIL decodes and cameras and scanners write.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "F"}) | SIXTEEN_BIT_MODES
#: EXIF orientations (tag 274) that turn the picture by 90 degrees, so width and height swap.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 274
_RESAVE = "Save it as an 8- or 16-bit PNG (grayscale or RGB)."
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageDecodeError(DatasetError):
    """A file is not an image, is corrupt, or holds pixels that cannot be mapped to [0, 1] unambiguously.

    The message is ``"<path> is <reason>. <fix>"``; ``reason`` alone is what ``predict-openvino`` records for a
    skipped file.
    """

    def __init__(self, path: Path, reason: str, fix: str = "Remove or replace this file.") -> None:
        super().__init__(f"{path} is {reason}. {fix}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What the dataset check needs to know about an image: its PIL mode and upright ``(width, height)``."""

    mode: str
    size: tuple[int, int]

    @property
    def grayscale(self) -> bool:
        """Whether the file stores one channel (it is still decoded to RGB)."""
        return self.mode in GRAYSCALE_MODES


def inspect_image(path: Path | str) -> ImageInfo:
    """Mode and upright size of ``path``, after checking that the whole file decodes the way :func:`decode_rgb` will.

    PNGs are verified through their checksums (fast); other formats and high-bit-depth images are decoded fully, since
    PIL's ``verify`` does not read JPEG data and the value range of ``I``/``F`` images is only known from the pixels.

    Raises:
        ImageDecodeError: naming the file and what to do.
    """
    path = Path(path)
    with _opened(path) as image:
        mode, (width, height), png = image.mode, image.size, image.format == "PNG"
        _check_mode(path, mode)
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except ImageDecodeError:
            raise
        except _DECODE_ERRORS as error:
            raise _unreadable(path, error) from error
    with _opened(path) as image:  # PIL's verify must come straight after open
        try:
            if png and mode in EIGHT_BIT_MODES:
                image.verify()
            else:
                _pixels(path, image)
        except ImageDecodeError:
            raise
        except _DECODE_ERRORS as error:
            raise _unreadable(path, error) from error
    return ImageInfo(mode=mode, size=_upright(width, height, orientation))


def upright_size(path: Path | str) -> tuple[int, int]:
    """Upright ``(width, height)`` of ``path`` from its header and EXIF orientation alone (no pixel is decoded).

    Raises:
        ImageDecodeError: the file is not a readable image.
    """
    path = Path(path)
    with _opened(path) as image:
        try:
            return _upright(*image.size, image.getexif().get(_EXIF_ORIENTATION, 1))
        except _DECODE_ERRORS as error:
            raise _unreadable(path, error) from error


def _upright(width: int, height: int, orientation: int) -> tuple[int, int]:
    """``(width, height)`` as a viewer shows the picture: swapped for the EXIF orientations that turn it by 90 deg."""
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def decode_rgb(path: Path | str) -> np.ndarray:
    """``H x W x 3`` float32 RGB in [0, 1], upright, decoded by the rules of this module.

    Raises:
        ImageDecodeError: the file is not an image, is corrupt, or its mode or value range is not supported.
    """
    return decode_rgb_and_mode(path)[0]


def decode_rgb_and_mode(path: Path | str) -> tuple[np.ndarray, str]:
    """:func:`decode_rgb` and the file's PIL mode (what ``predict-openvino`` reports as converted from)."""
    path = Path(path)
    with _opened(path) as image:
        _check_mode(path, image.mode)
        try:
            upright = ImageOps.exif_transpose(image)
            return _pixels(path, upright), image.mode
        except ImageDecodeError:
            raise
        except _DECODE_ERRORS as error:
            raise _unreadable(path, error) from error


def decode_image_tensor(path: Path | str) -> torch.Tensor:
    """:func:`decode_rgb` as a ``3 x H x W`` float32 tensor, the layout anomalib's datasets produce."""
    return torch.from_numpy(np.ascontiguousarray(decode_rgb(path).transpose(2, 0, 1)))


def decode_mask(path: Path | str) -> torch.Tensor:
    """``H x W`` boolean mask, upright: a pixel is anomalous where the file's value is not zero (as anomalib reads)."""
    path = Path(path)
    with _opened(path) as image:
        try:
            upright = ImageOps.exif_transpose(image)
            if upright.mode in EIGHT_BIT_MODES:
                upright = upright.convert("L")
            return torch.from_numpy(np.asarray(upright) != 0)
        except ImageDecodeError:
            raise
        except _DECODE_ERRORS as error:
            raise _unreadable(path, error) from error


def _opened(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except UnidentifiedImageError as error:
        raise ImageDecodeError(path, "not a readable image (not an image file: format not recognised)") from error
    except _DECODE_ERRORS as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: BaseException) -> ImageDecodeError:
    return ImageDecodeError(path, f"not a readable image, corrupt or truncated ({type(error).__name__}: {error})")


def _check_mode(path: Path, mode: str) -> None:
    if mode not in EIGHT_BIT_MODES | SIXTEEN_BIT_MODES | {"I", "F"}:
        raise ImageDecodeError(path, f"in pixel mode {mode!r}, which has no unambiguous RGB reading", _RESAVE)


def _pixels(path: Path, image: Image.Image) -> np.ndarray:
    """Decode ``image`` (already upright) into ``H x W x 3`` float32 in [0, 1]."""
    if image.mode in EIGHT_BIT_MODES:
        with warnings.catch_warnings():  # palette images with transparency: the alpha is dropped, as documented
            warnings.simplefilter("ignore", UserWarning)
            rgb = image.convert("RGB")
        return np.asarray(rgb, dtype=np.float32) / np.float32(255)
    values = np.asarray(image)
    if image.mode == "F":
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1 or not np.isfinite(values).all():
            raise ImageDecodeError(path, f"a float image with values in [{low:g}, {high:g}], not [0, 1]", _RESAVE)
        gray = values.astype(np.float32)
    else:  # 16-bit grayscale, or PIL's 32-bit "I" holding 16-bit data
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageDecodeError(
                path, f"a 32-bit integer image with values in [{low}, {high}], beyond 16 bits", _RESAVE
            )
        gray = values.astype(np.float32) / np.float32(65535)
    return np.repeat(gray[..., None], 3, axis=2)
