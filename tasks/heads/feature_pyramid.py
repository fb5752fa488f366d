"""Any timm backbone as a torchvision detection backbone: ``features_only`` levels -> per-level norm -> FPN.

torchvision's ``BackboneWithFPN`` needs a torchvision ``IntermediateLayerGetter``; timm's ``features_only`` models
already return the pyramid, so this wrapper only adds what the papers' detection backbones add on top: a norm per
output level (BiFormer's ``extra_norms``, Swin/DaViT's ``norm{i}``), BatchNorm statistics kept fixed (mmdet's
``norm_eval``), frozen BatchNorm and frozen early stages (``frozen_stages``), and torchvision's
:class:`FeaturePyramidNetwork` initialised and extended as mmdetection 2.x's ``FPN`` (Xavier-uniform convs; RetinaNet's
P6/P7 by ``add_extra_convs='on_input'``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from timm.layers import LayerNorm2d, freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from ..backbone import create_backbone

__all__ = ["ExtraLevelsOnInput", "TimmFeaturePyramid"]

_EXTRA_BLOCKS = ("maxpool", "p6p7", "none")


class ExtraLevelsOnInput(ExtraFPNBlock):
    """RetinaNet's P6/P7 as mmdetection's ``FPN(add_extra_convs='on_input')`` (Lin et al., arXiv 1708.02002).

    ``P6 = conv3x3_s2(C5)`` on the top backbone level (the FPN's input, not its output), ``P7 = conv3x3_s2(P6)`` with
    no ReLU between them (mmdet's default ``relu_before_extra_convs=False``). torchvision's ``LastLevelP6P7`` differs
    twice: it uses P5 whenever ``in_channels == out_channels`` and puts a ReLU before P7.

    Args:
        in_channels: channels of the top backbone level ``C5``.
        out_channels: FPN width.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1])
        return [*p, p6, self.p7(p6)], [*names, "p6", "p7"]


class TimmFeaturePyramid(nn.Module):
    """Feature pyramid (Lin et al., "Feature Pyramid Networks for Object Detection", arXiv 1612.03144) on timm features.

    ``C_i = norm_i(backbone(x)[i])`` for the selected levels; ``P = FPN(C)`` with lateral 1x1 convs, top-down nearest
    upsampling and 3x3 output convs, plus ``extra_blocks``: ``"maxpool"`` (a stride-2 max-pooled top level, Mask
    R-CNN's ``pool``), ``"p6p7"`` (RetinaNet's P6/P7 from the top backbone level, :class:`ExtraLevelsOnInput`), or
    ``"none"``. Every FPN conv is Xavier-uniform initialised with zero bias (mmdet ``FPN.init_weights``; torchvision
    uses Kaiming-uniform). Output: an ordered dict of
    ``(B, out_channels, H / s, W / s)`` maps, names ``"0", "1", ...`` then ``"pool"`` / ``"p6", "p7"``, which is
    what torchvision's detectors consume (``self.out_channels``).

    Args:
        backbone: timm model name (any registered model with ``features_only`` support).
        out_indices: backbone levels fed to the FPN (0 = stride 4, ..., 3 = stride 32).
        out_channels: FPN width.
        extra_blocks: extra pyramid levels, see above.
        level_norm: add a ``LayerNorm2d`` on every selected level before the FPN.
        norm_eval: keep the backbone's BatchNorm layers in eval mode while training (running statistics fixed, affine
            parameters trained): mmdet's ``norm_eval=True``, what BiFormer's detection backbone sets.
        freeze_bn: replace the backbone's BatchNorm by frozen BatchNorm (statistics and affine fixed).
        frozen_stages: freeze the backbone up to and including level ``frozen_stages`` (-1: nothing frozen).
        pretrained: start the backbone from its default pretrained weights.
        pretrained_file: start the backbone from this local weights file (``tasks/backbone.py``).
        backbone_kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``n_win``, ...).
    """

    def __init__(
        self,
        backbone: str,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        out_channels: int = 256,
        extra_blocks: str = "maxpool",
        level_norm: bool = True,
        norm_eval: bool = False,
        freeze_bn: bool = False,
        frozen_stages: int = -1,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if extra_blocks not in _EXTRA_BLOCKS:
            raise ValueError(f"extra_blocks={extra_blocks!r} must be one of {_EXTRA_BLOCKS}")
        self.body = create_backbone(
            backbone,
            pretrained=pretrained,
            pretrained_file=pretrained_file,
            features_only=True,
            out_indices=tuple(out_indices),
            **backbone_kwargs,
        )
        channels = self.body.feature_info.channels()
        self.level_norms = nn.ModuleList(LayerNorm2d(c) if level_norm else nn.Identity() for c in channels)
        extra: ExtraFPNBlock | None = None
        if extra_blocks == "maxpool":
            extra = LastLevelMaxPool()
        elif extra_blocks == "p6p7":
            extra = ExtraLevelsOnInput(channels[-1], out_channels)
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra)
        for module in self.fpn.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.out_channels = out_channels
        self.norm_eval = norm_eval
        if freeze_bn:
            self.body = freeze_batch_norm_2d(self.body)
        self.frozen_stages = frozen_stages
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        """Freeze every backbone parameter up to the end of level ``frozen_stages`` (stem included)."""
        if self.frozen_stages < 0:
            return
        info = self.body.feature_info.info  # all levels, not only the selected ones
        if self.frozen_stages >= len(info):
            raise ValueError(f"frozen_stages={self.frozen_stages} but the backbone has {len(info)} levels")
        last = info[self.frozen_stages]["module"].replace(".", "_")  # features_only flattens "stages.0"
        children = list(self.body.named_children())
        ends = [i for i, (name, _) in enumerate(children) if name == last or name.startswith(f"{last}_")]
        if not ends:
            raise ValueError(f"frozen_stages is not supported for this backbone: no top-level module {last!r}")
        for _, module in children[: ends[-1] + 1]:
            for p in module.parameters():
                p.requires_grad_(False)
            module.eval()
        self._frozen = [n for n, p in self.body.named_parameters() if not p.requires_grad]

    def train(self, mode: bool = True) -> TimmFeaturePyramid:
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if self.frozen_stages >= 0:  # frozen stages keep their norm statistics (mmdet's norm_eval for them)
            for name, module in self.body.named_children():
                if any(p.startswith(f"{name}.") for p in self._frozen):
                    module.eval()
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        levels = OrderedDict((str(i), norm(f)) for i, (norm, f) in enumerate(zip(self.level_norms, feats)))
        return self.fpn(levels)
