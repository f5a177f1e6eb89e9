"""A small memory of normal feature vectors: the image score of ``image_score="memory"``.

Not in the paper. FCDD's heads draw good maps, but they sort whole images less well than a nearest-neighbour
memory on the *same* frozen features: the images they rank too high carry rare normal content (highlights, stains, a
tile's edge) that a loss pulling the bulk of the normal features to the centre does not keep, and a memory selected
to cover the feature space does (``benchmarks/results/gap_diagnosis.md``). The image score ``pred_score`` comes from
the memory alone; the map is FCDD's, or with ``fused_map`` the heads' scores and the memory's distances added, each
over its spread (:mod:`.map_fusion`).

Built when training ends, before the first validation (``FcddHsc._build_memory``; again only if training changes
the backbone's features), from the clean normal training images, decoded and resized once as test images are:

1. ``PositionPool``: at most :data:`POOL_SIZE` feature vectors, the same number of random positions from every
   image, so memory stays bounded however large the training set. What it pools is what the memory compares
   (:meth:`FeatureMemory.memory_features`): the channels of the backbone's ``memory_channels`` (for the multi-scale
   Lite0, its stride-8 and deepest stages, the pair PatchCore reads), each vector averaged over its k x k neighbours,
   zeros past the map's border as PatchCore pools (:func:`local_features`);
2. a PCA basis of the pool, ``z = (f - mu) W`` with ``W`` the ``dim`` leading principal directions (C x dim):
   stores a vector in ``dim`` numbers instead of C (152 for the default backbone's memory);
3. greedy k-centre selection (PatchCore's coreset) of ``size`` pool vectors in that subspace: start anywhere, then
   repeatedly add the vector farthest from everything chosen.

At inference every position's distance to its nearest memory vector, ``d = min_m |z - z_m|``, forms a low-resolution
map; the image score is the maximum of its Gaussian upsampling (:class:`~.anomaly_map.ReceptiveFieldUpsampler`), the
reference's sum that the training loss sees (the normalised form of ``normalized_map`` sorted Magnetic-Tile's images
1.6 points worse, offline ``ANALYSIS.md``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

#: Defaults: vectors kept, their PCA dimensions (2000 x 96 FP16 values: 0.39 MB with the 152 x 96 basis), and the
#: bound on the candidate pool the selection draws from (larger pools were worse: the greedy selection then spends its
#: vectors on outliers, offline ANALYSIS.md). Of the sizes measured (1000-4000 vectors, 32-96 dimensions;
#: ``benchmarks/results/gap_diagnosis.md``) the smaller ones lost up to 11 points of image AUROC on the textures
#: against this one (gravel, 1000 x 32), and none but 4000 x 64 did better on Magnetic-Tile.
MEMORY_SIZE = 2000
MEMORY_DIM = 96
POOL_SIZE = 50_000


class PositionPool:
    """Up to ``capacity`` feature vectors drawn from ``images`` images, ``ceil(capacity / images)`` random positions
    from each (all of an image's positions when it has fewer); held as float32."""

    def __init__(self, capacity: int, images: int, generator: torch.Generator | None = None) -> None:
        if capacity < 1 or images < 1:
            raise ValueError(f"A pool needs a capacity and images, got capacity={capacity}, images={images}.")
        self.capacity = capacity
        self.per_image = math.ceil(capacity / images)
        self.generator = generator
        self._parts: list[torch.Tensor] = []
        self._count = 0

    def add(self, features: torch.Tensor) -> None:
        """Draw from a B x C x h x w batch of feature maps (stops taking once full)."""
        room = self.capacity - self._count
        if room <= 0:
            return
        vectors = features.detach().float().flatten(2).transpose(1, 2)  # B x positions x C
        keep = min(self.per_image, vectors.shape[1])
        order = torch.rand(vectors.shape[:2], generator=self.generator).argsort(dim=1)[:, :keep].to(vectors.device)
        picked = torch.gather(vectors, 1, order[..., None].expand(-1, -1, vectors.shape[2])).flatten(0, 1)[:room]
        self._parts.append(picked.cpu())
        self._count += len(picked)

    def vectors(self) -> torch.Tensor:
        """The pooled vectors (N x C), joined once and kept joined; an error when nothing was added."""
        if not self._parts:
            raise ValueError("The memory's pool is empty: the training set gave no normal image.")
        if len(self._parts) > 1:
            self._parts = [torch.cat(self._parts)]
        return self._parts[0]


ChannelRanges = tuple[tuple[int, int], ...]


def select_channels(features: torch.Tensor, channels: ChannelRanges) -> torch.Tensor:
    """The ``[start, stop)`` channel ranges ``channels`` of B x C x h x w ``features``, joined in order; all of them
    when ``channels`` is empty."""
    if not channels:
        return features
    return torch.cat([features[:, start:stop] for start, stop in channels], dim=1)


def local_features(features: torch.Tensor, neighbourhood: int, zero_padded: bool = True) -> torch.Tensor:
    """Each position's feature vector averaged over its ``neighbourhood`` x ``neighbourhood`` neighbours (PatchCore's
    locally aware patch features), or the vectors themselves with a neighbourhood of 1.

    ``zero_padded``: a border position's window reaches past the map, and counts what lies there as zeros, as
    anomalib's PatchCore pools (``AvgPool2d(3, 1, 1)``): with k = 3 a corner vector is 4/9 of its neighbours' mean and
    an edge vector 6/9, so border positions are compared mostly with border positions of the memory. Otherwise the
    window averages the neighbours that exist. Zeros sorted every category's images at least as well, within the pool
    draws' spread on gravel, and Magnetic-Tile's 3.3 points better (offline ``ANALYSIS.md``, "Border positions").
    """
    if neighbourhood == 1:
        return features
    return F.avg_pool2d(features, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=zero_padded)


def read_features(
    features: torch.Tensor, channels: ChannelRanges, neighbourhood: int, zero_padded: bool = True
) -> torch.Tensor:
    """What a memory with these ``channels``, ``neighbourhood`` and border compares: the feature maps cut to the
    channel ranges (:func:`select_channels`), then averaged over neighbours (:func:`local_features`)."""
    return local_features(select_channels(features, channels), neighbourhood, zero_padded)


def principal_basis(vectors: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``mu`` (C) and the ``dim`` leading principal directions ``W`` (C x dim) of N x C ``vectors``.

    Eigenvectors of the covariance ``(X - mu)^T (X - mu) / N``, in float64, by decreasing eigenvalue; each direction's
    sign is fixed (largest component positive) so the basis does not flip between runs of the same data.
    """
    data = vectors.double()
    mean = data.mean(dim=0)
    centred = data - mean
    values, directions = torch.linalg.eigh(centred.T @ centred / len(data))
    basis = directions[:, values.argsort(descending=True)[: min(dim, data.shape[1])]]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    return mean.float(), (basis * signs).float()


def greedy_coreset(points: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of ``size`` rows of N x d ``points`` by greedy k-centre selection, starting from row 0.

    Each step adds the row farthest from everything chosen and updates every row's squared distance to its nearest
    chosen row with one matrix-vector product, ``|z - c|^2 = |z|^2 - 2 z.c + |c|^2``.
    """
    points = points.float()
    norms = (points * points).sum(dim=1)
    chosen = [0]
    nearest = (norms - 2 * points @ points[0] + norms[0]).clamp_min_(0)
    for _ in range(min(size, len(points)) - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        torch.minimum(nearest, (norms - 2 * points @ points[index] + norms[index]).clamp_min_(0), out=nearest)
    return torch.tensor(chosen)


class FeatureMemory(nn.Module):
    """Coreset of normal feature vectors in a PCA subspace; :meth:`distance_map` scores features against it.

    ``channels`` (``[start, stop)`` ranges of the backbone's channels; empty: all), ``neighbourhood`` and
    ``zero_padded`` say what the memory compares (:meth:`memory_features`). They are saved with the buffers
    (``get_extra_state``), so a memory always reads features as it was built, whatever the defaults of the model it is
    loaded into. The three buffers start empty; a state dict brings its own shapes, so a trained memory loads into a
    freshly built model.
    """

    def __init__(
        self,
        size: int = MEMORY_SIZE,
        dim: int = MEMORY_DIM,
        neighbourhood: int = 1,
        channels: ChannelRanges = (),
        zero_padded: bool = True,
    ) -> None:
        super().__init__()
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"The memory's neighbourhood must be an odd whole number, got {neighbourhood}.")
        if any(not 0 <= start < stop for start, stop in channels):
            raise ValueError(f"The memory's channels must be [start, stop) ranges with start < stop, got {channels}.")
        self.size, self.dim, self.neighbourhood, self.zero_padded = size, dim, neighbourhood, bool(zero_padded)
        self.channels: ChannelRanges = tuple((int(start), int(stop)) for start, stop in channels)
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("basis", torch.zeros(0, 0))
        self.register_buffer("vectors", torch.zeros(0, 0))

    def memory_features(self, features: torch.Tensor) -> torch.Tensor:
        """What the memory stores and compares: the backbone's feature maps cut to ``channels``, then averaged over
        ``neighbourhood`` x ``neighbourhood`` neighbours, zeros past the border if ``zero_padded``
        (:func:`read_features`)."""
        return read_features(features, self.channels, self.neighbourhood, self.zero_padded)

    @property
    def ready(self) -> bool:
        """Whether a memory has been built or loaded."""
        return self.vectors.numel() > 0

    @torch.no_grad()
    def fit(self, pool: torch.Tensor) -> None:
        """Build the memory from N x C normal feature vectors: PCA basis, then the greedy coreset in it."""
        mean, basis = principal_basis(pool, self.dim)
        projected = (pool.float() - mean) @ basis
        chosen = greedy_coreset(projected, self.size)
        device = self.mean.device
        self.mean, self.basis, self.vectors = mean.to(device), basis.to(device), projected[chosen].to(device)

    def distance_map(self, features: torch.Tensor) -> torch.Tensor:
        """``min_m |(f - mu) W - z_m|`` at every position of the backbone's B x C x h x w ``features`` (taken through
        :meth:`memory_features`): B x 1 x h x w, in fp32.

        Squared distances as ``min_m (|z_m|^2 - 2 z.z_m) + |z|^2``: one matrix product with the bias added inside it
        (``addmm``, an ONNX ``Gemm``) and one reduction over the memory; ``|z|^2`` is the same for every ``m``, so it
        is added after the minimum (half the time of forming every full distance first). Clamped at 0 against
        rounding before the square root; fp32 throughout, since bf16 would lose the small difference of large terms.
        """
        batch, _, height, width = features.shape
        with torch.autocast(features.device.type, enabled=False):
            features = self.memory_features(features.float())
            flat = features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1])  # B*hw x C
            return self.distances(flat).view(batch, 1, height, width)

    def distances(self, vectors: torch.Tensor) -> torch.Tensor:
        """``min_m |(v - mu) W - z_m|`` of N x C vectors already read as the memory reads them (N, fp32); the
        computation :meth:`distance_map` describes."""
        if not self.ready:
            raise RuntimeError(
                "image_score='memory' and fused_map need the memory of normal features that training builds at its "
                "end; this model has none. Train it (anomalib-fcdd train / Engine.fit), or load a checkpoint trained "
                "with them."
            )
        with torch.autocast(vectors.device.type, enabled=False):
            projected = (vectors.float() - self.mean) @ self.basis  # N x dim
            memory_norms = (self.vectors * self.vectors).sum(dim=1)
            nearest = torch.addmm(memory_norms, projected, self.vectors.T, alpha=-2).amin(dim=1)
            return (nearest + (projected * projected).sum(dim=1)).clamp_min(0).sqrt()

    def get_extra_state(self) -> dict[str, Any]:
        """How the saved memory reads features (restored by :meth:`set_extra_state`)."""
        return {
            "channels": [list(pair) for pair in self.channels],
            "neighbourhood": self.neighbourhood,
            "zero_padded": self.zero_padded,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the reading; one saved before borders were zero-padded (no ``zero_padded``) averaged only the
        neighbours that exist."""
        self.channels = tuple((int(start), int(stop)) for start, stop in state["channels"])
        self.neighbourhood = int(state["neighbourhood"])
        self.zero_padded = bool(state.get("zero_padded", False))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Take the saved memory's shapes before loading it (the buffers start empty). A memory saved without its
        reading (before the reading was stored with it) compared every channel, unaveraged: it loads as such."""
        for name in ("mean", "basis", "vectors"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        if prefix + "vectors" in state_dict and prefix + "_extra_state" not in state_dict:
            state_dict[prefix + "_extra_state"] = {"channels": [], "neighbourhood": 1, "zero_padded": False}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, neighbourhood={self.neighbourhood}, channels={list(self.channels)}, "
            f"zero_padded={self.zero_padded}, ready={self.ready}"
        )
