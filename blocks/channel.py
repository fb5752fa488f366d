"""Channel attention: squeeze-and-excitation and efficient channel attention.

Papers:
* `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507
* `ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks` - https://arxiv.org/abs/1910.03151

Both reuse timm's layers (``SEModule``, ``EcaModule``) with the papers' hyper-parameters, so parameter names are
timm's (``fc1``/``fc2`` for SE, ``conv`` for ECA; ECA's ``conv.weight`` is also the official checkpoints' name).
"""

from __future__ import annotations

import math

from timm.layers import EcaModule, SEModule

from .factory import register_block

__all__ = ["EfficientChannelAttention", "SqueezeExcite", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0) -> int:
    """ECA's adaptive kernel size: the nearest odd integer to ``|(log2(C) + b) / gamma|``, rounding up even values.

    Gives 3, 5, 5, 5, 7 for C = 64, 256, 512, 1024, 2048. Unlike timm's ``EcaModule`` the result is not floored at
    3, so C < 8 gives k = 1 as the paper's rule does.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


@register_block("se", kind="attention")
class SqueezeExcite(SEModule):
    """Squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks", arXiv 1709.01507).

    ``y = x * sigmoid(W2 relu(W1 GAP(x) + b1) + b2)`` with ``W1: C -> C // reduction`` and ``W2: C // reduction -> C``
    (1x1 convs with bias). Shapes: ``(B, C, H, W) -> (B, C, H, W)``.

    Args:
        dim: Channel count ``C``.
        reduction: SENet's ratio ``r``; the bottleneck has ``max(1, C // r)`` channels (SENet's rule, unlike timm's
            default which rounds up to a multiple of 8).
        rd_channels: Bottleneck width, overriding ``reduction``.
    """

    def __init__(self, dim: int, reduction: int = 16, rd_channels: int | None = None) -> None:
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        rd = rd_channels if rd_channels is not None else max(1, dim // reduction)
        if rd < 1:
            raise ValueError(f"rd_channels must be >= 1, got {rd}")
        super().__init__(dim, rd_channels=rd)


@register_block("eca", kind="attention")
class EfficientChannelAttention(EcaModule):
    """Efficient channel attention (Wang et al., "ECA-Net: Efficient Channel Attention for Deep Convolutional
    Neural Networks", arXiv 1910.03151).

    ``y = x * sigmoid(conv1d_k(GAP(x)))`` where the 1-D convolution (one in/out channel, no bias, zero padding
    ``(k - 1) // 2``) slides over the channel axis. Shapes: ``(B, C, H, W) -> (B, C, H, W)``.

    Args:
        dim: Channel count ``C``.
        kernel_size: Fixed odd kernel size (the released checkpoints set it per stage, e.g. k3557); ``None`` picks it
            from ``C`` by the paper's rule (:func:`eca_kernel_size`).
        gamma: ``gamma`` of the adaptive rule.
        beta: ``b`` of the adaptive rule.
    """

    def __init__(self, dim: int, kernel_size: int | None = None, gamma: float = 2.0, beta: float = 1.0) -> None:
        k = eca_kernel_size(dim, gamma, beta) if kernel_size is None else kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {k}")
        super().__init__(channels=None, kernel_size=k)
