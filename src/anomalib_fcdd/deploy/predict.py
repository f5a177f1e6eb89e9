"""``anomalib-fcdd predict-openvino``: score images with an exported model, no checkpoint or training code needed.

Usage::

    anomalib-fcdd predict-openvino --model-dir exports/openvino_fp32 --input images/ --output predictions/

The model folder needs only the exported files (``model.xml`` + ``model.bin``, or ``model.onnx``); everything from the
raw image to the thresholded result runs inside the graph through anomalib's ``OpenVINOInferencer``. Written to
``--output``:

* ``predictions.csv``: one row per scored image (score, predicted label, overlay file, original size and mode);
* ``skipped.csv``: every input that could not be scored (not an image, corrupt), with the reason;
* ``overlays/<stem>_overlay.png``: the image with the anomaly heatmap blended in and the predicted mask outlined.

Inputs may be a file, a folder (searched recursively) or a glob, in any number. Images of any size are accepted and
decoded exactly as training and testing decode them (:mod:`anomalib_fcdd.data.decode`): turned upright by their EXIF
orientation; grayscale, palette and RGBA images converted to RGB, 16-bit images scaled by 65535 (noted in the log and
the CSV); images with no unambiguous RGB reading skipped with the reason. Unreadable files are named and
skipped without stopping the batch. OpenVINO's CPU plugin runs in bf16 on CPUs that support it, which moves scores by a
few per cent; ``--precision f32`` (the default) keeps the exported model's exact results.

Compiled models are cached in ``$XDG_CACHE_HOME/anomalib-fcdd/openvino`` (``~/.cache/...``), so the next run starts
faster, instead of the ``./openvino_cache`` that anomalib's inferencer leaves in the working directory;
``--cache-dir DIR`` puts the cache elsewhere and ``--cache-dir none`` turns it off.
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ..errors import UserInputError
from .runtime import output_names, with_fixed_batch

logger = logging.getLogger(__name__)

#: ``--precision`` value -> OpenVINO compile config (``auto`` = the device's default, bf16 on AMX/avx512_bf16 CPUs).
PRECISION_CONFIG: dict[str, dict[str, str] | None] = {
    "f32": {"INFERENCE_PRECISION_HINT": "f32"},
    "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
    "f16": {"INFERENCE_PRECISION_HINT": "f16"},
    "auto": None,
}
MODEL_FILE_ORDER = ("model.xml", "*.xml", "model.onnx", "*.onnx")
PREDICTION_FIELDS = ("image", "pred_score", "pred_label", "label", "overlay", "width", "height", "source_mode")
OVERLAY_ALPHA = 0.5


class PredictError(UserInputError, RuntimeError):
    """The command cannot run at all (no model, no inputs, no writable output); the message says what to fix."""


def check_output(output: Path) -> None:
    """Refuse an ``output`` that is a file or lies under one, without creating anything."""
    if output.exists() and not output.is_dir():
        raise PredictError(f"--output {output} is a file; give a folder (it is created if missing).")
    existing = next((parent for parent in output.absolute().parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise PredictError(f"--output {output} cannot be written ({existing} is a file); give a folder.")


def prepare_output(output: Path) -> None:
    """Create ``output``/overlays before the first image, so an unwritable place is one error before any work."""
    check_output(output)
    try:
        (output / "overlays").mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PredictError(
            f"--output {output} cannot be written ({error.strerror}: {error.filename}); give a folder you can write to."
        ) from error


@dataclass
class LoadedImage:
    """An input converted to what the exported graph expects: ``H x W x 3`` float32 RGB in [0, 1]."""

    array: np.ndarray
    source_mode: str
    note: str | None = None


@dataclass
class Prediction:
    """Result for one image."""

    image: Path
    pred_score: float
    pred_label: int
    overlay: Path | None  # None when the overlay could not be written (the score still counts)
    width: int
    height: int
    source_mode: str


@dataclass
class PredictionSummary:
    """Outcome of a run: the scored images and the skipped files with reasons."""

    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_ok(self) -> int:
        """Number of scored images."""
        return len(self.predictions)

    @property
    def n_skipped(self) -> int:
        """Number of inputs that could not be scored."""
        return len(self.skipped)


# ---------------------------------------------------------------------------------------------------------------------
# Model and inputs
# ---------------------------------------------------------------------------------------------------------------------
def find_model_file(model_dir: Path | str) -> Path:
    """The model in ``model_dir``: ``model.xml``, else any ``.xml``, else ``.onnx``; a file path is kept as is."""
    location = Path(model_dir)
    if location.is_file():
        return location
    if not location.is_dir():
        raise PredictError(f"Model folder {location} does not exist.")
    for pattern in MODEL_FILE_ORDER:
        matches = sorted(location.glob(pattern))
        if matches:
            if matches[0].suffix == ".xml" and not matches[0].with_suffix(".bin").is_file():
                raise PredictError(f"{matches[0]} has no {matches[0].with_suffix('.bin').name} next to it.")
            return matches[0]
    found = sorted(p.name for p in location.iterdir())
    raise PredictError(
        f"No exported model in {location}: expected model.xml + model.bin (OpenVINO) or model.onnx; found {found}. "
        "Export one with `anomalib-fcdd export --model fcdd_hsc --ckpt_path <ckpt> --export_type openvino`."
    )


def collect_inputs(specs: Iterable[str], exclude: Path | None = None) -> list[Path]:
    """Files named by ``specs``: files, folders (recursive, hidden entries skipped) and glob patterns, de-duplicated.

    Every regular file is returned, images or not, so that non-image files are reported rather than silently dropped.
    Files under ``exclude`` (the output folder) are left out, so rerunning into an input folder does not rescore
    overlays.
    """
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        else:
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            if not matches:
                raise PredictError(f"Input {spec!r} is neither a file, a folder nor a glob matching any file.")
            files += [m for m in matches if m.is_file()]
    excluded = exclude.resolve() if exclude is not None else None
    unique: dict[Path, Path] = {}
    for file in files:
        resolved = file.resolve()
        if excluded is not None and resolved.is_relative_to(excluded):
            continue
        unique.setdefault(resolved, file)
    return list(unique.values())


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def load_image(path: Path) -> LoadedImage:
    """Decode ``path`` exactly as training and testing do (:func:`anomalib_fcdd.data.decode.decode_rgb`).

    Raises:
        ValueError: the file is not an image, is corrupt/truncated, or has pixels with no unambiguous RGB reading
            (the message says which).
    """
    from anomalib_fcdd.data.decode import ImageDecodeError, decode_rgb_and_mode

    try:
        array, mode = decode_rgb_and_mode(path)
    except ImageDecodeError as error:
        raise ValueError(error.reason) from error
    note = None if mode == "RGB" else f"converted from {mode} to RGB"
    return LoadedImage(array=array, source_mode=mode, note=note)


def static_input_size(inferencer: Any) -> tuple[int, int] | None:
    """``(H, W)`` if the model was exported with a fixed input size, else ``None`` (resize happens in the graph)."""
    shape = inferencer.model.input(0).get_partial_shape()
    if shape.rank.is_static and len(shape) == 4 and shape[2].is_static and shape[3].is_static:
        return int(shape[2].get_length()), int(shape[3].get_length())
    return None


def fit_to_input(array: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize (bilinear) to a fixed-size model's input; dynamic models get the image unchanged."""
    if size is None or array.shape[:2] == size:
        return array
    image = Image.fromarray((array * 255).round().astype(np.uint8))
    resized = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------------------------------
def jet(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] values to ``... x 3`` uint8 colours (the classic blue-cyan-yellow-red ramp)."""
    v = np.clip(values, 0, 1)[..., None]
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([red, green, blue], axis=-1) * 255).astype(np.uint8)


def make_overlay(image: np.ndarray, anomaly_map: np.ndarray, pred_mask: np.ndarray | None) -> Image.Image:
    """Blend the heatmap into the original-size image and outline the predicted mask in white."""
    height, width = image.shape[:2]
    heat = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32).squeeze())  # mode F
    heat = np.asarray(heat.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    blended = (1 - OVERLAY_ALPHA) * image * 255 + OVERLAY_ALPHA * jet(heat).astype(np.float32)
    result = np.clip(blended, 0, 255).astype(np.uint8)
    if pred_mask is not None:
        mask = Image.fromarray(np.asarray(pred_mask).squeeze().astype(np.uint8) * 255)
        mask = mask.resize((width, height), Image.Resampling.NEAREST)
        thickness = max(3, 2 * (min(width, height) // 300) + 1)
        inner = mask.filter(ImageFilter.MinFilter(thickness))
        edge = (np.asarray(mask) > 0) & ~(np.asarray(inner) > 0)
        result[edge] = 255
    return Image.fromarray(result)


#: Longest stem kept in an overlay's name: file systems allow 255 bytes, and the suffix adds up to about 20.
MAX_OVERLAY_STEM_BYTES = 200


def _overlay_path(folder: Path, source: Path, taken: set[str]) -> Path:
    """``<stem>_overlay.png``, with a counter when two inputs share a stem; over-long stems are shortened."""
    stem = source.stem.encode()[:MAX_OVERLAY_STEM_BYTES].decode(errors="ignore")
    name, counter = f"{stem}_overlay.png", 1
    while name in taken:
        name, counter = f"{stem}_{counter}_overlay.png", counter + 1
    taken.add(name)
    return folder / name


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Where compiled models are cached: ``$XDG_CACHE_HOME/anomalib-fcdd/openvino``, else ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "anomalib-fcdd" / "openvino"


def load_inferencer(
    model_file: Path, device: str = "CPU", precision: str = "f32", cache_dir: Path | None = None
) -> Any:
    """anomalib's ``OpenVINOInferencer`` for ``model_file`` (``.xml`` or ``.onnx``) at the requested precision.

    Compiled models are cached in ``cache_dir`` (``None``: no cache), not in anomalib's ``./openvino_cache``.
    """
    from anomalib.deploy import OpenVINOInferencer

    if precision not in PRECISION_CONFIG:
        raise PredictError(f"Unknown precision {precision!r}; choose from {sorted(PRECISION_CONFIG)}.")
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            logger.info("No compiled-model cache: %s cannot be created (%s).", cache_dir, error)
            cache_dir = None

    class CachingInferencer(OpenVINOInferencer):
        """anomalib's inferencer, compiling with this run's cache folder (anomalib's hard-codes one in the cwd)."""

        def load_model(self, path: str | Path | tuple[bytes, bytes]) -> tuple[Any, Any, Any]:
            import openvino as ov

            path = Path(path) if not isinstance(path, tuple) else path
            if isinstance(path, tuple) or path.suffix not in {".xml", ".onnx"}:
                raise PredictError(f"Expected a .xml or .onnx model file, got {path}.")
            core = ov.Core()
            model = core.read_model(path, path.with_suffix(".bin")) if path.suffix == ".xml" else core.read_model(path)
            self.output_names = output_names(model)
            with_fixed_batch(model, 1)  # images are scored one at a time; a fixed batch runs 1.6-1.9x as fast on CPU
            config = dict(self.config or {})
            if cache_dir is not None:
                config["CACHE_DIR"] = str(cache_dir)
            compiled = core.compile_model(model=model, device_name=self.device, config=config)
            return compiled.input(0), compiled.output(0), compiled

        def post_process(self, predictions: Any) -> dict:  # type: ignore[override]
            """Outputs by their exported names (anomalib takes any name of each, fused tensors' included)."""
            return dict(zip(self.output_names, predictions.to_tuple(), strict=True))

    return CachingInferencer(path=model_file, device=device, config=PRECISION_CONFIG[precision])


def predict_one(inferencer: Any, path: Path, overlay: Path, input_size: tuple[int, int] | None) -> Prediction:
    """Score one file and write its overlay; raises ``ValueError`` for unreadable files.

    An overlay that cannot be written (a full disk, say) is logged and left out; the score is kept.
    """
    loaded = load_image(path)
    if loaded.note:
        logger.info("%s: %s", path, loaded.note)
    try:
        result = inferencer.predict(fit_to_input(loaded.array, input_size))
    except RuntimeError as error:
        raise ValueError(f"inference failed ({error})") from error
    score = float(np.asarray(result.pred_score).reshape(-1)[0])
    label = int(np.asarray(result.pred_label).reshape(-1)[0]) if result.pred_label is not None else int(score >= 0.5)
    written: Path | None = overlay
    try:
        make_overlay(loaded.array, result.anomaly_map, result.pred_mask).save(overlay)
    except OSError as error:  # disk full, permissions, ...: keep the score, say what is missing
        logger.warning("%s: scored, but its overlay %s could not be written (%s)", path, overlay, error)
        with suppress(OSError):  # a half-written file
            overlay.unlink(missing_ok=True)
        written = None
    height, width = loaded.array.shape[:2]
    return Prediction(path, score, label, written, width, height, loaded.source_mode)


def predict_files(
    inferencer: Any, files: Sequence[Path], output: Path, show_progress: bool = True, console: Any = None
) -> PredictionSummary:
    """Score ``files``, write overlays and both CSVs into ``output``; unreadable files are skipped and recorded."""
    overlays = output / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    input_size = static_input_size(inferencer)
    if input_size is not None:
        logger.info("The model has a fixed %dx%d input: images are resized to it before inference.", *input_size)
    summary, taken, start = PredictionSummary(), set(), time.perf_counter()
    try:
        for path in _progress(files, enabled=show_progress and len(files) > 1, console=console):
            try:
                overlay = _overlay_path(overlays, path, taken)
                summary.predictions.append(predict_one(inferencer, path, overlay, input_size))
            except ValueError as error:  # unreadable input
                logger.warning("Skipped %s: %s", path, error)
                summary.skipped.append((path, str(error)))
    finally:  # whatever stops the loop (Ctrl-C included), the images scored so far reach the CSVs
        summary.seconds = time.perf_counter() - start
        write_csvs(output, summary)
    return summary


def write_csvs(output: Path, summary: PredictionSummary) -> None:
    """``predictions.csv`` (one row per scored image) and ``skipped.csv`` (file, reason)."""
    with (output / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_FIELDS)
        for p in summary.predictions:
            label = "anomalous" if p.pred_label else "normal"
            overlay = "" if p.overlay is None else p.overlay.relative_to(output)
            writer.writerow(
                [p.image, f"{p.pred_score:.6f}", p.pred_label, label, overlay, p.width, p.height, p.source_mode]
            )
    with (output / "skipped.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("file", "reason"))
        writer.writerows((str(path), reason) for path, reason in summary.skipped)


def format_summary(summary: PredictionSummary, output: Path) -> str:
    """Human-readable end-of-run summary naming every skipped file."""
    anomalous = sum(p.pred_label for p in summary.predictions)
    lines = [
        f"{summary.n_ok} ok ({anomalous} anomalous, {summary.n_ok - anomalous} normal), {summary.n_skipped} skipped "
        f"in {summary.seconds:.1f} s. Results: {output / 'predictions.csv'}, overlays in {output / 'overlays'}"
    ]
    lines += [f"  skipped {path}: {reason}" for path, reason in summary.skipped]
    return "\n".join(lines)


def _rich_console() -> Any:
    """A rich console on stderr (log lines then print cleanly above the progress bar), or None without rich."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=True)


@contextmanager
def _console_logging(console: Any) -> Iterator[None]:
    """Show this module's INFO messages on stderr for the duration of a command-line run."""
    if console is not None:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_time=False, show_path=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _progress(items: Sequence[Path], enabled: bool, console: Any = None) -> Iterable[Path]:
    """Wrap ``items`` in a rich (or, without rich, tqdm) progress bar when enabled."""
    if not enabled:
        return items
    console = console if console is not None else _rich_console()
    if console is not None:
        from rich.progress import track

        return track(items, description="Scoring", console=console, transient=False)
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="Scoring", unit="img")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``predict-openvino``."""
    parser = argparse.ArgumentParser(
        prog="anomalib-fcdd predict-openvino",
        description="Score images with an exported FCDD (or any anomalib) model through OpenVINO.",
    )
    parser.add_argument("--model-dir", required=True, help="folder with model.xml + model.bin or model.onnx")
    parser.add_argument("--input", required=True, nargs="+", help="image file(s), folder(s) or glob pattern(s)")
    parser.add_argument("--output", required=True, help="folder for predictions.csv, skipped.csv and overlays/")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (CPU, GPU, NPU, AUTO); default CPU")
    parser.add_argument(
        "--precision",
        default="f32",
        choices=sorted(PRECISION_CONFIG),
        help="inference precision hint; f32 (default) reproduces the exported model, auto = device default",
    )
    parser.add_argument(
        "--cache-dir",
        default=str(default_cache_dir()),
        help="folder for OpenVINO's compiled-model cache (default: %(default)s); 'none' for no cache",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``predict-openvino``; returns 0 if at least one image was scored, 1 if none, 2 on a usage error."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    output = Path(args.output)
    console = _rich_console()
    with _console_logging(console):
        try:
            check_output(output)
            model_file = find_model_file(args.model_dir)
            files = collect_inputs(args.input, exclude=output)
            if not files:
                raise PredictError(f"No files found in {args.input}.")
            prepare_output(output)  # after the checks above, so a run that cannot start creates no folder
            cache_dir = None if args.cache_dir.lower() == "none" else Path(args.cache_dir)
            inferencer = load_inferencer(model_file, args.device, args.precision, cache_dir)
        except PredictError as error:
            logger.error("%s", error)
            return 2
        logger.info("Model %s on %s (%s); %d input file(s).", model_file, args.device, args.precision, len(files))
        summary = predict_files(inferencer, files, output, show_progress=not args.no_progress, console=console)
    print(format_summary(summary, output))
    return 0 if summary.n_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
