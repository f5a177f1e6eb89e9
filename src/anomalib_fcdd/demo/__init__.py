"""The offline demo behind ``anomalib-fcdd demo``: real texture photos, realistic defects, FCDD, a report.

* :mod:`.dataset` cuts an MVTec-layout dataset from scikit-image's CC0 photos (brick, grass, gravel);
* :mod:`.defects` draws scratches, foreign patches, stains, holes and folds with exact masks;
* :mod:`.training` trains and tests ``FcddHsc`` per category through anomalib's ``Engine``;
* :mod:`.report` writes metrics, per-image heatmap figures, loss curves and an index page;
* :mod:`.cli` ties them together (``main(argv) -> exit code``).
"""

from .dataset import DemoDatasetConfig, build_demo_dataset, generate_category
from .defects import DEFECTS
from .training import TrainSettings, run_category

__all__ = ["DEFECTS", "DemoDatasetConfig", "TrainSettings", "build_demo_dataset", "generate_category", "run_category"]
