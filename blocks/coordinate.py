"""Coordinate attention, as in the official code.

Paper: `Coordinate Attention for Efficient Mobile Network Design` - https://arxiv.org/abs/2103.02907
Official code: https://github.com/houqb/CoordAttention (``coordatt.py``, ``CoordAtt``).

timm's ``CoordAttn`` differs (bias-free convs, a different bottleneck width), so it cannot load official weights;
this module keeps the official parameter names (``conv1``, ``bn1``, ``conv_h``, ``conv_w``) so they load directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .factory import register_block

__all__ = ["CoordinateAttention"]


@register_block("ca", kind="attention")
class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al., "Coordinate Attention for Efficient Mobile Network Design", arXiv 2103.02907).

    With ``z_h = mean_W(x)`` of shape ``(B, C, H, 1)`` and ``z_w = mean_H(x)`` laid out as ``(B, C, W, 1)``::

        f        = h_swish(BN(conv1([z_h; z_w])))          # (B, M, H + W, 1), M = max(8, C // reduction)
        f_h, f_w = split(f, [H, W])
        a_h      = sigmoid(conv_h(f_h))                    # (B, C, H, 1)
        a_w      = sigmoid(conv_w(f_w)) transposed         # (B, C, 1, W)
        y        = x * a_w * a_h

    ``h_swish(t) = t * relu6(t + 3) / 6``; all three convs are 1x1 with bias. Shapes: ``(B, C, H, W) -> (B, C, H, W)``.

    Args:
        dim: Channel count ``C``.
        reduction: Bottleneck ratio (32 in the paper).
    """

    def __init__(self, dim: int, reduction: int = 32) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        mid = max(8, dim // reduction)
        self.conv1 = nn.Conv2d(dim, mid, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(mid, dim, kernel_size=1)
        self.conv_w = nn.Conv2d(mid, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        z_h = x.mean(dim=3, keepdim=True)
        z_w = x.mean(dim=2, keepdim=True).transpose(2, 3)
        f = self.act(self.bn1(self.conv1(torch.cat([z_h, z_w], dim=2))))
        f_h, f_w = torch.split(f, [H, W], dim=2)
        a_h = self.conv_h(f_h).sigmoid()
        a_w = self.conv_w(f_w).transpose(2, 3).sigmoid()
        return x * a_w * a_h
