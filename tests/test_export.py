"""Export and edge inference: the exported graphs reproduce the eager model, and ``predict-openvino`` works end to end.

A small FCDD is trained once per module (on a downsized subset of MVTec-AD bottle when ``FCDD_MVTEC_ROOT`` holds it,
on generated images otherwise). The parity images are *other* images than the ones the thresholds were fitted on --
real 900 x 900 bottle test images when available -- so no score sits exactly on a threshold, and they are fed at their
original size, so the resize inside the graph is exercised too.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from PIL import Image

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.data import MVTec, make_synthetic_mvtec
from anomalib_fcdd.deploy import VARIANTS, export_all
from anomalib_fcdd.deploy import predict as predict_module
from anomalib_fcdd.models.fcdd.backbones.weights import WeightsError
from anomalib_fcdd.models.fcdd.pre_processing import FcddPreProcessor

warnings.filterwarnings("ignore", category=FutureWarning)
REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def mvtec_root() -> Path:
    """Real MVTec-AD location (``FCDD_MVTEC_ROOT``, default ``../shared/data/mvtec_ad`` next to the repo)."""
    return Path(os.environ.get("FCDD_MVTEC_ROOT", REPO_ROOT.parent / "shared" / "data" / "mvtec_ad"))


def bottle() -> Path | None:
    """The bottle category if it is on this machine."""
    path = mvtec_root() / "bottle"
    return path if (path / "train" / "good").is_dir() and (path / "test").is_dir() else None


# ---------------------------------------------------------------------------------------------------------------------
# Data and a trained model
# ---------------------------------------------------------------------------------------------------------------------
def _copy_resized(source: Path, target: Path, size: int, nearest: bool = False) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
        image.resize((size, size), resample).save(target)


def _bottle_subset(source: Path, root: Path, size: int = 256) -> list[Path]:
    """Downsized MVTec layout (8 train, 3 good + 2 x 2 defective for thresholds); returns 6 other test images."""
    category = root / "bottle"
    for path in sorted((source / "train" / "good").glob("*.png"))[:8]:
        _copy_resized(path, category / "train" / "good" / path.name, size)
    parity: list[Path] = []
    for defect, count in (("good", 3), ("broken_large", 2), ("contamination", 2), ("broken_small", 0)):
        files = sorted((source / "test" / defect).glob("*.png"))
        for path in files[:count]:
            _copy_resized(path, category / "test" / defect / path.name, size)
            if defect != "good":
                mask = source / "ground_truth" / defect / f"{path.stem}_mask.png"
                _copy_resized(mask, category / "ground_truth" / defect / mask.name, size, nearest=True)
        parity += files[-2:] if defect in {"good", "broken_small", "contamination"} else []
    return parity


def _synthetic_subset(root: Path) -> list[Path]:
    """Generated MVTec layout plus 6 parity images from another seed, at a different size."""
    make_synthetic_mvtec(root, "synthetic", n_train=8, n_test_good=3, n_test_defect=4, size=128, seed=0)
    other = make_synthetic_mvtec(root / "parity", "other", n_train=1, n_test_good=3, n_test_defect=3, size=176, seed=1)
    return sorted((other / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A briefly trained FcddHsc with fitted thresholds, its datamodule, checkpoint and parity images."""
    root = tmp_path_factory.mktemp("export_data")
    source = bottle()
    parity = _bottle_subset(source, root) if source else _synthetic_subset(root)
    seed_everything(0, workers=True)
    category = "bottle" if source else "synthetic"
    datamodule = MVTec(root=root, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = FcddHsc(epochs=1, passes_per_epoch=1, lr=0.01)  # the offline ImageNet weights, as users get them
    engine = Engine(
        default_root_dir=tmp_path_factory.mktemp("export_run"),
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=datamodule)
    model.eval()
    checkpoint = engine.trainer.checkpoint_callback.best_model_path
    return {
        "model": model,
        "engine": engine,
        "datamodule": datamodule,
        "ckpt": checkpoint,
        "parity": parity,
        "real_images": source is not None,
    }


#: How closely INT8_PTQ's map must track FP32's (correlation over the pixels of two bottle images). The module's model
#: has the pretrained multi-scale backbone and four heads trained for one pass. Its heads' map tracked at 0.993 (0.997
#: with one head; a random backbone tracks loosely, 0.34-0.78); the default map adds the memory's distances
#: (``fused_map``), which the quantised backbone's features move more: 0.77 and 0.84 measured in the two tests below
#: (calibrated on the training subset and on 8 of its images). A fully trained model keeps its pixel AUROC within
#: 0.8 points of FP32's (``benchmarks/results/export_accuracy.md``). The bound catches a broken quantisation: an
#: unrelated map correlates near 0.
INT8_PTQ_MIN_CORRELATION = 0.6

#: Known limitation (issue 16): INT8_PTQ of the multi-scale backbone tracks FP32 loosely on bottle and flattens the
#: map of the one-pass model trained on generated images.
INT8_PTQ_SYNTHETIC = "INT8_PTQ flattens the multi-scale map of the one-pass model on generated images (issue 16)"


@pytest.fixture(scope="module")
def exported(trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``Engine.export`` to torch, ONNX and OpenVINO with the default (dynamic) input size."""
    engine, model = trained["engine"], trained["model"]
    root = tmp_path_factory.mktemp("engine_export")
    paths = {
        "torch": engine.export(model, "torch", export_root=root),
        "onnx": engine.export(model, "onnx", export_root=root, onnx_kwargs={"opset_version": 18}),
        "openvino": engine.export(model, "openvino", export_root=root, onnx_kwargs={"opset_version": 18}),
    }
    model.eval()
    return {name: Path(path) for name, path in paths.items()}


def load_rgb(path: Path) -> np.ndarray:
    """``H x W x 3`` float32 in [0, 1], as the exported graph expects."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def eager(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """``AnomalibModule.forward``: pre-processor, network, post-processor, in eval mode."""
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        result = model.eval()(batch)
    return {name: value.numpy() for name, value in result._asdict().items() if value is not None}


def run_onnxruntime(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": images.transpose(0, 3, 1, 2).copy()}), strict=True))


def run_openvino(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    compiled = ov.Core().compile_model(str(path), "CPU", F32)
    result = compiled(images.transpose(0, 3, 1, 2).copy())
    return {output.any_name: result[output] for output in compiled.outputs}


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64).reshape(b.shape) - b.astype(np.float64)).max())


def score_tolerance(model: Any) -> float:
    """Allowed difference of normalised image scores: 1e-4, or 1e-5 of the raw scores if that is looser.

    anomalib divides scores by the spread of the validation scores. For a briefly trained model that spread can be a
    few thousandths of the scores themselves, which turns float32 rounding (1e-7 relative) into differences above
    1e-4 after normalisation; the anomaly maps, whose spread is wide, are held to 1e-4 without this allowance.
    """
    post = model.post_processor
    spread = float(post.image_max - post.image_min)
    scale = max(abs(float(post.image_max)), abs(float(post.image_min)))
    return max(TOLERANCE, 1e-5 * scale / max(spread, 1e-12))


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------
def test_engine_export_writes_whole_pipeline(exported: dict[str, Path]) -> None:
    """All formats are written; the ONNX graph holds resize, input normalisation, network, pseudo-Huber, upsampling and
    thresholds."""
    for path in exported.values():
        assert path.is_file()
    assert exported["openvino"].with_suffix(".bin").is_file()
    graph = onnx.load(str(exported["onnx"])).graph
    ops = {node.op_type for node in graph.node}
    # the weights' mean/std (sub/div), network, pseudo-Huber sqrt, the Gaussian upsampler's matrix products,
    # normalisation clip, and the resize (an ONNX Resize, or the exact index gather of FcddPreProcessor.forward)
    assert {"Sub", "Div", "Conv", "Sqrt", "MatMul", "Clip"} <= ops, ops
    assert ops & {"Resize", "Gather"}, ops
    assert [o.name for o in graph.output] == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in (dims[0], dims[2], dims[3])), "batch, height and width must be dynamic"
    assert dims[1].dim_value == 3


def test_parity_eager_onnxruntime_openvino(trained: dict[str, Any], exported: dict[str, Path]) -> None:
    """Eager torch, ONNX Runtime and OpenVINO (f32) agree on normalised maps and scores to 1e-4 and on every label."""
    model = trained["model"]
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for path in trained["parity"]:
        image = load_rgb(path)
        groups.setdefault(image.shape[:2], []).append(image)
    # odd, non-square sizes; 333 x 500 is one where ONNX's Resize would pick other pixels than torch's nearest resize
    rng = np.random.default_rng(0)
    groups[(97, 143)] = [rng.random((97, 143, 3), dtype=np.float32)]
    groups[(333, 500)] = [rng.random((333, 500, 3), dtype=np.float32), rng.random((333, 500, 3), dtype=np.float32)]
    worst = {"onnxruntime": 0.0, "openvino": 0.0}
    worst_score = dict(worst)
    for images in groups.values():
        batch = np.stack(images)
        reference = eager(model, batch)
        for name, outputs in (
            ("onnxruntime", run_onnxruntime(exported["onnx"], batch)),
            ("openvino", run_openvino(exported["openvino"], batch)),
        ):
            map_diff = max_abs(reference["anomaly_map"], outputs["anomaly_map"])
            score_diff = max_abs(reference["pred_score"], outputs["pred_score"])
            assert map_diff <= TOLERANCE, f"{name}: anomaly maps differ by {map_diff}"
            assert score_diff <= score_tolerance(model), f"{name}: scores differ by {score_diff}"
            np.testing.assert_array_equal(reference["pred_label"].reshape(-1), outputs["pred_label"].reshape(-1))
            worst[name] = max(worst[name], map_diff)
            worst_score[name] = max(worst_score[name], score_diff)
    print(f"parity max abs diff vs eager torch: anomaly maps {worst}, scores {worst_score}")


def test_fixed_batch_compiles_the_same_function(exported: dict[str, Path]) -> None:
    """``OpenVINOModel(batch_size=...)`` (the benchmarks' runners; ``predict-openvino`` fixes 1) fixes only the batch of
    the dynamic graph: height and width stay open, and the outputs are those of the graph with every dimension open."""
    from anomalib_fcdd.deploy.runtime import OpenVINOModel

    fixed = OpenVINOModel(exported["openvino"], "f32", batch_size=2)
    shape = fixed.compiled.input(0).get_partial_shape()
    assert shape[0].is_static and shape[0].get_length() == 2 and shape[2].is_dynamic and shape[3].is_dynamic
    rng = np.random.default_rng(3)
    for height, width in ((224, 224), (97, 143)):
        images = rng.random((2, height, width, 3), dtype=np.float32)
        reference = run_openvino(exported["openvino"], images)
        outputs = fixed(images.transpose(0, 3, 1, 2))
        for name in ("anomaly_map", "pred_score"):
            assert max_abs(reference[name], outputs[name]) <= 1e-6, name
        np.testing.assert_array_equal(reference["pred_mask"], outputs["pred_mask"])


def test_bilinear_resize_exports_with_the_eager_pixels(trained: dict[str, Any], tmp_path: Path) -> None:
    """The antialiased bilinear pre-processor (the default with pretrained weights) is computed inside the exported
    graph as in eager torch, shrinking and enlarging: ONNX Runtime and OpenVINO give the eager maps to 1e-4."""
    model = copy.deepcopy(trained["model"]).eval()
    model.pre_processor = FcddPreProcessor(image_size=224, resize="bilinear")
    root = tmp_path / "bilinear"
    onnx_path = trained["engine"].export(model, "onnx", export_root=root, onnx_kwargs={"opset_version": 18})
    openvino_path = trained["engine"].export(model, "openvino", export_root=root, onnx_kwargs={"opset_version": 18})
    rng = np.random.default_rng(1)
    for shape in ((333, 500, 3), (150, 97, 3)):
        batch = rng.random((2, *shape), dtype=np.float32)
        reference = eager(model, batch)
        nearest = eager(trained["model"], batch)
        assert max_abs(reference["anomaly_map"], nearest["anomaly_map"]) > 1e-3, "still the nearest resize"
        for name, outputs in (
            ("onnxruntime", run_onnxruntime(Path(onnx_path), batch)),
            ("openvino", run_openvino(Path(openvino_path), batch)),
        ):
            map_diff = max_abs(reference["anomaly_map"], outputs["anomaly_map"])
            assert map_diff <= TOLERANCE, f"{name} at {shape}: anomaly maps differ by {map_diff}"


def test_torch_artefact_reproduces_model(trained: dict[str, Any], exported: dict[str, Path]) -> None:
    """The pickled torch export gives the eager model's results (it is the same module)."""
    loaded = torch.load(exported["torch"], map_location="cpu", weights_only=False)["model"].eval()
    images = np.stack([load_rgb(trained["parity"][0])])
    reference, result = eager(trained["model"], images), eager(loaded, images)
    assert max_abs(reference["anomaly_map"], result["anomaly_map"]) == 0.0


def test_fixed_input_size_export(trained: dict[str, Any], tmp_path: Path) -> None:
    """``input_size`` fixes the IR's spatial input; the result still matches the eager model at that size."""
    model = trained["model"]
    path = model.to_openvino(tmp_path, input_size=(256, 256), onnx_kwargs={"opset_version": 18})
    shape = ov.Core().read_model(path).input(0).get_partial_shape()
    assert shape[0].is_dynamic and [shape[i].get_length() for i in (1, 2, 3)] == [3, 256, 256]
    images = np.random.default_rng(1).random((2, 256, 256, 3), dtype=np.float32)
    reference, outputs = eager(model, images), run_openvino(path, images)
    assert max_abs(reference["anomaly_map"], outputs["anomaly_map"]) <= TOLERANCE
    np.testing.assert_array_equal(reference["pred_label"].reshape(-1), outputs["pred_label"].reshape(-1))


def _first_xml(root: Path) -> Path:
    found = sorted(root.rglob("model.xml"))
    assert found, f"no model.xml under {root}"
    return found[0]


@pytest.mark.slow
def test_cli_export_short_name(trained: dict[str, Any], exported: dict[str, Path], tmp_path: Path) -> None:
    """``anomalib-fcdd export --model fcdd_hsc --ckpt_path ... --export_type openvino`` writes an equivalent IR."""
    from anomalib_fcdd.cli import main

    main(
        [
            "export",
            "--model",
            "fcdd_hsc",
            "--model.pre_trained",
            "false",
            "--ckpt_path",
            trained["ckpt"],
            "--export_type",
            "openvino",
            "--default_root_dir",
            str(tmp_path),
        ]
    )
    images = np.stack([load_rgb(trained["parity"][-1])])
    via_cli, via_engine = run_openvino(_first_xml(tmp_path), images), run_openvino(exported["openvino"], images)
    assert max_abs(via_engine["anomaly_map"], via_cli["anomaly_map"]) <= TOLERANCE


@pytest.fixture
def imagenet_checkpoint(trained: dict[str, Any], tmp_path: Path) -> Path:
    """The trained checkpoint as a model trained from ImageNet weights records it: ``pre_trained=True`` (with the
    input normalisation the model really used, which ``auto`` would otherwise choose from ``pre_trained``)."""
    checkpoint = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["pre_trained"] = True
    checkpoint["hyper_parameters"]["input_normalization"] = trained["model"].model.input_normalization
    path = tmp_path / "imagenet_trained.ckpt"
    torch.save(checkpoint, path)
    return path


def test_checkpoint_of_a_pretrained_model_restores_offline(
    trained: dict[str, Any], imagenet_checkpoint: Path, offline_imagenet: Path
) -> None:
    """Restoring needs no ImageNet file (the checkpoint holds every weight); without a checkpoint the model refuses."""
    restored = FcddHsc.load_from_checkpoint(imagenet_checkpoint)
    assert restored.hparams.pre_trained is True and restored.model.missing_weights is None
    images = np.stack([load_rgb(path) for path in trained["parity"][:2]])
    reference, again = eager(trained["model"], images), eager(restored, images)
    np.testing.assert_array_equal(reference["anomaly_map"], again["anomaly_map"])
    np.testing.assert_array_equal(reference["pred_label"], again["pred_label"])

    fresh = FcddHsc(backbone="vgg11_bn", pre_trained=True)  # offline: built, but must not run on random weights
    with pytest.raises(WeightsError, match=r"(?s)vgg11_bn-6002323d\.pth.*none was loaded before it was used"):
        fresh.eval()(torch.rand(1, 3, 64, 64))


@pytest.mark.slow
def test_stock_anomalib_cli_export(imagenet_checkpoint: Path, offline_imagenet: Path, tmp_path: Path) -> None:
    """The stock ``anomalib export --model anomalib_fcdd.FcddHsc`` works offline from a pretrained model's ckpt."""
    from anomalib.cli.cli import AnomalibCLI

    AnomalibCLI(
        args=[
            "export",
            "--model",
            "anomalib_fcdd.FcddHsc",
            "--ckpt_path",
            str(imagenet_checkpoint),
            "--export_type",
            "onnx",
            "--default_root_dir",
            str(tmp_path),
        ]
    )
    assert sorted(tmp_path.rglob("model.onnx"))


@pytest.mark.slow
def test_export_all_variants(trained: dict[str, Any], tmp_path: Path) -> None:
    """Every variant is written to its own folder with its size; compressed IRs are smaller and still agree."""
    artefacts = export_all(trained["model"], tmp_path, trained["datamodule"], calibration_images=16)
    assert list(artefacts) == list(VARIANTS)
    assert (tmp_path / "manifest.json").is_file()
    for name, artefact in artefacts.items():
        assert artefact.path.is_file() and artefact.path.parent == tmp_path / name
        assert artefact.size_bytes > 0
    sizes = {name: artefact.size_bytes for name, artefact in artefacts.items()}
    assert sizes["openvino_fp16"] < 0.6 * sizes["openvino_fp32"]
    assert sizes["openvino_int8"] < 0.35 * sizes["openvino_fp32"]
    images = np.stack([load_rgb(path) for path in trained["parity"][:2]])
    reference = run_openvino(artefacts["openvino_fp32"].path, images)["anomaly_map"].ravel()
    # INT8_PTQ flattens the map of a model trained on generated images only (see the INT8_PTQ test above).
    bounds = {
        "openvino_fp16": 0.9,
        "openvino_int8": 0.9,
        "openvino_int8_ptq": INT8_PTQ_MIN_CORRELATION if trained["real_images"] else None,
    }
    for name, bound in bounds.items():
        if bound is None:
            continue  # INT8_PTQ_SYNTHETIC
        compressed = run_openvino(artefacts[name].path, images)["anomaly_map"].ravel()
        correlation = np.corrcoef(reference, compressed)[0, 1]
        assert correlation > bound, f"{name}: heatmap correlation with FP32 only {correlation:.3f}"


CONVOLUTIONS = {"Convolution", "GroupConvolution"}
#: Operations that only move or pick values, which INT8 passes through unchanged.
DATA_MOVEMENT = {"MaxPool", "Interpolate", "Concat"}


def test_int8_ptq_quantises_only_the_convolutions(trained: dict[str, Any], tmp_path: Path) -> None:
    """FCDD's INT8_PTQ puts fake-quantisers in front of backbone/head convolutions only, never in front of the
    element-wise maths or the upsampler, and the result still tracks the float model."""
    from anomalib_fcdd.deploy.quantization import FLOAT_OP_TYPES

    artefact = export_all(
        trained["model"], tmp_path, trained["datamodule"], variants=["openvino_int8_ptq"], calibration_images=8
    )["openvino_int8_ptq"]
    graph = ov.Core().read_model(artefact.path)
    fed_by_quantiser: set[str] = set()
    for op in graph.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize":
            for output in op.outputs():
                fed_by_quantiser |= {target.get_node().get_type_name() for target in output.get_target_inputs()}
    convolutions = [op for op in graph.get_ordered_ops() if op.get_type_name() in CONVOLUTIONS]
    quantised = 0
    for convolution in convolutions:
        source = convolution.input_value(0).get_node()
        while source.get_type_name() in DATA_MOVEMENT:  # the quantiser sits before a pool, a resize or a concat
            source = source.input_value(0).get_node()
        quantised += source.get_type_name() == "FakeQuantize"
    assert fed_by_quantiser <= CONVOLUTIONS | DATA_MOVEMENT, fed_by_quantiser
    assert not fed_by_quantiser & set(FLOAT_OP_TYPES)
    assert quantised == len(convolutions) > 0, f"{quantised} of {len(convolutions)}"  # every convolution in INT8
    images = np.stack([load_rgb(path) for path in trained["parity"][:2]])
    reference = eager(trained["model"], images)["anomaly_map"].ravel()
    quantised = run_openvino(artefact.path, images)["anomaly_map"].ravel()
    if not trained["real_images"]:
        pytest.xfail(INT8_PTQ_SYNTHETIC)
    assert np.corrcoef(reference, quantised)[0, 1] > INT8_PTQ_MIN_CORRELATION


# ---------------------------------------------------------------------------------------------------------------------
# predict-openvino
# ---------------------------------------------------------------------------------------------------------------------
def _deployment_folder(model_file: Path, target: Path) -> Path:
    """Copy only the exported model files into a fresh folder (no checkpoint, nothing else)."""
    target.mkdir(parents=True)
    for file in model_file.parent.iterdir():
        if file.name.startswith(f"{model_file.stem}."):
            shutil.copy(file, target / file.name)
    return target


def _input_folder(trained: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Two RGB images, a grayscale and an RGBA one, a corrupt PNG and a text file."""
    folder.mkdir(parents=True)
    rgb = [Image.open(path).convert("RGB") for path in trained["parity"][:2]]
    files = {"rgb_a": folder / "rgb_a.png", "rgb_b": folder / "nested" / "rgb_b.jpg"}
    files["rgb_b"].parent.mkdir()
    rgb[0].save(files["rgb_a"])
    rgb[1].resize((300, 200)).save(files["rgb_b"], quality=95)
    files["gray"] = folder / "gray.png"
    rgb[0].convert("L").resize((150, 180)).save(files["gray"])
    files["rgba"] = folder / "rgba.png"
    rgba = rgb[1].convert("RGBA")
    rgba.putalpha(128)
    rgba.save(files["rgba"])
    files["corrupt"] = folder / "corrupt.png"
    files["corrupt"].write_bytes(files["rgb_a"].read_bytes()[:300])
    files["text"] = folder / "notes.txt"
    files["text"].write_text("not an image\n")
    return files


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_openvino_end_to_end(
    trained: dict[str, Any],
    exported: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """From a folder with only model.xml/.bin: CSV rows, overlays, odd modes accepted, bad files named and skipped."""
    from anomalib_fcdd.cli import main as cli_main

    model_dir = _deployment_folder(exported["openvino"], tmp_path / "deployed")
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.bin", "model.xml"]
    files = _input_folder(trained, tmp_path / "inputs")
    output = tmp_path / "predictions"
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes openvino_cache/ into the working directory
    args = ["predict-openvino", "--model-dir", str(model_dir), "--input", str(tmp_path / "inputs"), "--output"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, str(output), "--no-progress"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()

    rows = {Path(row["image"]).name: row for row in _read_csv(output / "predictions.csv")}
    assert set(rows) == {"rgb_a.png", "rgb_b.jpg", "gray.png", "rgba.png"}
    assert rows["gray.png"]["source_mode"] == "L" and rows["rgba.png"]["source_mode"] == "RGBA"
    for name, row in rows.items():
        assert row["pred_label"] in {"0", "1"} and row["label"] in {"normal", "anomalous"}
        assert 0.0 <= float(row["pred_score"]) <= 1.0
        overlay = Image.open(output / row["overlay"])
        with Image.open(
            files[{"rgb_a.png": "rgb_a", "rgb_b.jpg": "rgb_b", "gray.png": "gray"}.get(name, "rgba")]
        ) as im:
            assert overlay.size == im.size
    skipped = {Path(row["file"]).name: row["reason"] for row in _read_csv(output / "skipped.csv")}
    assert set(skipped) == {"corrupt.png", "notes.txt"}
    assert "not an image" in skipped["notes.txt"]
    assert "4 ok" in captured.out and "2 skipped" in captured.out
    assert "corrupt.png" in captured.out and "notes.txt" in captured.out

    # the CSV score of an untouched RGB image equals the eager model's normalised score
    reference = eager(trained["model"], np.stack([load_rgb(files["rgb_a"])]))
    difference = abs(float(rows["rgb_a.png"]["pred_score"]) - float(reference["pred_score"][0]))
    assert difference <= score_tolerance(trained["model"]) + 1e-6  # the CSV holds 6 decimals
    assert int(rows["rgb_a.png"]["pred_label"]) == int(reference["pred_label"][0])


def test_predict_from_onnx_folder_and_glob(
    trained: dict[str, Any], exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder holding only model.onnx works too, and a glob pattern selects the inputs."""
    model_dir = _deployment_folder(exported["onnx"], tmp_path / "onnx_only")
    images = tmp_path / "images"
    images.mkdir()
    for index, path in enumerate(trained["parity"][:2]):
        Image.open(path).convert("RGB").resize((128, 96)).save(images / f"img{index}.png")
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out"
    code = predict_module.main(
        ["--model-dir", str(model_dir), "--input", str(images / "*.png"), "--output", str(output), "--no-progress"]
    )
    assert code == 0
    assert len(_read_csv(output / "predictions.csv")) == 2
    assert len(list((output / "overlays").glob("*_overlay.png"))) == 2


def test_predict_reports_missing_model(tmp_path: Path) -> None:
    """A folder without a model is a usage error (exit code 2), not a traceback."""
    (tmp_path / "empty").mkdir()
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    output = tmp_path / "predictions"
    code = predict_module.main(["--model-dir", str(tmp_path / "empty"), "--input", str(image), "--output", str(output)])
    assert code == 2
    assert not output.exists(), "a run that cannot start leaves no output folder behind"


def test_predict_refuses_a_file_as_output_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    before = image.read_bytes()
    code = predict_module.main(["--model-dir", str(tmp_path), "--input", str(image), "--output", str(image)])
    assert code == 2
    assert "is a file; give a folder" in caplog.text
    assert image.read_bytes() == before


def test_predict_refuses_an_output_folder_under_a_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    code = predict_module.main(["--model-dir", str(tmp_path), "--input", str(image), "--output", str(image / "out")])
    assert code == 2
    assert "cannot be written" in caplog.text and str(image / "out") in caplog.text


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_load_image_converts_modes(tmp_path: Path, mode: str) -> None:
    """Every common PIL mode becomes H x W x 3 float32 in [0, 1] with a note."""
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    base = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        Image.fromarray((np.random.default_rng(0).random((20, 30)) * 65535).astype(np.uint16)).save(path)
    else:
        base.convert(mode).save(path)
    loaded = predict_module.load_image(path)
    assert loaded.array.shape == (20, 30, 3) and loaded.array.dtype == np.float32
    assert loaded.array.min() >= 0.0 and loaded.array.max() <= 1.0
    assert loaded.note is not None


def test_rectangular_image_size_trains_exports_and_predicts(synthetic_root: Path, tmp_path: Path) -> None:
    """``image_size=[64, 96]``: training batches, test maps and the exported graph all work at height x width."""
    seed_everything(0, workers=True)
    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = FcddHsc(backbone="efficientnet_lite0", image_size=[64, 96], epochs=1, passes_per_epoch=1, visualizer=False)
    assert model.augmentation.size == (64, 96) and model.pre_processor.train_size == (69, 103)
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    batch = next(iter(datamodule.test_dataloader()))
    assert eager(model, batch.image.permute(0, 2, 3, 1).numpy())["anomaly_map"].shape[-2:] == (64, 96)
    path = model.to_openvino(tmp_path / "ov", onnx_kwargs={"opset_version": 18})
    images = np.random.default_rng(3).random((2, 100, 150, 3), dtype=np.float32)  # any input size is resized
    reference, outputs = eager(model, images), run_openvino(path, images)
    assert outputs["anomaly_map"].shape[-2:] == (64, 96)
    assert max_abs(reference["anomaly_map"], outputs["anomaly_map"]) <= TOLERANCE


@pytest.mark.parametrize("size", [16, [60, 96], [64, 96, 3]])
def test_impossible_image_sizes_are_refused(size: object) -> None:
    from anomalib_fcdd.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="image_size"):
        FcddHsc(backbone="efficientnet_lite0", pre_trained=False, image_size=size)


def test_keep_aspect_ratio_trains_checkpoints_and_exports_at_the_datas_ratio(tmp_path: Path) -> None:
    """Training images 72 x 48 (3:2) and ``image_size=48, keep_aspect_ratio=True``: the model trains and tests at
    48 x 72; the checkpoint and the exported graph keep that size, whatever the test images' ratio."""
    root = make_synthetic_mvtec(tmp_path / "data", "wide", n_train=6, n_test_good=2, n_test_defect=2, size=48, seed=4)
    for path in root.rglob("*.png"):  # stretch every image and mask to 72 x 48
        with Image.open(path) as image:
            image.resize((72, 48), Image.Resampling.NEAREST).save(path)
    seed_everything(0, workers=True)
    datamodule = MVTec(root=root.parent, category="wide", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = FcddHsc(backbone="efficientnet_lite0", image_size=48, keep_aspect_ratio=True, epochs=1, passes_per_epoch=1)
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    assert model.image_size == (48, 72) and model.augmentation.size == (48, 72)
    assert model.pre_processor.train_size == (51, 77)  # 48 * 240/224 = 51.4, 72 * 240/224 = 77.1
    predictions = engine.predict(model, dataloaders=datamodule.test_dataloader())
    assert predictions[0].anomaly_map.shape[-2:] == (48, 72)
    checkpoint = (
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    restored = FcddHsc.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    assert restored.image_size == (48, 72) and restored.pre_processor.aspect_side is None
    images = np.random.default_rng(5).random((1, 60, 60, 3), dtype=np.float32)  # a square image is resized to 48 x 72
    path = restored.to_openvino(tmp_path / "ov", onnx_kwargs={"opset_version": 18})
    assert run_openvino(path, images)["anomaly_map"].shape[-2:] == (48, 72)
