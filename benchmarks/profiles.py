"""Benchmark profiles: which methods, categories, seeds and training budget a run of ``benchmarks.run`` covers.

A profile is plain data (frozen dataclasses), so a job list is a pure function of the profile and the command line,
and the same profile always produces the same job keys: that is what makes a run resumable.

Profiles:

* ``full``    -- the paper's setting on all 15 MVTec-AD categories, 6 seeds; needs GPUs and the dataset.
* ``offline`` -- what runs here without network on 2 CPU cores in 10-55 minutes: MVTec-AD ``bottle`` plus the demo
  textures (or ``--extra-root`` folders), every method on the same offline pretrained backbone, reduced budget.
* ``smoke``   -- generated 64 x 64 data, 1 epoch, 2 seeds, random weights: checks the plumbing in a few minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Supervision settings of the paper (sec. 4): synthetic confetti only, or one real anomaly per defect type.
UNSUPERVISED = "unsupervised"
SEMI_SUPERVISED = "semi-supervised"
SETTINGS = (UNSUPERVISED, SEMI_SUPERVISED)

#: FCDD losses as named by ``FcddHsc(loss=...)``: eq. (4), the paper's baseline as run, and the proposed eq. (5).
FCDD_LOSSES = ("fcdd", "per_image", "pixel_balanced")

#: Placeholder for fields that do not apply (a PaDiM run has no loss); never empty, so CSV keys survive round trips.
NOT_APPLICABLE = "-"

MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)


@dataclass(frozen=True)
class Method:
    """One column of the comparison: a model, its loss (FCDD only) and the supervision setting."""

    model: str
    loss: str = NOT_APPLICABLE
    setting: str = UNSUPERVISED

    def __post_init__(self) -> None:
        if self.model not in {"fcdd", "padim", "patchcore"}:
            raise ValueError(f"Unknown benchmark model {self.model!r}.")
        if self.model == "fcdd" and self.loss not in FCDD_LOSSES:
            raise ValueError(f"FCDD needs a loss in {FCDD_LOSSES}, got {self.loss!r}.")
        if self.model != "fcdd" and (self.loss != NOT_APPLICABLE or self.setting != UNSUPERVISED):
            raise ValueError(f"{self.model} has no loss choice and is unsupervised only.")
        if self.setting not in SETTINGS:
            raise ValueError(f"Unknown setting {self.setting!r}; expected one of {SETTINGS}.")


FCDD_METHODS = tuple(Method("fcdd", loss, setting) for setting in SETTINGS for loss in FCDD_LOSSES)
ALL_METHODS = (*FCDD_METHODS, Method("padim"), Method("patchcore"))


@dataclass(frozen=True)
class FcddBudget:
    """FCDD training budget. ``epochs`` are paper epochs of ``passes_per_epoch`` passes over the training set."""

    backbone: str = "vgg11_bn"
    pre_trained: bool = True
    epochs: int = 50
    passes_per_epoch: int = 10
    train_batch_size: int = 128
    image_size: int = 224
    anomalies_per_defect: int = 1


@dataclass(frozen=True)
class BaselineConfig:
    """PaDiM / PatchCore settings; ``None`` backbones and image size mean anomalib's defaults."""

    padim_backbone: str | None = None
    patchcore_backbone: str | None = None
    pre_trained: bool = True
    image_size: int | None = None
    train_batch_size: int = 32
    coreset_sampling_ratio: float = 0.1


@dataclass(frozen=True)
class SyntheticData:
    """Categories generated with ``anomalib_fcdd.data.make_synthetic_mvtec`` (one generator seed per category)."""

    categories: tuple[str, ...] = ("synthetic_a", "synthetic_b")
    n_train: int = 16
    n_test_good: int = 6
    n_test_defect: int = 6
    size: int = 64


@dataclass(frozen=True)
class Profile:
    """Everything a benchmark run needs apart from paths, which come from the command line.

    Attributes:
        mvtec_categories: MVTec-AD categories read from ``--mvtec-root``.
        include_demo: add the demo textures of ``anomalib_fcdd.demo`` (when that module exists) and ``--extra-root``.
        synthetic: generate categories instead of reading datasets (smoke runs and tests).
        max_train_images: cap on training images per category (a seeded subset), to fit a CPU budget.
        num_workers: dataloader workers; 0 keeps loading in the measured process.
        validate_each_epoch: run anomalib's validation loop while fitting. Off where no threshold is needed: every
            reported metric is threshold-free, and validation on CPU costs a full test pass per paper epoch.
    """

    name: str
    description: str
    methods: tuple[Method, ...] = ALL_METHODS
    seeds: tuple[int, ...] = (0,)
    mvtec_categories: tuple[str, ...] = ()
    include_demo: bool = False
    synthetic: SyntheticData | None = None
    fcdd: FcddBudget = field(default_factory=FcddBudget)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    eval_batch_size: int = 32
    num_workers: int = 0
    max_train_images: int | None = None
    validate_each_epoch: bool = False


FULL = Profile(
    name="full",
    description=(
        "The paper's setting (sec. 4): MVTec-AD, 15 categories, FCDD on ImageNet VGG-11-BN, 50 epochs of 10 passes, "
        "batch 128, semi-supervised k=1, 6 seeds; PaDiM and PatchCore with anomalib's default backbones and "
        "pre-processing. Needs GPUs and the dataset."
    ),
    seeds=(0, 1, 2, 3, 4, 5),
    mvtec_categories=MVTEC_CATEGORIES,
    fcdd=FcddBudget(),
    baselines=BaselineConfig(),
    num_workers=8,
)

OFFLINE = Profile(
    name="offline",
    description=(
        "No network, 2 CPU cores, about an hour: MVTec-AD bottle, the three demo textures and any --extra-root "
        "categories (Magnetic-Tile: --extra-root ../shared/data), full training sets, one seed. FCDD-HSC "
        "(pixel-balanced loss) unsupervised and semi-supervised (k = 1 real defect per type) on "
        "efficientnet_lite0_multiscale with its default budget and recipe, against PaDiM and PatchCore (1 % coreset) "
        "on the same offline ImageNet EfficientNet-Lite0 weights, 224 x 224. See benchmarks/RUNNER.md."
    ),
    methods=(
        Method("fcdd", "pixel_balanced", UNSUPERVISED),
        Method("fcdd", "pixel_balanced", SEMI_SUPERVISED),
        Method("padim"),
        Method("patchcore"),
    ),
    seeds=(0,),
    mvtec_categories=("bottle",),
    include_demo=True,
    fcdd=FcddBudget(
        backbone="efficientnet_lite0_multiscale",
        pre_trained=True,
        epochs=None,
        passes_per_epoch=None,
        train_batch_size=16,
    ),
    baselines=BaselineConfig(
        padim_backbone="efficientnet_lite0",
        patchcore_backbone="efficientnet_lite0",
        pre_trained=True,
        image_size=224,
        train_batch_size=16,
        coreset_sampling_ratio=0.01,
    ),
    eval_batch_size=16,
    num_workers=2,
)

SMOKE = Profile(
    name="smoke",
    description=(
        "Plumbing check: generated 64 x 64 categories, every method, 1 epoch of 1 pass, 2 seeds, random weights "
        "(pre_trained=False). The numbers mean nothing."
    ),
    seeds=(0, 1),
    synthetic=SyntheticData(),
    fcdd=FcddBudget(pre_trained=False, epochs=1, passes_per_epoch=1, train_batch_size=8, image_size=64),
    baselines=BaselineConfig(
        padim_backbone="resnet18", patchcore_backbone="resnet18", pre_trained=False, image_size=64, train_batch_size=8
    ),
    eval_batch_size=8,
)

PROFILES: dict[str, Profile] = {profile.name: profile for profile in (FULL, OFFLINE, SMOKE)}


def get_profile(name: str) -> Profile:
    """Look a profile up by name, with the list of valid names in the error."""
    if name not in PROFILES:
        raise KeyError(f"Unknown profile {name!r}; available: {sorted(PROFILES)}.")
    return PROFILES[name]
