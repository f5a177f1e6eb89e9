"""The receptive field of a backbone's output pixels, derived from its layers.

The Gaussian upsampler (:mod:`..anomaly_map`) needs the size ``r``, stride ``j`` and offset ``s`` of the input patch
each output pixel sees. They are *derived* by walking the convolution and pooling layers along the main path with the
standard recurrences (the paper's sec. 3 upsampling; Liznerski et al. 2021, appendix)::

    j' = j * stride,   r' = r + (k_eff - 1) * j,   s' = s + ((k_eff - 1) / 2 - p_left) * j,   k_eff = d * (k - 1) + 1

Shortcut branches (ResNet ``downsample``) are skipped: they see a subset of the main path's field. Depthwise
convolutions need nothing special (groups do not change the geometry). ``tests/test_backbones.py`` checks every
registered backbone against the support of the input gradient.
"""

from __future__ import annotations

from torch import nn

from ..anomaly_map import ReceptiveField

#: Submodule names whose layers are not on the main path of a residual network.
SHORTCUT_NAMES = ("downsample", "shortcut", "skip")
#: Layer classes (timm) that pad like TensorFlow's "same" at run time: the odd pixel goes to the bottom/right.
_DYNAMIC_SAME = ("Conv2dSame", "MaxPool2dSame", "AvgPool2dSame")


def _pair(value: int | tuple[int, ...]) -> int:
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"Non-square kernels/strides are not supported for receptive-field derivation: {value}")
        return int(value[0])
    return int(value)


def _left_padding(layer: nn.Module, kernel: int, step: int, dilation: int) -> int:
    """Padding before the first input pixel (top/left) of a conv or pool layer.

    TF "same" (timm's ``*Same`` layers) pads ``total = (ceil(n / step) - 1) * step + k_eff - n`` pixels, the smaller
    half first; for an input side ``n`` that is a multiple of ``step`` this is ``(k_eff - step) // 2``. PyTorch's
    ``padding='same'`` (stride 1 only) also puts the smaller half first: ``(k_eff - 1) // 2``.
    """
    effective = dilation * (kernel - 1) + 1
    if type(layer).__name__ in _DYNAMIC_SAME:
        return max(effective - step, 0) // 2
    padding = getattr(layer, "padding", 0)
    if isinstance(padding, str):
        return 0 if padding == "valid" else (effective - 1) // 2
    return _pair(padding)


def _explicit_padding(layer: nn.Module) -> int | None:
    """Left padding of a standalone padding module (``nn.ZeroPad2d`` etc.), ``None`` for other layers."""
    if not isinstance(layer, nn.ZeroPad2d | nn.ConstantPad2d | nn.ReflectionPad2d | nn.ReplicationPad2d):
        return None
    left, _, top, _ = layer.padding
    if left != top:
        raise ValueError(f"Asymmetric padding between axes is not supported: {layer.padding}")
    return int(left)


def derive_receptive_field(network: nn.Module) -> ReceptiveField:
    """Receptive field of one output pixel of ``network``, from its conv, pooling and padding layers in order.

    ``network.named_modules()`` must list the main-path layers in data-flow order (true for torchvision VGG and the
    timm ResNets / EfficientNets). Offsets are in pixel-centre coordinates: input pixel ``k`` is centred at ``k``, and
    output pixel ``i`` at ``j * i + s``. For TF-"same" layers the input side at each layer is assumed to be a multiple
    of its stride (any input that is a multiple of 8 for the stride-8 cuts). A network that combines branches
    declares its field itself, as a ``receptive_field`` attribute (:class:`~.multi_scale.MultiScaleFeatures`).
    """
    declared = getattr(network, "receptive_field", None)
    if isinstance(declared, ReceptiveField):
        return declared
    size, stride, offset = 1, 1, 0.0
    for name, layer in network.named_modules():
        if any(part in SHORTCUT_NAMES for part in name.split(".")):
            continue
        pad = _explicit_padding(layer)
        if pad is not None:
            offset -= pad * stride
            continue
        if not isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            continue
        kernel = _pair(layer.kernel_size)
        step = _pair(layer.stride)
        dilation = _pair(getattr(layer, "dilation", 1))
        effective = dilation * (kernel - 1) + 1
        left = _left_padding(layer, kernel, step, dilation)
        size = size + (effective - 1) * stride
        offset = offset + ((effective - 1) / 2 - left) * stride
        stride = stride * step
    return ReceptiveField(size=size, stride=stride, offset=offset)
