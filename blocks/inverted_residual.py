"""Inverted residual (MBConv) with any registered attention block on its expanded channels.

Papers:
* `MobileNetV2: Inverted Residuals and Linear Bottlenecks` - https://arxiv.org/abs/1801.04381
* `Coordinate Attention for Efficient Mobile Network Design` - https://arxiv.org/abs/2103.02907 (the placement)

The block is timm's ``InvertedResidual`` (``timm.models._efficientnet_blocks``), reused rather than rewritten; this
module only plugs a ``blocks`` attention key (``"ca"``, ``"se"``, ``"eca"``, ...) into the slot timm calls ``se``,
after the depthwise conv, which is where the coordinate-attention paper puts it.
"""

from __future__ import annotations

from typing import Any

from timm.layers import get_act_layer
from timm.models._efficientnet_blocks import InvertedResidual
from torch import nn

from .factory import block_spec, check_block_kwargs, create_block, register_block

__all__ = ["inverted_residual"]


def _attention_slot(attn: str, attn_kwargs: dict[str, Any]) -> Any:
    """A constructor with the call signature timm gives its ``se_layer``: ``(chs, act_layer=..., **factory_kwargs)``."""

    def make(channels: int, act_layer: Any = None, device: Any = None, dtype: Any = None) -> nn.Module:
        return create_block(attn, channels, **attn_kwargs).to(device=device, dtype=dtype)

    return make


def _check_attention(dim: int, kwargs: dict[str, Any]) -> str | None:
    """``attn`` is a registered attention key and ``attn_kwargs`` fit it (on the expanded width)."""
    attn = kwargs.get("attn", "ca")
    if attn is None:
        return None
    try:
        spec = block_spec(attn)
    except ValueError as error:
        return f"mbconv attn: {error}"
    if spec.kind != "attention":
        return f"mbconv attn {attn!r} is a {spec.kind}, not an attention gate; use one of {', '.join(_gates())}"
    hidden = int(dim * kwargs.get("expand_ratio", 4.0))
    problems = check_block_kwargs(attn, hidden, dict(kwargs.get("attn_kwargs") or {}))
    return f"mbconv attn_kwargs: {problems[0]}" if problems else None


def _gates() -> list[str]:
    from .factory import list_blocks

    return list_blocks(kind="attention")


@register_block("mbconv", check=_check_attention)
def inverted_residual(
    dim: int,
    expand_ratio: float = 4.0,
    kernel_size: int = 3,
    attn: str | None = "ca",
    attn_kwargs: dict[str, Any] | None = None,
    act_layer: str = "gelu",
    drop_path: float = 0.0,
) -> InvertedResidual:
    """Inverted residual with an attention block on the expanded channels; shape ``(B, C, H, W)`` is kept.

    ``y = x + DropPath(BN(W_pwl · attn(act(BN(DW_k(act(BN(W_pw · x))))))))`` with ``W_pw: C -> r·C`` and
    ``W_pwl: r·C -> C`` (no activation after the projection: the linear bottleneck).

    Args:
        dim: channels ``C`` in and out.
        expand_ratio: hidden width ``r`` over ``C``.
        kernel_size: depthwise kernel size (odd).
        attn: ``blocks`` key of the attention after the depthwise conv, or None for none.
        attn_kwargs: keyword arguments of that attention block.
        act_layer: timm activation name.
        drop_path: stochastic depth rate of the residual branch.
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size} must be odd so that the block keeps H and W")
    return InvertedResidual(
        dim,
        dim,
        dw_kernel_size=kernel_size,
        exp_ratio=expand_ratio,
        act_layer=get_act_layer(act_layer),
        norm_layer=nn.BatchNorm2d,
        se_layer=_attention_slot(attn, attn_kwargs or {}) if attn else None,
        drop_path_rate=drop_path,
    )
