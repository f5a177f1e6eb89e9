"""FCDD network: normalisation, a cut CNN, a 1x1 head, the pseudo-Huber map and Gaussian upsampling.

For an image ``x`` in [0, 1] the network computes::

    phi = head(features(normalise(x)))        B x K x h x w   (h = H / 8 for the stride-8 backbones)
    H   = mean_k sqrt(phi_k^2 + 1) - 1        B x 1 x h x w   pseudo-Huber distance to the hypersphere centre (the
                                                              origin), averaged over the K heads (K = 1: the paper)
    A   = upsample(H)                         B x 1 x H x W   Gaussian receptive-field upsampling

In eval mode it returns anomalib's ``InferenceBatch`` with ``anomaly_map = A`` and the image score ``pred_score``:
``mean(H)``, the mean of the *low-resolution* map, as the reference's ``reduce_ascore`` does (``image_score="mean"``),
``max(A)``, the peak of the smoothed map (``image_score="max"``), which does not dilute a small defect by the
normal area around it, or ``max(upsample(D))`` with ``D`` each feature vector's distance to a small memory of normal
ones (``image_score="memory"``, :mod:`.memory_bank`; not in the paper). With ``fused_map`` (not in the paper) the map
is ``upsample(H / s_H + D / s_D)``, both scores divided by their spreads over normal training positions
(:mod:`.map_fusion`); otherwise it is ``A``.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import nn

from ...errors import ConfigurationError
from .acceleration import Acceleration
from .anomaly_map import ReceptiveField, ReceptiveFieldUpsampler
from .backbones import WeightsError, build_backbone, derive_receptive_field
from .feature_anomalies import FeatureNoise
from .map_fusion import CalibrationSample, MapFusion
from .memory_bank import MEMORY_DIM, MEMORY_SIZE, FeatureMemory
from .pre_processing import InputNormalization, WeightsNormalization, resolve_input_normalization

logger = logging.getLogger(__name__)


class FcddTrainOutput(NamedTuple):
    """What the network returns in train mode: one channel per head (``heads``)."""

    low_res: torch.Tensor  # H, B x heads x h x w
    anomaly_map: torch.Tensor  # A, B x heads x H x W
    #: H of the noisy copies of the batch's features (B x heads x h x w, every pixel anomalous;
    #: :mod:`.feature_anomalies`), ``None`` when ``feature_noise`` is 0.
    feature_anomalies: torch.Tensor | None = None


def pseudo_huber(phi: torch.Tensor) -> torch.Tensor:
    """``sqrt(phi^2 + 1) - 1``, computed as ``phi^2 / (sqrt(phi^2 + 1) + 1)`` to avoid cancellation near 0."""
    squared = phi * phi
    return squared / (torch.sqrt(squared + 1) + 1)


#: ``head`` and ``image_score`` choices.
HEADS = ("linear", "mlp")
IMAGE_SCORES = ("mean", "max", "memory")
#: Width of the hidden layer of the ``mlp`` head.
MLP_HIDDEN = 128


def check_image_score(name: str) -> str:
    """``name`` if it is one of :data:`IMAGE_SCORES`, else a :class:`ConfigurationError`."""
    if name not in IMAGE_SCORES:
        raise ConfigurationError(f"Unknown image_score {name!r} (--model.image_score); use one of {IMAGE_SCORES}.")
    return name


def check_head(name: str) -> str:
    """``name`` if it is one of :data:`HEADS`, else a :class:`ConfigurationError`."""
    if name not in HEADS:
        raise ConfigurationError(f"Unknown head {name!r} (--model.head); use one of {HEADS}.")
    return name


def check_heads(count: int) -> int:
    """``count`` if it is a positive number of heads, else a :class:`ConfigurationError`."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigurationError(f"heads must be a whole number of at least 1 (--model.heads), got {count!r}.")
    return count


def build_head(name: str, channels: int, heads: int = 1) -> nn.Module:
    """``heads`` independent maps from a ``channels``-long feature vector to a scalar ``phi`` each (see :data:`HEADS`).

    The heads are one module, side by side: ``linear`` is one ``C -> heads`` convolution, ``mlp`` a ``C -> heads x 128``
    convolution, BatchNorm and ReLU, then a grouped ``heads x 128 -> heads`` one, so head ``k`` sees only its own 128
    hidden units. Each head's weights start from the same distribution a lone head's would, and with ``heads=1`` the
    module (and its state dict) is the single head's.
    """
    check_heads(heads)
    if check_head(name) == "linear":
        return nn.Conv2d(channels, heads, kernel_size=1, bias=True)
    hidden = heads * MLP_HIDDEN
    return nn.Sequential(
        nn.Conv2d(channels, hidden, kernel_size=1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, heads, kernel_size=1, groups=heads),
    )


class FcddModel(nn.Module):
    """The FCDD network: ``A = upsample(pseudo_huber(head(backbone(normalise(x)))))`` (the paper's sec. 3).

    Args:
        backbone: feature extractor name (see :mod:`.backbones`).
        pre_trained: load ImageNet weights for the backbone. If they cannot be fetched (offline, no cache), the model
            is still built -- so a checkpoint can be restored without network -- but refuses to run with the fetch's
            error until a state dict covering the backbone has been loaded.
        weights_path: local weight file for the backbone (takes precedence over downloads).
        frozen_modules: number of leading backbone modules to freeze; ``None`` = the backbone's default.
        gauss_std: sigma of the upsampling Gaussian (12 in the paper).
        minmax: MVTec-AD category name, six numbers, or ``None`` (computed from training data before training); used
            by the ``lcn_minmax`` normalisation only.
        input_normalization: ``lcn_minmax`` (the paper's LCN + min-max), ``weights`` (the statistics the pretrained
            backbone expects) or ``auto`` (:func:`~.pre_processing.resolve_input_normalization`).
        frozen_bn_train_mode: keep the frozen BatchNorm layers in train mode while training, so they use batch
            statistics and keep adapting their running statistics, as the reference does. ``False`` freezes them
            fully (eval mode).
        accelerate: channels-last layout and BN folding at inference (:mod:`.acceleration`); the same function up
            to float rounding.
        input_normalization: ``lcn_minmax``, ``weights`` or ``auto``
            (:func:`~.pre_processing.resolve_input_normalization`).
        head: ``linear``, the paper's 1x1 convolution ``C -> 1``, or ``mlp``, two 1x1 convolutions ``C -> 128 -> 1``
            with BatchNorm and ReLU between: still one scalar per feature vector, from a nonlinear function of it.
        image_score: ``mean`` of the low-resolution map (the reference's), ``max`` of the upsampled map, or
            ``memory``: the maximum of the upsampled distances to a memory of normal features (:mod:`.memory_bank`),
            which ``FcddHsc`` builds when training ends.
        memory_size, memory_dim: vectors in that memory and their PCA dimensions (``image_score="memory"`` only).
        memory_neighbourhood: the memory compares feature vectors averaged over this many neighbours per side (odd;
            1 = the vectors themselves).
        feature_noise: while training, also score a copy of the batch's features moved off by Gaussian noise of this
            relative size, as anomalies (:mod:`.feature_anomalies`); 0 turns it off (the paper).
        heads: number of heads trained side by side, each from its own random start and on its own loss; the map is
            the mean of their pseudo-Huber maps, ``H = mean_k h(phi_k)``. One head's result depends on its start
            (``benchmarks/results/offline/ANALYSIS.md``); the mean of several does much less.
        normalized_map: at inference, upsample the map as a weighted mean of the low-resolution scores
            (``ReceptiveFieldUpsampler(normalized=True)``: ``up(H) / up(1)``) instead of the reference's Gaussian
            sum, which scales a score at the image's corner by 0.27 and in the middle by 3.5, hiding defects at
            the border. Training keeps the reference's sum for its loss (training on the mean did worse, offline
            ``ANALYSIS.md``), and the memory's distances keep it too.
        fused_map: at inference, the map is the sum of the heads' scores and the memory's distances, each divided by
            its spread over normal training positions (:mod:`.map_fusion`), instead of the heads' scores alone. The
            model then keeps the memory whatever ``image_score`` is.
        map_gauss_std: sigma of the output map's upsampler at inference; ``None`` = ``gauss_std``. The training
            loss (eq. 5 is taken on the upsampled map) and the memory's image score keep ``gauss_std`` (12, the
            reference code's value for MVTec-AD).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0_multiscale",
        pre_trained: bool = True,
        weights_path: str | None = None,
        frozen_modules: int | None = None,
        gauss_std: float = 12.0,
        minmax: str | list[float] | None = None,
        frozen_bn_train_mode: bool = True,
        accelerate: bool = True,
        input_normalization: str = "auto",
        head: str = "linear",
        image_score: str = "mean",
        feature_noise: float = 0.0,
        heads: int = 1,
        memory_size: int = MEMORY_SIZE,
        memory_dim: int = MEMORY_DIM,
        memory_neighbourhood: int = 1,
        normalized_map: bool = False,
        fused_map: bool = False,
        map_gauss_std: float | None = None,
    ) -> None:
        super().__init__()
        self.image_score = check_image_score(image_score)
        self.feature_noise = FeatureNoise(feature_noise) if feature_noise > 0 else None
        self.backbone_name = backbone
        self.acceleration = Acceleration(accelerate)
        built = build_backbone(backbone, pre_trained, weights_path, frozen_modules)
        # Only models that score with it carry the memory (and the fusion its spreads), so other checkpoints keep
        # their keys.
        self.memory = (
            FeatureMemory(memory_size, memory_dim, memory_neighbourhood, built.memory_channels)
            if image_score == "memory" or fused_map
            else None
        )
        self.map_fusion = MapFusion() if fused_map else None
        self.input_normalization = resolve_input_normalization(input_normalization, backbone, pre_trained)
        if self.input_normalization == "lcn_minmax":
            self.normalization: nn.Module = InputNormalization(minmax)
        else:
            self.normalization = WeightsNormalization(built.input_mean, built.input_std)
        self.features = built.features
        self.head = build_head(head, built.out_channels, heads)
        field = derive_receptive_field(self.features)
        #: The reference's upsampler: the training loss's maps and the memory's distances.
        self.upsampler = ReceptiveFieldUpsampler(field, gauss_std)
        #: The output map's at inference: the same, or one of its own width (``map_gauss_std``) or normalised form
        #: (``normalized_map``). Parameter-free, so neither changes the state dict.
        map_std = gauss_std if map_gauss_std is None else map_gauss_std
        self.map_upsampler = (
            self.upsampler
            if map_std == gauss_std and not normalized_map
            else ReceptiveFieldUpsampler(field, map_std, normalized=normalized_map)
        )
        self.missing_weights = built.missing_weights
        if self.missing_weights is not None:
            # Offline without the ImageNet file: fine when a checkpoint is about to supply every backbone weight
            # (load_from_checkpoint, anomalib export/test --ckpt_path); otherwise the first use raises the error.
            self.features.register_load_state_dict_pre_hook(self._clear_missing_weights_if_covered)
            logger.info("FCDD: %s backbone weights deferred until a checkpoint is loaded.", backbone)
        self.frozen_bn_train_mode = frozen_bn_train_mode
        self._frozen_batchnorms: list[nn.Module] = []
        for module in built.frozen:
            module.requires_grad_(False)
            self._frozen_batchnorms += [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.register_load_state_dict_post_hook(_forget_folded_backbone)
        self.register_load_state_dict_pre_hook(self._score_without_a_saved_memory)
        self.register_load_state_dict_pre_hook(self._map_without_saved_spreads)
        self.acceleration.prepare(self)
        # Lightning keeps each module's mode at the start of fit, so the network starts in the modes ``train`` sets
        # (trainable layers training, frozen BatchNorms as ``frozen_bn_train_mode`` says), whatever a builder left.
        self.train()

    @property
    def receptive_field(self) -> ReceptiveField:
        """Receptive field of one low-resolution pixel (size, stride, offset in input pixels)."""
        return self.upsampler.receptive_field

    def train(self, mode: bool = True) -> FcddModel:
        """Switch modes; frozen BatchNorm layers stay in eval mode unless ``frozen_bn_train_mode``."""
        super().train(mode)
        if mode:
            self.acceleration.forget()
            if not self.frozen_bn_train_mode:
                for module in self._frozen_batchnorms:
                    module.eval()
        return self

    def _clear_missing_weights_if_covered(
        self, module: nn.Module, state_dict: dict, prefix: str, *args: object
    ) -> None:
        """``load_state_dict`` pre-hook on ``features``: a state dict holding all its tensors replaces the weights."""
        del args
        if all(prefix + key in state_dict for key in module.state_dict()):
            self.missing_weights = None

    def _score_without_a_saved_memory(self, module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        """``load_state_dict`` pre-hook: a checkpoint saved without a memory (trained before ``image_score="memory"``
        became the multi-scale default, or with another score) scores images by the heads' peak, as it was trained,
        instead of failing on the missing keys."""
        del module, args
        if self.memory is None or prefix + "memory.vectors" in state_dict:
            return
        logger.warning(
            "FCDD: the loaded weights hold no image-score memory; images are scored by the peak of the map "
            "(image_score='max'), as such a model was trained. Retrain for the memory's image score."
        )
        self.memory = None
        self.map_fusion = None
        self.image_score = "max"

    def _map_without_saved_spreads(self, module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        """``load_state_dict`` pre-hook: a checkpoint saved without the fused map's spreads (trained before
        ``fused_map``, or without it) draws the heads' map, as it was trained to, instead of failing on the missing
        key. A memory it does not carry either is not needed for the map then."""
        del module, args
        if self.map_fusion is None or prefix + "map_fusion.spreads" in state_dict:
            return
        logger.warning(
            "FCDD: the loaded weights hold no spreads for the fused map; the map is the heads' alone "
            "(fused_map=False), as such a model was trained. Retrain for the map of heads and memory."
        )
        self.map_fusion = None
        if self.image_score != "memory":
            self.memory = None

    def require_weights(self) -> None:
        """Raise the deferred :class:`WeightsError` when pretrained weights were asked for but never came."""
        if self.missing_weights is not None:
            raise WeightsError(
                f"{self.missing_weights}\n(The model was built without them so that a checkpoint could supply every "
                "backbone weight; none was loaded before it was used.)"
            )

    @property
    def features_change_in_training(self) -> bool:
        """Whether training changes what the backbone computes: a trainable layer, or frozen BatchNorms kept in train
        mode (their running statistics move). A memory of its features then has to be rebuilt after training."""
        trainable = any(parameter.requires_grad for parameter in self.features.parameters())
        return trainable or (self.frozen_bn_train_mode and bool(self._frozen_batchnorms))

    def low_resolution_map(self, images: torch.Tensor) -> torch.Tensor:
        """Pseudo-Huber map ``H`` (B x 1 x h x w) of [0, 1] images: the mean over the heads of each one's map."""
        return self.map_of_features(self.backbone_features(images))

    def map_of_features(self, features: torch.Tensor) -> torch.Tensor:
        """``H`` (B x 1 x h x w) from the backbone's features: the mean of the heads' pseudo-Huber distances."""
        return pseudo_huber(self.head_output(features)).mean(dim=1, keepdim=True)

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map (B x C x h x w) of [0, 1] images: what the head scores."""
        self.require_weights()
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"FCDD expects RGB image batches of shape B x 3 x H x W with values in [0, 1], got "
                f"{tuple(images.shape)}. Convert grayscale or RGBA images to RGB first (PIL: image.convert('RGB'))."
            )
        normalised = self.acceleration.input(self.normalization(images))
        backbone = self.acceleration.backbone(self.features, self.training)
        return backbone(normalised)

    def head_output(self, features: torch.Tensor) -> torch.Tensor:
        """``phi``, the heads' outputs (B x heads x h x w), in fp32: every score is its pseudo-Huber distance to 0.

        Under bf16 autocast a conv rounds its output to bf16 (8 significant bits: the low-resolution map of one image
        would fall into a few hundred distinct values). At inference the head therefore runs in fp32 on the (exact)
        bf16 features. While training it stays in bf16 like the rest of the network, since an fp32 head would keep
        an fp32 copy of its input for the backward pass.
        """
        device_type = features.device.type
        if not torch.is_grad_enabled() and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.head(features.float())
        return self.head(features).float()

    def forward(self, images: torch.Tensor) -> FcddTrainOutput | InferenceBatch:
        """Train mode: :class:`FcddTrainOutput`; eval mode: ``InferenceBatch(pred_score, anomaly_map)``."""
        if self.training:
            return self.training_output(images)
        features = self.backbone_features(images)
        low_res = self.map_of_features(features)
        distances = self.memory.distance_map(features) if self.memory is not None else None
        fused = self.map_fusion(low_res, distances) if self.map_fusion is not None and distances is not None else None
        anomaly_map = self.map_upsampler(low_res if fused is None else fused, images.shape[-2:])
        if self.image_score == "memory" and distances is not None:
            upsampled = self.upsampler(distances, images.shape[-2:])
            return InferenceBatch(pred_score=upsampled.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)
        if self.image_score == "max":
            return InferenceBatch(pred_score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)
        return InferenceBatch(pred_score=low_res.mean(dim=(1, 2, 3)), anomaly_map=anomaly_map)

    @torch.no_grad()
    def calibrate_map(self, sample: CalibrationSample) -> None:
        """Measure the fused map's spreads on normal training positions (``fused_map`` only): the heads' scores
        of ``sample.features`` and the memory's distances of ``sample.memory_features``, one vector at a time (the
        heads are 1 x 1 convolutions, so a vector scores as it does inside a map)."""
        if self.map_fusion is None or self.memory is None:
            return
        was_training = self.training
        self.eval()
        try:
            vectors = sample.features.to(next(self.head.parameters()).device)
            heads_scores = self.map_of_features(vectors[:, :, None, None].float())
            distances = self.memory.distances(sample.memory_features.to(vectors.device))
        finally:
            self.train(was_training)
        self.map_fusion.calibrate(heads_scores.flatten(), distances)

    def training_output(self, images: torch.Tensor) -> FcddTrainOutput:
        """Maps of a training batch and, with ``feature_noise``, of its noisy feature copies: one channel per head.

        The head scores both halves in one call, so its BatchNorm (``mlp`` head) normalises them with the same
        statistics, as it will at inference. Each head keeps its own channel, so that each trains on its own loss.
        """
        features = self.backbone_features(images)
        if self.feature_noise is not None:
            features = torch.cat([features, self.feature_noise(features)])
        scores = pseudo_huber(self.head_output(features))
        low_res, noisy = scores[: len(images)], scores[len(images) :]
        batch, heads = low_res.shape[:2]
        per_head = self.upsampler(low_res.reshape(batch * heads, 1, *low_res.shape[-2:]), images.shape[-2:])
        anomaly_map = per_head.view(batch, heads, *per_head.shape[-2:])
        return FcddTrainOutput(low_res, anomaly_map, noisy if self.feature_noise is not None else None)


def _forget_folded_backbone(module: FcddModel, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: new weights make the folded inference backbone stale."""
    del incompatible_keys
    module.acceleration.forget()
