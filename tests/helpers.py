"""Checks that more than one test file makes."""

from __future__ import annotations

import torch
from torch import nn


def assert_same_trainable_gradients(
    model: nn.Module, plain: nn.Module, actual: torch.Tensor, expected: torch.Tensor
) -> None:
    """Back-propagate both maps; the same parameters get a gradient, and bit-identical ones."""
    actual.mean().backward()
    expected.mean().backward()
    for mine, theirs in zip(model.parameters(), plain.parameters(), strict=True):
        assert (mine.grad is None) == (theirs.grad is None)
        if mine.grad is not None:
            assert torch.equal(mine.grad, theirs.grad)
