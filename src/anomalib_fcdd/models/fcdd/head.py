"""FCDD's head: the map from one feature vector to the scalar ``phi`` whose pseudo-Huber value is the anomaly score.

* ``linear``: the paper's 1x1 convolution ``C -> 1`` (sec. 3).
* ``mlp``: two 1x1 convolutions ``C -> 128 -> 1`` with BatchNorm and ReLU between; still one scalar per feature
  vector, from a nonlinear function of it (not in the paper; docs/backbones.md gives the measurements).

Both heads take ``reference``, the number of leading samples of a training batch that are real features. The rest
are the noisy copies of :mod:`.feature_anomalies`, which only exist while training. The ``mlp`` head's BatchNorm takes
its batch statistics from the real features alone and normalises the copies with them. At inference its running
statistics, which only real features updated, normalise every image, so an image far from the normal features is
scored as the copies were while training. With statistics over the whole mixed batch (copies included) the running
statistics were those of a mixture that inference never sees, and an unsupervised gravel run could end at pixel AUROC
0.87 where the others reached 0.97 (offline ANALYSIS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigurationError

#: ``head`` choices.
HEADS = ("linear", "mlp")
#: Width of the hidden layer of the ``mlp`` head.
MLP_HIDDEN = 128


def check_head(name: str) -> str:
    """``name`` if it is one of :data:`HEADS`, else a :class:`ConfigurationError`."""
    if name not in HEADS:
        raise ConfigurationError(f"Unknown head {name!r} (--model.head); use one of {HEADS}.")
    return name


class LinearHead(nn.Conv2d):
    """The paper's head, ``phi = w . f + b`` per feature vector: a 1x1 convolution ``C -> 1``."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, 1, kernel_size=1, bias=True)

    def forward(self, features: torch.Tensor, reference: int | None = None) -> torch.Tensor:
        """``phi`` of every feature vector; ``reference`` changes nothing here (no batch statistics)."""
        del reference
        return super().forward(features)


class MlpHead(nn.Sequential):
    """``phi = w2 . relu(bn(W1 f + b1)) + b2`` per feature vector, with the batch statistics of the real features."""

    def __init__(self, channels: int, hidden: int = MLP_HIDDEN) -> None:
        super().__init__(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, 1, kernel_size=1),
        )

    def forward(self, features: torch.Tensor, reference: int | None = None) -> torch.Tensor:
        """``phi`` of every feature vector of ``features`` (B x C x h x w).

        While training with ``reference < B``, the first ``reference`` samples alone set the BatchNorm's batch mean
        and variance (and update its running statistics); the remaining samples are normalised with the same two.
        """
        if not self.training or reference is None or reference >= len(features):
            return super().forward(features)
        project, norm, activate, score = self
        hidden = project(features)
        real, copies = hidden[:reference], hidden[reference:]
        normalised_real = norm(real)  # torch's own batch statistics and running-statistics update
        mean = real.mean(dim=(0, 2, 3), keepdim=True)
        variance = real.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = norm.weight.view(1, -1, 1, 1) * torch.rsqrt(variance + norm.eps)
        normalised_copies = (copies - mean) * scale + norm.bias.view(1, -1, 1, 1)
        return score(activate(torch.cat([normalised_real, normalised_copies])))


def build_head(name: str, channels: int) -> LinearHead | MlpHead:
    """The head called ``name`` (see :data:`HEADS`) for ``channels``-long feature vectors."""
    return LinearHead(channels) if check_head(name) == "linear" else MlpHead(channels)
