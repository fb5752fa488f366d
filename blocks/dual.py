"""DaViT dual attention: window (spatial-token) attention and channel-group attention blocks.

Paper: `DaViT: Dual Attention Vision Transformers` - https://arxiv.org/abs/2204.03645
Reference implementations read for fidelity: https://github.com/dingmyu/davit and timm's ``timm/models/davit.py``.

The blocks work on the token layout ``(B, H, W, C)`` (memory-identical to a channels_last ``(B, C, H, W)`` tensor),
so a backbone can chain them without permutes; the ``*2d`` subclasses are the ``(B, C, H, W)`` wrappers registered
with the factory. Parameter names equal timm's ``SpatialBlock`` / ``ChannelBlock`` (and ``DualAttentionBlock``
equals timm's ``nn.Sequential(SpatialBlock, ChannelBlock)`` per dual block), so timm's DaViT weights load 1:1.

Difference from the official code and timm: when H or W is not a multiple of the window, the window attention masks
the zero-padded positions, so a padded key never receives attention weight. Divisible sizes run unmasked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_module, to_2tuple
from torch import nn

from .factory import register_block

__all__ = [
    "ChannelAttention",
    "ChannelBlock",
    "ChannelBlock2d",
    "ConvPosEnc",
    "DualAttentionBlock",
    "DualAttentionBlock2d",
    "SpatialBlock",
    "SpatialBlock2d",
    "WindowAttention",
]


def _resolve_heads(dim: int, num_heads: int | None, head_dim: int = 32) -> int:
    if num_heads is None:
        num_heads = max(1, dim // head_dim)
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}; pass a num_heads that divides dim")
    return num_heads


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    # NOTE one copy for an NCHW-contiguous input (none for channels_last); the blocks then run on dense tokens.
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


class ConvPosEnc(nn.Module):
    """Convolutional position encoding of DaViT (arXiv 2204.03645): ``y = x + act(DWConv_kxk(x))``.

    Depthwise ``k x k`` conv (groups = C, bias, zero padding ``k // 2``); ``act`` is GELU or identity (default).
    Shapes: ``(B, H, W, C) -> (B, H, W, C)``.

    Args:
        dim: Channel count ``C``.
        k: Kernel size.
        act: Apply GELU to the conv output.
    """

    def __init__(self, dim: int, k: int = 3, act: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size=k, padding=k // 2, groups=dim)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = x + self.act(self.proj(x))
        return x.permute(0, 2, 3, 1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows (DaViT spatial attention, arXiv 2204.03645).

    ``softmax(q k^T / sqrt(d) + mask) v`` per window and head, with ``[q, k, v] = x W_qkv + b`` and an output
    projection; ``d = C / num_heads``. Shapes: ``(B * num_windows, N, C) -> (B * num_windows, N, C)``, ``N`` the
    tokens per window.

    Args:
        dim: Channel count ``C``.
        num_heads: Attention heads.
        qkv_bias: Bias on the qkv projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = _resolve_heads(dim, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask``: optional bool ``(B * num_windows, 1, 1, N)``, True where a key may be attended."""
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.proj(x.transpose(1, 2).reshape(B_, N, C))


class ChannelAttention(nn.Module):
    """Channel-group attention of DaViT (arXiv 2204.03645): channels are the tokens, spatial positions the features.

    Channels split into ``g`` groups of ``d = C / g``; per group, with ``q, k, v`` of shape ``(N, d)``::

        A = softmax(d^-1/2 * k^T v)      # (d, d)
        y = (A q^T)^T                    # (N, d)

    followed by an output projection. Cost is linear in ``N``. Shapes: ``(B, N, C) -> (B, N, C)``.

    Args:
        dim: Channel count ``C``.
        num_heads: Channel groups ``g``.
        qkv_bias: Bias on the qkv projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = _resolve_heads(dim, num_heads)
        self.scale = (dim // self.num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((k * self.scale).transpose(-1, -2) @ v).softmax(dim=-1)
        x = q @ attn.transpose(-1, -2)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _DaViTBlock(nn.Module):
    """Shared skeleton: ``x = cpe1(x); x = x + dp(attn(norm1(x))); x = cpe2(x); x = x + dp(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        drop_path: float,
        act_layer: type[nn.Module],
        norm_layer: type[nn.Module],
        cpe_act: bool,
    ) -> None:
        super().__init__()
        self.cpe1 = ConvPosEnc(dim, k=3, act=cpe_act)
        self.norm1 = norm_layer(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cpe2 = ConvPosEnc(dim, k=3, act=cpe_act)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe1(x)
        x = x + self.drop_path1(self._mix(self.norm1(x)))
        x = self.cpe2(x)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


@register_notrace_module  # NOTE: window padding depends on the map size; a leaf for FX feature extraction
class SpatialBlock(_DaViTBlock):
    """DaViT spatial-window block (Ding et al., "DaViT: Dual Attention Vision Transformers", arXiv 2204.03645).

    ``x = CPE(x); x = x + DropPath(WMSA(LN(x))); x = CPE(x); x = x + DropPath(MLP(LN(x)))``, where WMSA pads the
    normalized map to a multiple of the window, attends within each window and crops. Padded keys are masked
    (unlike the official code and timm); no mask is built when H and W are multiples of the window.
    Shapes: ``(B, H, W, C) -> (B, H, W, C)``.

    Args:
        dim: Channel count ``C``.
        num_heads: Attention heads; ``None`` gives head dim 32 (``C // 32``).
        window_size: Window side (int or ``(h, w)``).
        mlp_ratio: MLP hidden width over ``C``.
        qkv_bias: Bias on the qkv projection.
        drop_path: Stochastic depth rate of both residual branches.
        act_layer: MLP activation.
        norm_layer: Token norm.
        cpe_act: GELU after the CPE conv.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        window_size: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        cpe_act: bool = False,
    ) -> None:
        super().__init__(dim, mlp_ratio, drop_path, act_layer, norm_layer, cpe_act)
        self.window_size = to_2tuple(window_size)
        if min(self.window_size) < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.attn = WindowAttention(dim, _resolve_heads(dim, num_heads), qkv_bias=qkv_bias)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        pad_b, pad_r = (wh - H % wh) % wh, (ww - W % ww) % ww
        Hp, Wp = H + pad_b, W + pad_r
        nh, nw = Hp // wh, Wp // ww
        key_mask = None
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            rows = torch.arange(Hp, device=x.device) < H
            cols = torch.arange(Wp, device=x.device) < W
            valid = (rows[:, None] & cols[None, :]).reshape(nh, wh, nw, ww).transpose(1, 2)
            key_mask = valid.reshape(1, nh * nw, wh * ww).expand(B, -1, -1).reshape(B * nh * nw, 1, 1, wh * ww)
        windows = x.reshape(B, nh, wh, nw, ww, C).transpose(2, 3).reshape(B * nh * nw, wh * ww, C)
        windows = self.attn(windows, key_mask)
        x = windows.reshape(B, nh, nw, wh, ww, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        return x[:, :H, :W, :]


class ChannelBlock(_DaViTBlock):
    """DaViT channel-group block (Ding et al., "DaViT: Dual Attention Vision Transformers", arXiv 2204.03645).

    ``x = CPE(x); x = x + DropPath(ChannelAttn(LN(x))); x = CPE(x); x = x + DropPath(MLP(LN(x)))`` with global
    channel-group attention over all ``N = H * W`` positions. Shapes: ``(B, H, W, C) -> (B, H, W, C)``.

    Args:
        dim: Channel count ``C``.
        num_heads: Channel groups; ``None`` gives groups of 32 channels (``C // 32``).
        mlp_ratio: MLP hidden width over ``C``.
        qkv_bias: Bias on the qkv projection.
        drop_path: Stochastic depth rate of both residual branches.
        act_layer: MLP activation.
        norm_layer: Token norm.
        cpe_act: GELU after the CPE conv.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        cpe_act: bool = False,
    ) -> None:
        super().__init__(dim, mlp_ratio, drop_path, act_layer, norm_layer, cpe_act)
        self.attn = ChannelAttention(dim, _resolve_heads(dim, num_heads), qkv_bias=qkv_bias)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        return self.attn(x.reshape(B, H * W, C)).reshape(B, H, W, C)


class DualAttentionBlock(nn.Sequential):
    """DaViT dual attention block (arXiv 2204.03645): a :class:`SpatialBlock` then a :class:`ChannelBlock`.

    Children are named ``0`` and ``1`` like timm's ``DaVitStage`` blocks, so one timm dual block's weights load
    directly. Shapes: ``(B, H, W, C) -> (B, H, W, C)``.

    Args:
        dim: Channel count ``C``.
        num_heads: Heads of the spatial block and channel groups of the channel block; ``None`` gives ``C // 32``.
        window_size: Window side of the spatial block.
        mlp_ratio: MLP hidden width over ``C``.
        qkv_bias: Bias on the qkv projections.
        drop_path: Stochastic depth rate of all four residual branches.
        **kwargs: ``act_layer``, ``norm_layer``, ``cpe_act`` for both blocks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        window_size: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        **kwargs,
    ) -> None:
        common = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path, **kwargs)
        super().__init__(SpatialBlock(dim, window_size=window_size, **common), ChannelBlock(dim, **common))


@register_block("davit_spatial")
class SpatialBlock2d(SpatialBlock):
    """:class:`SpatialBlock` on ``(B, C, H, W)`` tensors (same parameters); returns a channels_last tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_to_tokens(x)).permute(0, 3, 1, 2)


@register_block("davit_channel")
class ChannelBlock2d(ChannelBlock):
    """:class:`ChannelBlock` on ``(B, C, H, W)`` tensors (same parameters); returns a channels_last tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_to_tokens(x)).permute(0, 3, 1, 2)


@register_block("dual", accepts=(SpatialBlock, ChannelBlock))
class DualAttentionBlock2d(DualAttentionBlock):
    """:class:`DualAttentionBlock` on ``(B, C, H, W)`` tensors (same parameters); returns a channels_last tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_to_tokens(x)).permute(0, 3, 1, 2)
