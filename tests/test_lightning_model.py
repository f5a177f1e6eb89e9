"""The Lightning module's own pieces: freezing, BatchNorm mode, optimiser and schedule, the training step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from anomalib.data import ImageBatch
from torch import nn

from anomalib_fcdd import Fcdd, FcddHsc
from anomalib_fcdd.errors import ConfigurationError


def test_vgg_freezing_matches_the_paper() -> None:
    model = FcddHsc(backbone="vgg11_bn", pre_trained=False)
    features = model.model.features
    assert all(not p.requires_grad for p in features[:15].parameters())
    assert all(p.requires_grad for p in features[15:].parameters())
    assert all(p.requires_grad for p in model.model.head.parameters())


@pytest.mark.parametrize("train_mode", [True, False])
def test_frozen_batchnorm_mode(train_mode: bool) -> None:
    model = FcddHsc(backbone="vgg11_bn", pre_trained=False, frozen_bn_train_mode=train_mode, minmax="bottle").model
    model.train()
    frozen_bn = model.features[1]
    assert isinstance(frozen_bn, nn.BatchNorm2d)
    assert frozen_bn.training is train_mode
    assert model.features[16].training, "trainable BatchNorm layers always train"
    before = frozen_bn.running_mean.clone()
    model(torch.rand(2, 3, 64, 64))
    assert (not torch.equal(before, frozen_bn.running_mean)) is train_mode


@pytest.mark.parametrize(
    ("backbone", "pre_trained"),
    [("vgg11_bn", False), ("resnet18", False), ("efficientnet_lite0", True), ("efficientnet_lite0_multiscale", True)],
)
@pytest.mark.parametrize("train_mode", [True, False])
def test_a_new_model_starts_in_the_modes_training_needs(backbone: str, pre_trained: bool, train_mode: bool) -> None:
    """Lightning keeps the modes a module has when ``fit`` starts, so they must be right from construction: a builder
    that left the Lite0 cut in eval mode once froze its trainable BatchNorms and collapsed the demo to chance."""
    model = FcddHsc(backbone=backbone, pre_trained=pre_trained, frozen_bn_train_mode=train_mode, minmax="bottle").model
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    trainable = [m for m in batchnorms if any(p.requires_grad for p in m.parameters())]
    frozen = [m for m in batchnorms if not any(p.requires_grad for p in m.parameters())]
    assert frozen, "every backbone freezes some BatchNorm layers by default"
    assert all(m.training for m in trainable)
    assert all(m.training is train_mode for m in frozen)
    assert model.training and model.head.training


def test_optimizer_and_per_paper_epoch_decay() -> None:
    model = FcddHsc(backbone="vgg11_bn", pre_trained=False, passes_per_epoch=10, lr=1e-3, lr_decay=0.985)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD) and group["nesterov"] and group["momentum"] == 0.9
    assert group["weight_decay"] == 1e-4
    trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in group["params"]) == trainable
    rates = []
    for _ in range(25):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:10] == pytest.approx([1e-3] * 10)
    assert rates[10:20] == pytest.approx([1e-3 * 0.985] * 10)
    assert rates[20] == pytest.approx(1e-3 * 0.985**2)


def test_trainer_arguments_convert_paper_epochs() -> None:
    arguments = FcddHsc(
        backbone="vgg11_bn", pre_trained=False, epochs=50, passes_per_epoch=10, precision="32-true"
    ).trainer_arguments
    assert arguments["max_epochs"] == 500 and arguments["check_val_every_n_epoch"] == 10
    assert arguments["precision"] == "32-true" and arguments["num_sanity_val_steps"] == 0


@pytest.mark.parametrize(
    ("backbone", "optimizer", "lr", "passes", "head", "score"),
    [
        ("vgg11_bn", "sgd", 1e-3, (500, -1), "linear", "mean"),  # the paper's recipe: 50 epochs x 10 passes
        ("efficientnet_lite0_multiscale", "adam", 1e-3, (-1, 500), "mlp", "memory"),  # 500 steps, however many passes
    ],
)
def test_unset_training_options_take_the_backbones_documented_defaults(
    backbone: str, optimizer: str, lr: float, passes: tuple[int, int], head: str, score: str
) -> None:
    """The budget is always bounded (no Lightning 1000-pass default) and is what README and docs/backbones.md say."""
    model = FcddHsc(backbone=backbone, pre_trained=False, minmax="bottle")
    budget = model.trainer_arguments
    assert (budget["max_epochs"], budget.get("max_steps", -1)) == passes
    assert (model.optimizer_name, model.lr, model.model.image_score) == (optimizer, lr, score)
    assert isinstance(model.model.head, torch.nn.Conv2d) == (head == "linear")
    optimizer_class = model.configure_optimizers()["optimizer"].__class__.__name__
    assert optimizer_class == {"sgd": "SGD", "adam": "AdamW"}[optimizer]
    overridden = FcddHsc(backbone=backbone, pre_trained=False, minmax="bottle", epochs=2, passes_per_epoch=3, lr=0.1)
    assert overridden.trainer_arguments["max_epochs"] == 6 and overridden.lr == 0.1
    assert "max_steps" not in overridden.trainer_arguments  # a pass budget the user gives replaces the step budget


@pytest.mark.parametrize(
    ("option", "value"),
    [("lr", 0), ("epochs", 0), ("epochs", -1), ("lr_decay", 1.5), ("anomaly_probability", 2.0), ("optimizer", "rms")],
)
def test_out_of_range_options_are_refused_in_one_line(option: str, value: object) -> None:
    from anomalib_fcdd.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=option):
        FcddHsc(backbone="efficientnet_lite0", pre_trained=False, **{option: value})


def make_batch(labels: list[bool], size: int = 80) -> ImageBatch:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(len(labels), size, size, dtype=torch.bool)
    for i, label in enumerate(labels):
        if label:
            masks[i, 20:40, 30:50] = True
    return ImageBatch(
        image=torch.rand(len(labels), 3, size, size, generator=generator),
        gt_label=torch.tensor(labels),
        gt_mask=masks,
    )


@pytest.mark.parametrize("loss", ["fcdd", "per_image", "pixel_balanced"])
def test_training_step_gives_finite_loss_and_gradients(loss: str) -> None:
    model = FcddHsc(pre_trained=False, loss=loss, minmax="bottle", image_size=64)
    model.model.train()
    output = model.training_step(make_batch([False] * 4))
    output["loss"].backward()
    assert torch.isfinite(output["loss"])
    grads = [p.grad for p in model.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_real_anomalies_replace_confetti() -> None:
    model = FcddHsc(
        pre_trained=False,
        minmax="bottle",
        image_size=64,
        augment=False,
        anomaly_probability=1.0,
        confetti_with_real=False,
    )
    batch = make_batch([True, False], size=64)
    images, masks = model.training_inputs(batch)
    assert torch.equal(images, batch.image), "no confetti drawn on a batch with real anomalies"
    assert torch.equal(masks[:, 0], batch.gt_mask)
    model.real_anomalies = True  # set by on_train_start for MVTecFewAnomalies
    images, masks = model.training_inputs(make_batch([False, False], size=64))
    assert not masks.any(), "in the semi-supervised setting an all-normal batch still gets no confetti"


def test_confetti_with_real_anomalies_corrupts_only_the_normal_images() -> None:
    model = FcddHsc(pre_trained=False, minmax="bottle", image_size=64, augment=False, anomaly_probability=1.0)
    assert model.confetti_with_real, "the default backbone mixes confetti into semi-supervised batches"
    assert not FcddHsc(backbone="vgg11_bn", pre_trained=False).confetti_with_real, "the paper's setting does not"
    assert not Fcdd(pre_trained=False).confetti_with_real, "nor does the original FCDD"
    model.real_anomalies = True
    batch = make_batch([True, False, True, False], size=64)
    batch.image = torch.round(batch.image * 255) / 255  # 8-bit levels: confetti changes exactly its masked pixels
    images, masks = model.training_inputs(batch)
    real = torch.tensor([True, False, True, False])
    assert torch.equal(images[real], batch.image[real]) and torch.equal(masks[real, 0], batch.gt_mask[real])
    changed = (images[~real] != batch.image[~real]).any(1, keepdim=True)
    assert masks[~real].any() and torch.equal(changed, masks[~real]), "normal images: confetti, masked where it is"
    assert not batch.gt_mask[~real].any(), "the batch itself is left as it was"


def test_confetti_used_for_normal_batches() -> None:
    model = FcddHsc(pre_trained=False, minmax="bottle", image_size=64, augment=False, anomaly_probability=1.0)
    _, masks = model.training_inputs(make_batch([False, False], size=64))
    assert masks.flatten(1).any(1).all()
    original = Fcdd(pre_trained=False, minmax="bottle", image_size=64, augment=False, anomaly_probability=1.0)
    _, masks = original.training_inputs(make_batch([False, False], size=64))
    assert masks.all(), "original FCDD labels a whole synthetic anomaly as anomalous"


def test_eval_output_contract() -> None:
    model = FcddHsc(backbone="vgg11_bn", pre_trained=False, minmax="bottle").model.eval()
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model(images)
        low = model.low_resolution_map(images)
    assert output.anomaly_map.shape == (2, 1, 224, 224)
    assert low.shape == (2, 1, 28, 28) and (low >= 0).all()
    # Image score = mean of the low-resolution pseudo-Huber map (the reference's reduce_ascore).
    torch.testing.assert_close(output.pred_score, low.mean(dim=(1, 2, 3)))


def test_wrong_channel_count_is_explained() -> None:
    model = FcddHsc(backbone="vgg11_bn", pre_trained=False, minmax="bottle").model.eval()
    with pytest.raises(ValueError, match="Convert grayscale or RGBA"):
        model(torch.rand(1, 1, 64, 64))


def test_image_score_is_the_mean_of_the_low_resolution_map_or_the_peak_of_the_upsampled_one() -> None:
    torch.manual_seed(0)
    mean_model = FcddHsc(backbone="efficientnet_lite0", pre_trained=False, minmax="bottle", image_size=64).model.eval()
    max_model = FcddHsc(
        backbone="efficientnet_lite0", pre_trained=False, minmax="bottle", image_size=64, image_score="max"
    ).model.eval()
    max_model.load_state_dict(mean_model.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        low = mean_model.low_resolution_map(images)
        by_mean, by_max = mean_model(images), max_model(images)
    torch.testing.assert_close(by_mean.pred_score, low.flatten(1).mean(1))
    torch.testing.assert_close(by_max.pred_score, by_max.anomaly_map.flatten(1).max(1).values)
    torch.testing.assert_close(by_max.anomaly_map, by_mean.anomaly_map)


def test_mlp_head_maps_each_feature_vector_to_one_scalar() -> None:
    model = FcddHsc(backbone="efficientnet_lite0", pre_trained=False, minmax="bottle", head="mlp").model
    first, _, _, second = model.head
    assert (first.in_channels, first.out_channels, second.out_channels) == (40, 128, 1)
    assert first.kernel_size == second.kernel_size == (1, 1)


def _documented_training_defaults() -> dict[str, dict[str, str]]:
    """``docs/backbones.md``'s "Training defaults per backbone" table: backbone name -> column -> cell text."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "backbones.md").read_text()
    table = text.split("### Training defaults per backbone", 1)[1].split("\n\n")[2]
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    documented = {}
    for row in rows:
        for name in re.findall(r"`(\w+)`", row[0]):
            documented[name] = dict(zip(header, row, strict=True))
    return documented


def test_docs_table_of_training_defaults_matches_the_code() -> None:
    """Every backbone is in the table of docs/backbones.md, with the optimiser, lr, budget, head (and how many) and
    image score that ``TRAINING_DEFAULTS`` gives it."""
    from anomalib_fcdd.models.fcdd.backbones import BACKBONES, training_defaults

    documented = _documented_training_defaults()
    assert set(documented) == set(BACKBONES)
    for name, row in documented.items():
        defaults = training_defaults(name)
        optimiser = {"sgd": "SGD (Nesterov)", "adam": "AdamW"}[defaults.optimizer]
        documented_optimiser, documented_lr = re.match(r"(.+) ([\d.e-]+),", row["optimiser, lr"]).groups()
        assert (documented_optimiser, float(documented_lr)) == (optimiser, defaults.lr), name
        budget = (
            f"{defaults.steps} steps"
            if defaults.steps is not None
            else f"{defaults.epochs} epochs × {defaults.passes_per_epoch} passes"
        )
        assert row["budget"].startswith(budget), (name, row["budget"])
        schedule = {"exponential": f"× {defaults.lr_decay} per paper epoch", "cosine": "cosine to 0"}
        assert schedule[defaults.lr_schedule] in row["optimiser, lr"], (name, row["optimiser, lr"])
        assert row["head"].lower().startswith(defaults.head), (name, row["head"])
        assert (f"× {defaults.heads}" in row["head"]) == (defaults.heads > 1), (name, row["head"])
        score = {
            "mean": "mean of the low-resolution map",
            "max": "max of the upsampled map",
            "memory": "max of the upsampled distances to a memory of normal features",
        }[defaults.image_score]
        assert row["image score"] == score, (name, row["image score"])
        output_map = "Gaussian-weighted mean" if defaults.normalized_map else "Gaussian sum"
        assert row["output map"].startswith(output_map), (name, row["output map"])
        assert ("`fused_map`" in row["output map"]) == defaults.fused_map, (name, row["output map"])
        assert row["anomaly fill"].startswith(defaults.anomaly_fill), (name, row["anomaly fill"])
        noise = "none" if defaults.feature_noise == 0 else f"σ = {defaults.feature_noise:g}"
        assert row["feature noise"].startswith(noise), (name, row["feature noise"])


def test_lr_schedule_is_checked_and_lr_decay_under_cosine_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigurationError, match="lr_schedule"):
        FcddHsc(pre_trained=False, lr_schedule="linear")
    with pytest.raises(ConfigurationError, match=r"applies to --model\.lr_schedule exponential only"):
        FcddHsc(pre_trained=False, lr_schedule="cosine", lr_decay=0.9)
    assert FcddHsc(pre_trained=False).lr_schedule == "cosine"
    assert FcddHsc(backbone="vgg11_bn", pre_trained=False, minmax="bottle").lr_schedule == "exponential"
    with caplog.at_level("WARNING"):
        FcddHsc(pre_trained=False, lr_decay=0.9)
    assert "lr_decay=0.9 is not used" in caplog.text


@pytest.mark.parametrize(
    ("images", "batch", "steps"),
    [
        (96, 16, 500),  # 20 passes are 120 steps: the 500-step floor (the demo textures)
        (209, 16, 500),  # 262 steps (MVTec-AD bottle)
        (500, 16, 625),  # 20 * 500 / 16
        (801, 16, 1000),  # 1001.25 steps, capped
        (5000, 32, 1000),  # the cap bounds the time on a large training set
        (None, 16, 500),  # the size is unknown: the floor
    ],
)
def test_default_budget_is_20_passes_within_500_to_1000_steps(images: int | None, batch: int, steps: int) -> None:
    """What README and docs/backbones.md say the default budget of ``efficientnet_lite0_multiscale`` is."""
    from anomalib_fcdd.models.fcdd.backbones import training_defaults

    assert training_defaults("efficientnet_lite0_multiscale").step_budget(images, batch) == steps
    assert training_defaults("vgg11_bn").step_budget(images, batch) is None  # a pass budget (the paper's)
