"""The three hypersphere losses against hand computations on tiny batches."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_fcdd.models.fcdd.loss import PUSH_EPS, FcddLoss, fcdd_loss, per_image_loss, pixel_balanced_loss, push


def p(x: float) -> float:
    """-log(1 - exp(-x)) at the loss's shifted argument, in plain float64 math."""
    return -math.log(1 - math.exp(-(x + PUSH_EPS)))


# Image 0: one anomalous pixel (value 1.0); image 1: all normal.
A = torch.tensor([[[0.5, 1.0], [2.0, 0.1]], [[0.3, 0.3], [0.3, 0.3]]], dtype=torch.float64)
Y = torch.tensor([[[0, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)


def test_push_matches_definition_and_is_finite_at_zero() -> None:
    for x in (0.01, 0.5, 3.0, 20.0):
        assert push(torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(p(x), rel=1e-12)
    zero = torch.zeros(1, requires_grad=True)
    value = push(zero)
    value.backward()
    assert math.isfinite(value.item()) and value.item() == pytest.approx(-math.log(PUSH_EPS), rel=1e-3)
    assert torch.isfinite(zero.grad).all() and zero.grad.item() < 0


def test_fcdd_loss_eq4_by_hand() -> None:
    image0 = (0.5 + 2.0 + 0.1) / 4 + p(1.0 / 4)
    image1 = 0.3
    assert fcdd_loss(A, Y).item() == pytest.approx((image0 + image1) / 2, rel=1e-9)


def test_per_image_loss_by_hand() -> None:
    image0 = (0.5 + 2.0 + 0.1) / 3 + p(1.0)
    image1 = 0.3
    assert per_image_loss(A, Y).item() == pytest.approx((image0 + image1) / 2, rel=1e-9)


def test_pixel_balanced_loss_eq5_by_hand() -> None:
    balance = 7 / 1  # |J0| / |J1| over the whole batch
    total = (0.5 + 2.0 + 0.1) + balance * p(1.0) + 4 * 0.3
    assert pixel_balanced_loss(A, Y).item() == pytest.approx(total / 8, rel=1e-9)


def test_channel_dimension_is_accepted() -> None:
    assert FcddLoss("fcdd")(A[:, None], Y[:, None]).item() == pytest.approx(fcdd_loss(A, Y).item())


@pytest.mark.parametrize("name", ["fcdd", "per_image", "pixel_balanced"])
def test_batch_without_anomalies_is_mean_of_normal_scores(name: str) -> None:
    values = torch.tensor([[[0.2, 0.4], [0.6, 0.8]], [[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    loss = FcddLoss(name)(values, torch.zeros_like(values, dtype=torch.bool))
    assert loss.item() == pytest.approx((0.5 + 1.0) / 2)


def test_batch_with_every_pixel_anomalous_by_hand() -> None:
    values = torch.tensor([[[0.2, 0.4], [0.6, 0.8]], [[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    ones = torch.ones_like(values, dtype=torch.bool)
    assert fcdd_loss(values, ones).item() == pytest.approx((p(0.5) + p(1.0)) / 2, rel=1e-9)
    per_image = ((p(0.2) + p(0.4) + p(0.6) + p(0.8)) / 4 + p(1.0)) / 2
    assert per_image_loss(values, ones).item() == pytest.approx(per_image, rel=1e-9)
    # Eq. (5) weights anomalous pixels by |J0|/|J1| = 0/8: the formula gives exactly 0, without NaN.
    assert pixel_balanced_loss(values, ones).item() == 0.0


@pytest.mark.parametrize("name", ["fcdd", "per_image", "pixel_balanced"])
@pytest.mark.parametrize("mask_kind", ["mixed", "none", "all"])
def test_finite_loss_and_gradient_with_zero_on_anomalous_pixel(name: str, mask_kind: str) -> None:
    values = torch.tensor([[[0.0, 1.0], [2.0, 0.0]], [[0.0, 0.5], [0.0, 0.0]]], requires_grad=True)
    masks = {
        "mixed": torch.tensor([[[1, 0], [0, 1]], [[1, 0], [0, 0]]], dtype=torch.bool),
        "none": torch.zeros(2, 2, 2, dtype=torch.bool),
        "all": torch.ones(2, 2, 2, dtype=torch.bool),
    }[mask_kind]
    loss = FcddLoss(name)(values, masks)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(values.grad).all()
    if mask_kind == "mixed":  # a zero-valued anomalous pixel is pushed outwards (negative gradient)
        assert values.grad[0, 0, 0] < 0


@pytest.mark.parametrize("loss_fn", [fcdd_loss, per_image_loss, pixel_balanced_loss])
def test_gradcheck(loss_fn: object) -> None:
    generator = torch.Generator().manual_seed(3)
    values = (torch.rand(3, 4, 4, generator=generator, dtype=torch.float64) + 0.1).requires_grad_()
    masks = torch.rand(3, 4, 4, generator=generator) > 0.7
    masks[2] = False
    assert torch.autograd.gradcheck(lambda v: loss_fn(v, masks), (values,))


def test_unknown_loss_and_shape_mismatch_are_explained() -> None:
    with pytest.raises(ValueError, match="pixel_balanced"):
        FcddLoss("hsc")
    with pytest.raises(ValueError, match="differ in shape"):
        fcdd_loss(torch.zeros(2, 4, 4), torch.zeros(2, 8, 8))
