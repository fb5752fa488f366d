"""DaViT: Dual Attention Vision Transformers, assembled from ``blocks/dual.py`` on the hierarchical backbone.

Paper: `DaViT: Dual Attention Vision Transformers` - https://arxiv.org/abs/2204.03645 (ECCV 2022)
Official code: https://github.com/dingmyu/davit; timm's ``timm/models/davit.py`` was read for the layout (not copied).

The DaViT topology as a configuration of :class:`~backbones.hierarchical.HierarchicalNet`: a 7x7 stride-4 conv +
LayerNorm2d stem, LayerNorm2d + 2x2 stride-2 conv downsampling, ``dual`` blocks (window attention then channel-group
attention, each with conv position encodings and an MLP), and a pool -> LayerNorm -> Linear head. Module names equal
timm's ``DaVit``, so timm's ``davit_*`` state dicts load unchanged and give the same outputs whenever the feature maps
are multiples of the window (e.g. 224 x 224 with window 7); ``checkpoint_filter_fn`` also converts the official
``dingmyu/davit`` checkpoints. Registered as ``strata_davit_*`` so that timm's own ``davit_*`` stay available.

Difference from the official code and timm: when a map is not a multiple of the window, the padded positions are
masked out of the window attention (``blocks/dual.py``), so outputs differ from timm's there, by design.
"""

from __future__ import annotations

import re
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from torch import Tensor

from .hierarchical import HierarchicalNet, build_hierarchical

__all__ = ["checkpoint_filter_fn"]


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: HierarchicalNet) -> dict[str, Tensor]:
    """Remap an official ``dingmyu/davit`` checkpoint to this layout; native and timm ``davit_*`` ones are unchanged."""
    state_dict = state_dict.get("state_dict", state_dict)
    if "stem.conv.weight" in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^patch_embeds\.0\.proj\.", "stem.conv.", k)
        k = re.sub(r"^patch_embeds\.0\.norm\.", "stem.norm.", k)
        k = re.sub(r"^patch_embeds\.(\d+)\.proj\.", r"stages.\1.downsample.conv.", k)
        k = re.sub(r"^patch_embeds\.(\d+)\.norm\.", r"stages.\1.downsample.norm.", k)
        k = re.sub(r"^main_blocks\.(\d+)\.", r"stages.\1.blocks.", k)
        k = k.replace(".cpe.0.", ".cpe1.").replace(".cpe.1.", ".cpe2.")
        k = re.sub(r"^norms\.", "head.norm.", k)
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v
    return out


def _davit_kwargs(
    num_heads: tuple[int, ...] = (3, 6, 12, 24),
    window_size: int = 7,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    cpe_act: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Translate DaViT arguments into :class:`HierarchicalNet` arguments."""
    common = dict(window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, cpe_act=cpe_act)
    return dict(
        block="dual",
        block_kwargs=[dict(common, num_heads=h) for h in num_heads],
        stem_type="patch",
        downsample_type="norm_conv",
        norm_layer="layernorm2d",
        final_norm=None,
        head_type="norm",
        head_norm_layer="layernorm2d",
        norm_eps=1e-5,
        **kwargs,
    )


def _create_davit(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    return build_hierarchical(variant, pretrained, checkpoint_filter_fn, **_davit_kwargs(**kwargs))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "origin_url": "https://github.com/dingmyu/davit",
        "paper_ids": "arXiv:2204.03645",
        **kwargs,
    }


# NOTE: the official ImageNet-1k weights are timm's `davit_{tiny,small,base}.msft_in1k` (hf_hub_id timm/...); save
# timm.create_model("davit_tiny", pretrained=True).state_dict() and load it with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs(
    {
        "strata_davit_tiny.msft_in1k": _cfg(),
        "strata_davit_small.msft_in1k": _cfg(),
        "strata_davit_base.msft_in1k": _cfg(),
    }
)


@register_model
def strata_davit_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    model_args = dict(depths=(1, 1, 3, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("strata_davit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def strata_davit_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("strata_davit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def strata_davit_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
    return _create_davit("strata_davit_base", pretrained=pretrained, **dict(model_args, **kwargs))
