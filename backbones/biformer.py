"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper: `BiFormer: Vision Transformer with Bi-Level Routing Attention` - https://arxiv.org/abs/2303.08810 (CVPR 2023)
Official code (MIT): https://github.com/rayleizhu/BiFormer (``models/biformer.py``), read, not copied.

The official ImageNet models as configurations of :class:`~backbones.hierarchical.HierarchicalNet`: a two-conv
BatchNorm stem, conv3x3-s2 + BatchNorm downsampling, BiFormer blocks (``blocks/routing.py``) with bi-level routing
attention in stages 1-3 (``topk`` 1 / 4 / 16 of ``n_win x n_win`` regions) and global attention with LePE in stage 4
(``bra_full``, 8 heads), a BatchNorm2d on the last map and an average-pool -> Linear head. Parameter counts equal the
official models; ``checkpoint_filter_fn`` loads the released checkpoints strictly.

Differences from the official code: any input size works without ``auto_pad`` (by default the BRA pads and masks,
``bra_pad_mode="mask"``; ``bra_pad_mode="official"`` is the official ``auto_pad=True`` of the detection /
segmentation backbones, unmasked padding to a multiple of ``n_win``, see ``blocks/routing.py``); ``n_win`` is a model
argument for dense tasks (the official configs use 16 / 8); drop path is the same linear schedule.
"""

from __future__ import annotations

import re
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from torch import Tensor

from blocks.routing import PAD_MODES

from .hierarchical import HierarchicalNet, build_hierarchical

__all__ = ["checkpoint_filter_fn"]

_STEM_KEYS = {"0": "conv1", "1": "norm1", "3": "conv2", "4": "norm2"}
_DOWN_KEYS = {"0": "conv", "1": "norm"}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: HierarchicalNet) -> dict[str, Tensor]:
    """Remap an official BiFormer checkpoint (``{"model": state_dict}`` or a bare state dict) to this layout.

    Native state dicts are returned unchanged.
    """
    state_dict = state_dict.get("model", state_dict)
    if "stem.conv1.weight" in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^downsample_layers\.0\.(\d)\.", lambda m: f"stem.{_STEM_KEYS[m[1]]}.", k)
        k = re.sub(r"^downsample_layers\.(\d+)\.([01])\.", lambda m: f"stages.{m[1]}.downsample.{_DOWN_KEYS[m[2]]}.", k)
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace(".attn.qkv.qkv.", ".attn.qkv.").replace(".attn.wo.", ".attn.proj.")
        k = k.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
        k = re.sub(r"^norm\.", "norm_pre.", k)
        k = re.sub(r"^head\.", "head.fc.", k)
        out[k] = v
    return out


def _biformer_kwargs(
    n_win: int = 7,
    topks: tuple[int | None, ...] = (1, 4, 16, None),
    mlp_ratio: float = 3.0,
    side_dwconv: int = 5,
    bra_impl: str = "fast",
    bra_pad_mode: str = "mask",
    **kwargs: Any,
) -> dict[str, Any]:
    """Translate BiFormer arguments into :class:`HierarchicalNet` arguments; a ``None`` top-k is global attention.

    ``bra_impl`` / ``bra_pad_mode`` are ``impl`` / ``pad_mode`` of every BRA (``blocks.routing``);
    ``bra_pad_mode="official"`` reproduces the official dense backbones (``auto_pad=True``).
    """
    if bra_pad_mode not in PAD_MODES:
        raise ValueError(f"bra_pad_mode={bra_pad_mode!r} must be one of {PAD_MODES}")
    common = dict(mlp_ratio=mlp_ratio, side_dwconv=side_dwconv)
    bra = dict(common, n_win=n_win, impl=bra_impl, pad_mode=bra_pad_mode)
    block = ["bra_full" if k is None else "bra" for k in topks]
    block_kwargs = [common if k is None else dict(bra, topk=k) for k in topks]
    return dict(
        block=block,
        block_kwargs=block_kwargs,
        stem_type="deep",
        downsample_type="conv_norm",
        norm_layer="batchnorm2d",
        final_norm="batchnorm2d",
        head_type="linear",
        **kwargs,
    )


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    return build_hierarchical(variant, pretrained, checkpoint_filter_fn, **_biformer_kwargs(**kwargs))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # NOTE: the official eval resizes to 256 and center-crops 224 (bicubic), i.e. crop_pct 0.875 (datasets.py)
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "mit",
        "origin_url": "https://github.com/rayleizhu/BiFormer",
        "paper_ids": "arXiv:2303.08810",
        **kwargs,
    }


# NOTE: official ImageNet-1k weights (no mirror on the HF hub; load them with pretrained_cfg_overlay=dict(file=...)):
# the "model" links of https://github.com/rayleizhu/BiFormer#results-and-pre-trained-models, i.e.
#   tiny:  https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content
#   small: https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content
#   base:  https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content
# (OneDrive share API links are reported broken since 2025, issue #53; folder: https://1drv.ms/u/s!AkBbczdRlZvChGsXFqAA-PVnA-R8)
default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": _cfg(),
        "biformer_small.in1k": _cfg(),
        "biformer_base.in1k": _cfg(),
    }
)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    model_args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalNet:
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained=pretrained, **dict(model_args, **kwargs))
