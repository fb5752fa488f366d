"""MobileNetV2 with coordinate attention, built with timm's EfficientNet builder.

Papers:
* `Coordinate Attention for Efficient Mobile Network Design` - https://arxiv.org/abs/2103.02907
* `MobileNetV2: Inverted Residuals and Linear Bottlenecks` - https://arxiv.org/abs/1801.04381

Reproduces the official ``mbv2_ca.py`` (https://github.com/houqb/CoordAttention): timm's MobileNetV2 skeleton
(ReLU6, stem 32, head 1280, dropout 0.1 before the classifier) with a ``CoordinateAttention`` block on the expanded
channels after the depthwise 3x3 conv of every inverted residual whose expansion ratio is not 1. timm's
``InvertedResidual`` calls its ``se`` module exactly there, so the block goes in as the builder's ``se_layer``.
``checkpoint_filter_fn`` loads the official checkpoint (``features.N.conv.*`` keys).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._builder import build_model_with_cfg, pretrained_cfg_for_features
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures
from torch import nn

from blocks.coordinate import CoordinateAttention

__all__ = ["checkpoint_filter_fn", "coord_attn_se_layer"]

# NOTE '_se1' only switches the attention on in a block; CoordinateAttention sets its own width (max(8, C // 32)).
_MBV2_CA_ARCH = [
    ["ds_r1_k3_s1_c16"],
    ["ir_r2_k3_s2_e6_c24_se1"],
    ["ir_r3_k3_s2_e6_c32_se1"],
    ["ir_r4_k3_s2_e6_c64_se1"],
    ["ir_r3_k3_s1_e6_c96_se1"],
    ["ir_r3_k3_s2_e6_c160_se1"],
    ["ir_r1_k3_s1_e6_c320_se1"],
]


def coord_attn_se_layer(
    channels: int,
    act_layer: type[nn.Module] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CoordinateAttention:
    """``CoordinateAttention`` with the call signature timm's inverted residual gives its ``se_layer``.

    The block is built on the expanded (depthwise) channel count. ``act_layer`` is ignored: coordinate attention
    always uses h-swish. Having no ``rd_ratio`` argument tells timm's builder not to rescale it.
    """
    return CoordinateAttention(channels).to(device=device, dtype=dtype)


# official index inside ``features.N.conv`` -> timm sub-module, for blocks with / without expansion
_OFFICIAL_IR = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "se", "7": "conv_pwl", "8": "bn3"}
_OFFICIAL_DS = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}
_OFFICIAL_CA = {"conv2": "conv_h", "conv3": "conv_w"}
_OFFICIAL_FIXED = {
    "features.0.0.": "conv_stem.",
    "features.0.1.": "bn1.",
    "conv.0.": "conv_head.",
    "conv.1.": "bn2.",
    "classifier.1.": "classifier.",
}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official ``mbv2_ca.py`` checkpoint onto this model; native checkpoints pass through unchanged.

    Official ``features.0`` is the stem, ``features.N`` (N >= 1) the N-th inverted residual counted across stages,
    ``conv`` the 1x1 head and ``classifier.1`` the linear layer; the attention's ``conv2`` / ``conv3`` are
    ``conv_h`` / ``conv_w`` here.
    """
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if "conv_stem.weight" in state_dict:
        return state_dict
    blocks = [(f"blocks.{s}.{b}", blk) for s, stage in enumerate(model.blocks) for b, blk in enumerate(stage)]
    out = {}
    for key, value in state_dict.items():
        new_key = next((new + key[len(old) :] for old, new in _OFFICIAL_FIXED.items() if key.startswith(old)), None)
        m = re.match(r"features\.(\d+)\.conv\.(\d+)\.(.+)", key)
        if m is not None:
            name, block = blocks[int(m.group(1)) - 1]
            table = _OFFICIAL_IR if isinstance(block, InvertedResidual) else _OFFICIAL_DS
            rest = m.group(3)
            if table[m.group(2)] == "se":
                sub, _, leaf = rest.partition(".")
                rest = f"{_OFFICIAL_CA.get(sub, sub)}.{leaf}"
            new_key = f"{name}.{table[m.group(2)]}.{rest}"
        if new_key is None:
            raise ValueError(f"state_dict key {key!r} is neither official mbv2_ca nor timm; pass a matching checkpoint")
        out[new_key] = value
    return out


def _create_mobilenetv2_ca(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    # NOTE as timm's efficientnet: plain features_only builds EfficientNetFeatures; with a feature_cls / feature_cfg
    # (e.g. 'getter', which uses forward_intermediates) the full model is wrapped by build_model_with_cfg.
    model_cls: type[nn.Module] = EfficientNet
    kwargs_filter = None
    features_cls_mode = False
    features_cfg_mode = False
    if kwargs.pop("features_only", False):
        if "feature_cfg" in kwargs or "feature_cls" in kwargs:
            features_cfg_mode = True
        else:
            features_cls_mode = True
            model_cls = EfficientNetFeatures
            kwargs_filter = ("num_classes", "num_features", "head_conv", "global_pool")
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        features_only=features_cfg_mode,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=not features_cls_mode,
        kwargs_filter=kwargs_filter,
        **kwargs,
    )
    if features_cls_mode:
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return model


def _gen_mobilenetv2_ca(
    variant: str, channel_multiplier: float = 1.0, pretrained: bool = False, **kwargs: Any
) -> EfficientNet:
    round_chs_fn = partial(round_channels, multiplier=channel_multiplier)
    model_kwargs = dict(
        block_args=decode_arch_def(_MBV2_CA_ARCH),
        num_features=max(1280, round_chs_fn(1280)),
        stem_size=32,
        round_chs_fn=round_chs_fn,
        norm_layer=kwargs.pop("norm_layer", None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, "relu6"),
        se_layer=coord_attn_se_layer,
        drop_rate=kwargs.pop("drop_rate", 0.1),
        **kwargs,
    )
    return _create_mobilenetv2_ca(variant, pretrained, **model_kwargs)


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
        "first_conv": "conv_stem",
        "classifier": "classifier",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        # NOTE official weights (Google Drive) load from a local file through checkpoint_filter_fn
        "mobilenetv2_100_ca": _cfg(origin_url="https://github.com/houqb/CoordAttention", paper_ids="arXiv:2103.02907"),
    }
)


@register_model
def mobilenetv2_100_ca(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """MobileNetV2 1.0 with coordinate attention (official ``mbv2_ca``, 3.95 M parameters)."""
    return _gen_mobilenetv2_ca("mobilenetv2_100_ca", 1.0, pretrained=pretrained, **kwargs)
