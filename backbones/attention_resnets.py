"""ResNet-50 with channel / coordinate attention plug-ins, built on timm's own ``ResNet``.

Papers:
* `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
* `ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks` - https://arxiv.org/abs/1910.03151
* `Coordinate Attention for Efficient Mobile Network Design` - https://arxiv.org/abs/2103.02907
* `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507

timm's ``Bottleneck`` applies its ``attn_layer`` after ``conv3``/``bn3`` and before the residual add, the SE-ResNet
placement that ECA-Net (``BangguWu/ECANet`` ``models/eca_resnet.py``) uses too. Registered here:

* ``resnet50_eca_k3557``: ECA-Net50 as released, a plain ResNet-50 stem with fixed kernels 3, 5, 5, 7 per stage;
  ``checkpoint_filter_fn`` renames the official ``*.eca.*`` keys. timm's ``ecaresnet50d`` is a ResNet-50-D with the
  adaptive kernels (5, 5, 5, 7), so it cannot load these weights.
* ``strata_resnet50_ca``: coordinate attention (official ``CoordAtt``: reduction 32, at least 8 channels) at the same
  place.

SE-ResNet-50 is not registered: timm's ``seresnet50`` already matches SENet (reduction 16, 28,088,024 parameters).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from blocks.channel import EfficientChannelAttention
from blocks.coordinate import CoordinateAttention

__all__ = ["checkpoint_filter_fn", "coord_attn_layer", "eca_stage_layer"]

# ECA-Net's released ``eca_resnet50_k3557``: ResNet-50 stage output width -> ECA kernel size
ECA_K3557 = {256: 3, 512: 5, 1024: 5, 2048: 7}


def eca_stage_layer(
    channels: int,
    kernel_sizes: dict[int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> EfficientChannelAttention:
    """ECA with the kernel size of the stage whose blocks output ``channels`` (timm's ``attn_layer`` signature)."""
    if channels not in kernel_sizes:
        raise ValueError(f"kernel_sizes has no entry for {channels} channels; give one per stage width")
    return EfficientChannelAttention(channels, kernel_size=kernel_sizes[channels]).to(device=device, dtype=dtype)


def coord_attn_layer(
    channels: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> CoordinateAttention:
    """``CoordinateAttention`` with timm's ``attn_layer`` signature."""
    return CoordinateAttention(channels).to(device=device, dtype=dtype)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official ECA-Net checkpoint (``layerX.Y.eca.conv.weight``, maybe ``module.``-prefixed) onto timm's
    ResNet (``layerX.Y.se.conv.weight``); every other name already matches, so native checkpoints pass through."""
    return {k.removeprefix("module.").replace(".eca.", ".se."): v for k, v in state_dict.items()}


def _create_attention_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    return build_model_with_cfg(ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        # NOTE official ECA-Net weights (Google Drive / Baidu) load from a local file through checkpoint_filter_fn
        "resnet50_eca_k3557": _cfg(origin_url="https://github.com/BangguWu/ECANet", paper_ids="arXiv:1910.03151"),
        "strata_resnet50_ca": _cfg(paper_ids="arXiv:2103.02907"),
    }
)


@register_model
def resnet50_eca_k3557(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ECA-Net50 as released (``eca_resnet50_k3557``): ResNet-50, ECA kernels 3, 5, 5, 7 per stage."""
    model_args = dict(
        block=Bottleneck,
        layers=(3, 4, 6, 3),
        block_args=dict(attn_layer=partial(eca_stage_layer, kernel_sizes=ECA_K3557)),
    )
    return _create_attention_resnet("resnet50_eca_k3557", pretrained, **dict(model_args, **kwargs))


@register_model
def strata_resnet50_ca(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 with coordinate attention after ``bn3`` of every bottleneck."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), block_args=dict(attn_layer=coord_attn_layer))
    return _create_attention_resnet("strata_resnet50_ca", pretrained, **dict(model_args, **kwargs))
