"""``anomalib-fcdd`` prints each log line once, hides third-party import warnings, and answers ``--help`` without
importing torch (issue 18, item 7)."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings

import pytest

from anomalib_fcdd.cli import main
from anomalib_fcdd.cli_help import ANOMALIB_SUBCOMMANDS, OWN_SUBCOMMANDS
from anomalib_fcdd.logging_setup import (
    IMPORT_WARNINGS,
    ConsoleHandler,
    configure_logging,
    quiet_export,
    silence_import_warnings,
)


@pytest.fixture
def restore_logging() -> object:
    """Put the root logger and Lightning's loggers back as they were."""
    names = ("", "lightning.pytorch", "lightning_fabric")
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in names}
    level = logging.getLogger().level
    yield
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate
    logging.getLogger().setLevel(level)


def test_each_record_is_printed_once(restore_logging: object) -> None:
    import lightning.pytorch  # noqa: F401  (adds its own stream handler when imported before logging is set up)

    logging.getLogger("lightning.pytorch").addHandler(logging.StreamHandler(io.StringIO()))
    for name in ("anomalib", "lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # earlier tests (the benchmark runner) may have raised them
    stream = io.StringIO()
    configure_logging(stream=stream)
    configure_logging(stream=stream)  # idempotent: still one handler
    for name in ("anomalib.engine.engine", "lightning.pytorch.trainer", "lightning_fabric.utilities"):
        logging.getLogger(name).info("hello from %s", name)
    logging.getLogger("lightning_fabric.x").info("Tip: try installing litlogger")
    lines = stream.getvalue().splitlines()
    assert [line.split(" - ")[-1] for line in lines] == [
        "hello from anomalib.engine.engine",
        "hello from lightning.pytorch.trainer",
        "hello from lightning_fabric.utilities",
    ]
    assert sum(isinstance(handler, ConsoleHandler) for handler in logging.getLogger().handlers) == 1
    assert not any(type(h) is logging.StreamHandler for h in logging.getLogger("lightning.pytorch").handlers)


def test_anomalib_configure_logger_prints_twice_which_is_why_it_is_not_used(restore_logging: object) -> None:
    """The cause, pinned: anomalib's configure_logger leaves two handlers on the root logger (basicConfig + rich)."""
    from anomalib.loggers import configure_logger

    root = logging.getLogger()
    root.handlers[:] = []
    configure_logger()
    assert len(root.handlers) == 2


def test_export_chatter_is_hidden_and_real_warnings_are_not(
    restore_logging: object, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    with quiet_export():
        print("[torch.onnx] Run decompositions...")
        print("kept line")
        logging.getLogger("onnx_ir.passes.common.unused_removal").info("Removed 13 unused nodes")
        logging.getLogger("onnxscript.version_converter").warning("Failed to convert the model to the target version")
        logging.getLogger("onnxscript.optimizer").warning("a real warning")
    assert capsys.readouterr().out == "kept line\n"
    assert stream.getvalue().count(" - ") == 3 and "a real warning" in stream.getvalue()
    assert "Removed 13" not in stream.getvalue() and "Failed to convert" not in stream.getvalue()


def test_third_party_import_warnings_are_filtered_narrowly() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_import_warnings()
        warnings.warn(
            "Importing from timm.models.layers is deprecated, please import via timm.layers",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn(
            "The anomalib.models.components.dinov2 package is deprecated and will be removed",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    assert len(IMPORT_WARNINGS) == 2


def test_help_lists_every_anomalib_subcommand_and_ours(capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib.cli.cli import AnomalibCLI
    from anomalib.cli.pipelines import pipeline_subcommands

    expected = {"install", *AnomalibCLI.subcommands(), *AnomalibCLI.anomalib_subcommands(), *pipeline_subcommands()}
    assert set(ANOMALIB_SUBCOMMANDS) == expected
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    for name in (*ANOMALIB_SUBCOMMANDS, *OWN_SUBCOMMANDS):
        assert f"\n    {name} " in out, name


def package_imports_lazily() -> bool:
    """Whether ``import anomalib_fcdd`` leaves torch unimported (the ``__init__.py`` change of issue 18)."""
    probe = "import anomalib_fcdd, sys; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return done.stdout.strip() == "False"


def test_help_imports_neither_torch_nor_anomalib() -> None:
    """``anomalib-fcdd --help`` in a fresh process, as typed (12 s before, when it built anomalib's whole parser)."""
    if not package_imports_lazily():
        pytest.skip("anomalib_fcdd/__init__.py still imports the models eagerly (the change asked for in issue 18)")
    probe = (
        "import sys\nfrom anomalib_fcdd.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'anomalib', 'lightning') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "Available subcommands" in done.stdout
