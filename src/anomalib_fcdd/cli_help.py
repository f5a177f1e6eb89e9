"""``anomalib-fcdd --help`` without importing torch or anomalib (about 0.5 s instead of 12 s).

Building anomalib's parser imports torch, Lightning, every anomalib model and this package's models, and introspects
every class signature; the top-level help needs none of that, only the subcommand names. They are listed here, in
a jsonargparse parser of the same shape, and a test checks them against anomalib's CLI so the two cannot drift.
``anomalib-fcdd <subcommand> --help`` still goes through anomalib's full parser.
"""

from __future__ import annotations

import sys
from typing import TextIO

PREFACE = """anomalib-fcdd: anomalib's command line with FCDD's short names, and two commands of its own.

  anomalib-fcdd demo --help               the offline demo: FCDD on real texture photographs, with a report
  anomalib-fcdd predict-openvino --help   score images with an exported OpenVINO model (CSV and heatmaps)

  Short names: --model fcdd_hsc | fcdd, --data MVTec | MVTecFewAnomalies | Folder | FolderFewAnomalies
  (full class paths work as well).
  Example: anomalib-fcdd train --model fcdd_hsc --data MVTec --data.root ./datasets/MVTecAD --data.category bottle
  Options of a subcommand: anomalib-fcdd train --help (and --model.help fcdd_hsc, --data.help MVTec).
"""
#: anomalib 2.7's subcommands (``AnomalibCLI``: Trainer ones, its own, and the pipelines), then this package's.
ANOMALIB_SUBCOMMANDS = {
    "install": "Install the full-package for anomalib.",
    "fit": "Runs the full optimization routine.",
    "validate": "Perform one evaluation epoch over the validation set.",
    "test": "Perform one evaluation epoch over the test set.",
    "train": "Fit the model and then call test on the trained model.",
    "predict": "Run inference on a model.",
    "export": "Export the model to ONNX or OpenVINO format.",
    "benchmark": "Benchmarking pipeline for evaluating anomaly detection models.",
}
OWN_SUBCOMMANDS = {
    "demo": "The offline demo: FCDD on real texture photographs, with a report.",
    "predict-openvino": "Score images with an exported OpenVINO model (CSV and heatmaps).",
}


def print_help(stream: TextIO | None = None) -> None:
    """The preface and a jsonargparse listing of every subcommand."""
    from jsonargparse import ArgumentParser

    stream = sys.stdout if stream is None else stream
    parser = ArgumentParser(prog="anomalib-fcdd", add_help=True)
    parser.add_argument("-c", "--config", help="Path to a configuration file in json or yaml format.")
    subcommands = parser.add_subcommands(title="subcommands", description="Add --help after one for its options.")
    for name, text in {**ANOMALIB_SUBCOMMANDS, **OWN_SUBCOMMANDS}.items():
        subcommands.add_subcommand(name, ArgumentParser(prog=f"anomalib-fcdd {name}"), help=text)
    stream.write(PREFACE + "\n")
    parser.print_help(stream)
