"""Decode heads for semantic segmentation on a four-level feature pyramid (strides 4, 8, 16, 32).

Written here because no maintained library ships them for a plain list of timm features: mmsegmentation needs its
registry and mmcv, and segmentation_models_pytorch is not a project dependency and wraps its own encoders. Each head
follows its paper and the mmsegmentation configuration the BiFormer / DaViT papers trained with (channel widths,
pooling scales, norm + ReLU after every conv) and is initialised as mmsegmentation's: conv + norm + ReLU blocks
Kaiming-normal (``fan_out``, mmcv ``ConvModule``), classifiers ``N(0, 0.01)`` (``BaseDecodeHead.conv_seg``), the
Semantic FPN neck's plain convs Xavier-uniform (``FPN``), biases zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FCNHead", "SemanticFPNHead", "UperNetHead"]


def _conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int = 3) -> nn.Sequential:
    conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True))


def _classifier(in_chs: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_chs, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


def _xavier_conv(in_chs: int, out_chs: int, kernel_size: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    """UperNet decode head (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", arXiv 1807.10221).

    ``P_4 = conv(concat(C_4, up(PPM_s(C_4)) for s in pool_scales))`` (pyramid pooling); top-down
    ``L_i = lateral_i(C_i) + up(L_{i+1})``, ``P_i = conv3x3(L_i)``; output
    ``cls(conv3x3(concat(up(P_i) for all i)))`` at stride 4. Input: four maps ``(B, C_i, H / s_i, W / s_i)``;
    output ``(B, num_classes, H / 4, W / 4)``.

    Args:
        in_channels: channels of the four input levels.
        num_classes: output classes.
        channels: width of every conv (512 in mmsegmentation's UperNet).
        pool_scales: pyramid pooling output sizes.
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_bn_relu(in_channels[-1], channels, 1)) for s in pool_scales
        )
        self.bottleneck = _conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_bn_relu(channels, channels) for _ in in_channels[:-1])
        self.fpn_bottleneck = _conv_bn_relu(len(in_channels) * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = _classifier(channels, num_classes)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        top = feats[-1]
        pooled = [_resize(branch(top), top.shape[-2:]) for branch in self.ppm]
        laterals = [lateral(f) for lateral, f in zip(self.lateral, feats[:-1])]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.cls(self.dropout(fused))


class SemanticFPNHead(nn.Module):
    """Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", arXiv 1901.02446).

    FPN ``P_i`` (``fpn_channels``) from the four levels; each ``P_i`` goes through ``max(1, log2(s_i / 4))`` blocks of
    ``conv3x3 -> BN -> ReLU (-> 2x upsample)`` to stride 4 with ``channels`` channels; the sum is classified by a
    1x1 conv. Input four maps; output ``(B, num_classes, H / 4, W / 4)``.

    Args:
        in_channels: channels of the four input levels.
        num_classes: output classes.
        fpn_channels: FPN width (256).
        channels: width of the upsampling branches (128).
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        fpn_channels: int = 256,
        channels: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(_xavier_conv(c, fpn_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(_xavier_conv(fpn_channels, fpn_channels, 3) for _ in in_channels)
        self.branches = nn.ModuleList()
        for level in range(len(in_channels)):
            blocks = [_conv_bn_relu(fpn_channels if j == 0 else channels, channels) for j in range(max(1, level))]
            self.branches.append(nn.ModuleList(blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.cls = _classifier(channels, num_classes)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        laterals = [lateral(f) for lateral, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        size = laterals[0].shape[-2:]
        out = None
        for level, (conv, branch) in enumerate(zip(self.fpn_convs, self.branches)):
            x = conv(laterals[level])
            for block in branch:
                x = block(x)
                if level > 0:
                    x = _resize(x, (x.shape[-2] * 2, x.shape[-1] * 2))
            x = _resize(x, size) if x.shape[-2:] != size else x  # NOTE: odd sizes round up at each stride
            out = x if out is None else out + x
        return self.cls(self.dropout(out))


class FCNHead(nn.Module):
    """Auxiliary FCN head (Long et al., "Fully Convolutional Networks", arXiv 1411.4038) on one level (stage 3).

    ``cls(dropout(conv3x3_bn_relu(C)))``; trained with a down-weighted loss (0.4) to help the backbone, unused at
    inference.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        channels: hidden width (256).
        dropout: dropout before the classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = _conv_bn_relu(in_channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.dropout(self.conv(x)))
