"""The benchmark grid: which runs there are (methods x categories x seeds), where their data is, their CSV columns."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .profiles import Method, Profile

logger = logging.getLogger("benchmarks.jobs")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
DEFAULT_MVTEC_ROOT = REPO_ROOT.parent / "shared" / "data" / "mvtec_ad"
#: Where the README's commands put MVTec-AD (relative to the working directory).
README_MVTEC_ROOT = Path("datasets") / "MVTecAD"
MVTEC_ROOT_ENV = "FCDD_MVTEC_ROOT"
MVTEC_DATASET = "mvtec_ad"

KEY_COLUMNS = ("model", "loss", "setting", "backbone", "pre_trained", "dataset", "category", "seed")
CONFIG_COLUMNS = (
    "image_size",
    "epochs",
    "passes_per_epoch",
    "train_batch_size",
    "n_train",
    "n_train_anomalous",
    "n_test",
)
#: ``pixel_auroc_full``: the paper's protocol (masks at their original resolution); the rest: at model resolution.
METRIC_COLUMNS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_auroc_full")
COST_COLUMNS = (
    "train_time_s",
    "test_time_s",
    "test_throughput_ips",
    "rss_start_mb",
    "peak_rss_mb",
    "peak_cuda_mb",
    "artefact_mb",
)
META_COLUMNS = ("profile", "device", "rss_method", "backbone_note", "anomalib_version", "torch_version", "finished_at")
COLUMNS = KEY_COLUMNS + CONFIG_COLUMNS + METRIC_COLUMNS + COST_COLUMNS + META_COLUMNS
FAILURE_COLUMNS = (*KEY_COLUMNS, "error", "finished_at")

#: anomalib metric (as an Evaluator would name it) -> CSV column. ``AUPR`` on anomaly_map/gt_mask is the pixel AP.
ANOMALIB_METRICS = {
    "image_AUROC": "image_auroc",
    "pixel_AUROC": "pixel_auroc",
    "pixel_AUPR": "pixel_ap",
    "pixel_AUPRO": "pixel_aupro",
}

Row = dict[str, str]
Key = tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CategorySource:
    """Where one category's MVTec-layout data lives; ``dataset`` names the collection in the CSV."""

    dataset: str
    root: Path
    category: str


@dataclass(frozen=True)
class BackboneChoice:
    """The backbone a model actually gets, and why it differs from the profile's wish (empty note if it does not)."""

    name: str
    pre_trained: bool
    note: str = ""


@dataclass(frozen=True)
class Job:
    """One run: a method on one category with one seed, with everything resolved that goes into its key."""

    method: Method
    backbone: BackboneChoice
    source: CategorySource
    seed: int

    def key(self) -> Key:
        """The identity of the run in the CSV (same order as :data:`KEY_COLUMNS`)."""
        return (
            self.method.model,
            self.method.loss,
            self.method.setting,
            self.backbone.name,
            str(self.backbone.pre_trained),
            self.source.dataset,
            self.source.category,
            str(self.seed),
        )

    def slug(self) -> str:
        """A file-system-safe name for the run's working folder."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(self.key()))


def build_jobs(
    profile: Profile, sources: Sequence[CategorySource], backbones: dict[Method, BackboneChoice]
) -> list[Job]:
    """The grid, seed-major: an interrupted run has every method on every category for the first seeds."""
    return [
        Job(method=method, backbone=backbones[method], source=source, seed=seed)
        for seed in profile.seeds
        for source in sources
        for method in profile.methods
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Resolving data and backbones (with logged fall-backs, never silent ones)
# ---------------------------------------------------------------------------------------------------------------------
def resolve_mvtec_root(cli_value: str | None) -> Path:
    """``--mvtec-root`` wins, then ``$FCDD_MVTEC_ROOT``, then ``./datasets/MVTecAD`` (where the README puts it) if it
    exists, then ``../shared/data/mvtec_ad`` next to the repository."""
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get(MVTEC_ROOT_ENV):
        return Path(os.environ[MVTEC_ROOT_ENV]).expanduser()
    if README_MVTEC_ROOT.is_dir():
        return README_MVTEC_ROOT
    return DEFAULT_MVTEC_ROOT


def mvtec_layout_categories(root: Path) -> list[str]:
    """Subfolders of ``root`` that look like MVTec categories (they have ``train/good``)."""
    if not root.is_dir():
        return []
    return sorted(child.name for child in root.iterdir() if (child / "train" / "good").is_dir())


def report_missing_category(root: Path, category: str) -> bool:
    """``True``, after saying on stderr how to fix it, when ``root`` holds no MVTec-layout ``category`` (no
    ``train/good``): the research scripts then exit with status 2 before training anything."""
    if (root / category / "train" / "good").is_dir():
        return False
    print(f"No MVTec-layout category {category!r} under {root}; pass --mvtec-root.", file=sys.stderr)
    return True


def resolve_sources(
    profile: Profile,
    mvtec_root: Path,
    extra_roots: Sequence[Path],
    work_dir: Path,
    generate: bool = True,
    include_missing: bool = False,
) -> tuple[list[CategorySource], list[str]]:
    """Category sources of the profile, and human-readable notes on what is missing (and therefore skipped).

    Args:
        generate: write generated data (synthetic or demo) to ``work_dir``; a dry run passes False and only lists.
        include_missing: keep MVTec-AD categories that are not on disk (a dry run lists the complete grid).
    """
    sources: list[CategorySource] = []
    missing: list[str] = []
    for category in profile.mvtec_categories:
        source = CategorySource(MVTEC_DATASET, mvtec_root, category)
        if include_missing or (mvtec_root / category / "train" / "good").is_dir():
            sources.append(source)
        if not (mvtec_root / category / "train" / "good").is_dir():
            missing.append(f"MVTec-AD category {category!r} not found under {mvtec_root}")
    if profile.synthetic is not None:
        sources.extend(_synthetic_sources(profile, work_dir / "synthetic", generate))
    if profile.include_demo:
        demo, note = _demo_sources(work_dir / "demo", generate)
        sources.extend(demo)
        if note:
            missing.append(note)
    for root in extra_roots:
        found = mvtec_layout_categories(root)
        if not found:
            missing.append(f"--extra-root {root} holds no MVTec-layout category (no <category>/train/good)")
        sources.extend(CategorySource(root.name, root, category) for category in found)
    return sources, missing


def _synthetic_sources(profile: Profile, root: Path, generate: bool) -> list[CategorySource]:
    """Generated categories; generator seed = index, so a resumed run regenerates identical data."""
    spec = profile.synthetic
    assert spec is not None
    sources = []
    for index, category in enumerate(spec.categories):
        if generate and not (root / category / "train" / "good").is_dir():
            from anomalib_fcdd.data import make_synthetic_mvtec

            make_synthetic_mvtec(
                root,
                category,
                n_train=spec.n_train,
                n_test_good=spec.n_test_good,
                n_test_defect=spec.n_test_defect,
                size=spec.size,
                seed=index,
            )
        sources.append(CategorySource("synthetic", root, category))
    return sources


def _demo_sources(root: Path, generate: bool) -> tuple[list[CategorySource], str]:
    """The demo textures of ``anomalib_fcdd.demo`` (built once under ``root``), or a note saying they are skipped."""
    try:
        from anomalib_fcdd.demo.dataset import TEXTURES, build_demo_dataset
    except ImportError as error:
        return [], (
            f"the demo textures are skipped (anomalib_fcdd.demo.dataset unavailable: {error}); pass --extra-root DIR "
            "to add MVTec-layout categories"
        )
    if generate:
        build_demo_dataset(root)  # seeded and idempotent: a resumed run sees the same pixels
    return [CategorySource("demo", root, category) for category in TEXTURES], ""


def resolve_backbones(profile: Profile) -> dict[Method, BackboneChoice]:
    """The backbone each method of the profile gets, with a note where a fall-back replaces the wished one."""
    choices: dict[Method, BackboneChoice] = {}
    fcdd = _fcdd_backbone(profile.fcdd.backbone, profile.fcdd.pre_trained)
    for method in profile.methods:
        if method.model == "fcdd":
            choices[method] = fcdd
        else:
            wished = getattr(profile.baselines, f"{method.model}_backbone")
            choices[method] = _baseline_backbone(method.model, wished, profile.baselines.pre_trained)
    for method, choice in choices.items():
        if choice.note:
            logger.warning("%s: %s", method, choice.note)
    return choices


def _fcdd_backbone(name: str, pre_trained: bool) -> BackboneChoice:
    """FCDD's registered backbone, or VGG-11-BN with random weights (labelled) if ``name`` is not registered."""
    from anomalib_fcdd.models.fcdd.backbones import BACKBONES

    if name in BACKBONES:
        return BackboneChoice(name, pre_trained)
    return BackboneChoice(
        "vgg11_bn",
        False,
        f"FCDD backbone {name!r} is not registered in this build (have {sorted(BACKBONES)}); falling back to "
        "vgg11_bn with RANDOM weights (pre_trained=False)",
    )


#: Feature layers used when the timm EfficientNet-Lite0 has to be built by anomalib itself (random weights).
EFFICIENTNET_LITE0_LAYERS = {"padim": ["blocks.1", "blocks.2", "blocks.4"], "patchcore": ["blocks.2", "blocks.4"]}
TIMM_EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"


def _baseline_backbone(model: str, wished: str | None, pre_trained: bool) -> BackboneChoice:
    """anomalib's default (``None``), a timm name, or ``efficientnet_lite0`` through ``anomalib_fcdd.baselines``."""
    if wished is None:
        return BackboneChoice("default", pre_trained)
    if wished != "efficientnet_lite0" or not pre_trained:
        return BackboneChoice(wished, pre_trained)
    if _baselines_helper(model) is not None:
        return BackboneChoice(wished, pre_trained)
    return BackboneChoice(
        TIMM_EFFICIENTNET_LITE0,
        False,
        "anomalib_fcdd.baselines (offline EfficientNet-Lite0 weights) is not available; falling back to timm "
        f"{TIMM_EFFICIENTNET_LITE0} with RANDOM weights (pre_trained=False)",
    )


def _baselines_helper(model: str) -> Callable[..., Any] | None:
    """``anomalib_fcdd.baselines.build_<model>`` if the module exists, imported lazily."""
    try:
        from anomalib_fcdd import baselines  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(baselines, f"build_{model}", None)
