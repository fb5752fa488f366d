"""Strata hybrids: convolution with coordinate attention early, routing and dual attention late.

Papers behind the split and the blocks:
* `AsCAN: Asymmetric Convolution-Attention Networks` - https://arxiv.org/abs/2411.04967 (conv early, attention late)
* `Coordinate Attention for Efficient Mobile Network Design` - https://arxiv.org/abs/2103.02907
* `BiFormer: Vision Transformer with Bi-Level Routing Attention` - https://arxiv.org/abs/2303.08810
* `DaViT: Dual Attention Vision Transformers` - https://arxiv.org/abs/2204.03645

The project's own models, assembled by :class:`~backbones.hierarchical.HierarchicalNet`:

* stages 1-2 (strides 4, 8): inverted residuals with coordinate attention (``blocks`` key ``mbconv``). High-res
  maps hold most of the tokens, where attention is dearest and a local conv does the work; coordinate attention
  adds position-aware long-range gating along rows and columns at the cost of two pooled 1-D maps.
* stage 3 (stride 16): BiFormer blocks with bi-level routing attention (``bra``): content-routed sparse global
  attention where most of the depth sits and the token count is still large at detection sizes (~50x84).
* stage 4 (stride 32): DaViT dual blocks (``dual``): window attention that covers the whole 7x7 map at 224 and
  stays local at dense-task sizes, plus channel-group attention whose receptive field is always global.

The stem and downsampling are BiFormer's (two 3x3 s2 convs, 3x3 s2 conv + BatchNorm), the head is BatchNorm ->
average pool -> Linear. ``pico`` is sized to train on a laptop CPU at 64x64 (the demo); ``tiny`` and ``small``
have BiFormer-T / -S widths and parameter budgets.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from torch import Tensor

from .hierarchical import HierarchicalNet, build_hierarchical

__all__ = ["checkpoint_filter_fn"]


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: HierarchicalNet) -> dict[str, Tensor]:
    """Native checkpoints only: unwrap a ``{"model": ...}`` / ``{"state_dict": ...}`` container."""
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    return state_dict


def _hybrid_kwargs(
    expand_ratio: float = 4.0,
    n_win: int = 7,
    topk: int = 16,
    window_size: int = 7,
    mlp_ratio: float = 3.0,
    **kwargs: Any,
) -> dict[str, Any]:
    """Per-stage blocks of the hybrid; ``n_win`` / ``topk`` (stage 3) and ``window_size`` (stage 4) are for dense
    tasks to change."""
    conv = dict(expand_ratio=expand_ratio, attn="ca")
    return dict(
        block=("mbconv", "mbconv", "bra", "dual"),
        block_kwargs=(
            conv,
            conv,
            dict(n_win=n_win, topk=topk, mlp_ratio=mlp_ratio, side_dwconv=5),
            dict(window_size=window_size, mlp_ratio=mlp_ratio),
        ),
        stem_type="deep",
        downsample_type="conv_norm",
        norm_layer="batchnorm2d",
        final_norm="batchnorm2d",
        head_type="linear",
        **kwargs,
    )


def _create_hybrid(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    return build_hierarchical(variant, pretrained, checkpoint_filter_fn, **_hybrid_kwargs(**kwargs))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "apache-2.0",
        **kwargs,
    }


# NOTE: no released weights yet; train with configs/imagenet/ and load with pretrained_cfg_overlay=dict(file=...)
default_cfgs = generate_default_cfgs(
    {
        "strata_hybrid_pico": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
        "strata_hybrid_tiny": _cfg(),
        "strata_hybrid_small": _cfg(),
    }
)


@register_model
def strata_hybrid_pico(pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    """CPU-demo size (1.3 M parameters): one block per stage but two in stage 3, widths 24-192."""
    model_args = dict(depths=(1, 1, 1, 1), embed_dims=(24, 48, 96, 192))
    return _create_hybrid("strata_hybrid_pico", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def strata_hybrid_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    """BiFormer-T's widths and parameter budget (a dual block is two attention layers, so stage 4 has one)."""
    model_args = dict(depths=(2, 2, 8, 1), embed_dims=(64, 128, 256, 512))
    return _create_hybrid("strata_hybrid_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def strata_hybrid_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    """BiFormer-S's widths and parameter budget (a dual block is two attention layers, so stage 4 has two)."""
    model_args = dict(depths=(4, 4, 18, 2), embed_dims=(64, 128, 256, 512))
    return _create_hybrid("strata_hybrid_small", pretrained=pretrained, **dict(model_args, **kwargs))
