"""Strata block plugin: the FLatten Transformer block with Focused Linear Attention.

Han et al., "FLatten Transformer: Vision Transformer using Focused Linear Attention", ICCV 2023, arXiv 2308.00442.
Importing this module registers the block key ``"focused_linear"`` (kind ``"block"``); the package declares it in
the ``strata.blocks`` entry-point group, so an installed copy appears in ``blocks.list_blocks()`` by itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from blocks import factory as _factory
from blocks import register_block

__all__ = ["FLattenBlock", "FocusedLinearAttention", "focusing_function"]

BLOCK_KEY = "focused_linear"


def focusing_function(x: Tensor, p: float, eps: float = 1e-6) -> Tensor:
    """Focused kernel ``f_p(x) = ||r|| / ||r**p|| * r**p`` with ``r = ReLU(x) + eps``, norms over the last dim.

    ``f_p`` is positively homogeneous of degree 1, so it is evaluated on ``r / max(r)`` (entries in (0, 1], so
    ``||(r / max r)**p|| >= 1``) and rescaled by ``max(r)``: no underflow of ``r**p`` for small activations.
    The ``eps`` (as in the paper's code) keeps every entry positive, so the attention normalizer never vanishes.
    """
    r = F.relu(x) + eps
    m = r.amax(dim=-1, keepdim=True)
    u = r / m
    up = u**p
    return m * (u.norm(dim=-1, keepdim=True) / up.norm(dim=-1, keepdim=True)) * up


def _default_heads(dim: int) -> int:
    return max(dim // 32, 1)


class FocusedLinearAttention(nn.Module):
    """Focused Linear Attention (FLatten, Han et al., ICCV 2023, arXiv 2308.00442), ``(B, H, W, C) -> (B, H, W, C)``.

    ::

        Q, K, V = x W_q, x W_k, x W_v                          # one Linear(C, 3C), split into heads
        Q, K = Q / softplus(s), K / softplus(s)                # learnable per-channel scale s (init 0)
        phi = f_p                                              # focusing_function, per token over a head's channels
        O = phi(Q) (phi(K)^T V) / (phi(Q) . sum_j phi(K_j)) + DWC(V)
        y = O W_o                                              # Linear(C, C)

    ``DWC`` is a depthwise ``kernel_size x kernel_size`` convolution over each head's ``V`` laid back on the
    ``H x W`` map (one ``head_dim``-channel conv shared by the heads, as in the paper's code): it restores the rank
    of the linear-attention matrix. The cost is linear in the token count ``N = H W``: ``O(N d^2)`` per head.

    Args:
        dim: channels.
        num_heads: heads; default ``max(dim // 32, 1)``; must divide ``dim``.
        focusing_factor: the power ``p`` of the focusing function (> 0).
        kernel_size: the DWC kernel (odd).
        qkv_bias: bias of the Q, K, V projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        focusing_factor: float = 3,
        kernel_size: int = 5,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        num_heads = _default_heads(dim) if num_heads is None else num_heads
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be a positive odd number")
        if focusing_factor <= 0:
            raise ValueError(f"focusing_factor={focusing_factor} must be > 0")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.focusing_factor = focusing_factor
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.scale = nn.Parameter(torch.zeros(dim))
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2, groups=self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        N, h, d = H * W, self.num_heads, self.head_dim
        q, k, v = self.qkv(x.reshape(B, N, C)).chunk(3, dim=-1)
        scale = F.softplus(self.scale)
        q, k = q / scale, k / scale
        q, k, v = (t.reshape(B, N, h, d).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        q = focusing_function(q, self.focusing_factor)
        k = focusing_function(k, self.focusing_factor)
        # (1/N) sum_j phi(K_j) V_j^T and phi(Q_i) . mean_j phi(K_j): the 1/N cancels, it only keeps the range small
        kv = torch.einsum("bhnd,bhne->bhde", k, v) / N
        z = torch.einsum("bhnd,bhd->bhn", q, k.mean(dim=2))
        out = torch.einsum("bhnd,bhde->bhne", q, kv) / z.unsqueeze(-1)
        v_map = v.transpose(2, 3).reshape(B * h, d, H, W)
        out = out + self.dwc(v_map).reshape(B, h, d, N).transpose(2, 3)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out)


class FLattenBlock(nn.Module):
    """FLatten Transformer block (Han et al., ICCV 2023, arXiv 2308.00442), ``(B, C, H, W) -> (B, C, H, W)``.

    ::

        x = x + DWConv3x3(x)                                   # pos_embed
        x = x + DropPath(FocusedLinearAttention(LN(x)))
        x = x + DropPath(Mlp(LN(x)))                           # Linear(C, r C) -> GELU -> Linear(r C, C)

    NHWC inside; the output is the NHWC result permuted back (a channels-last NCHW tensor).

    Args:
        dim: channels.
        num_heads: heads; default ``max(dim // 32, 1)``.
        focusing_factor: focusing power ``p``.
        kernel_size: kernel of the attention's depthwise conv on ``V``.
        mlp_ratio: MLP hidden width ratio.
        qkv_bias: bias of the Q, K, V projection.
        drop_path: stochastic depth rate.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        focusing_factor: float = 3,
        kernel_size: int = 5,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FocusedLinearAttention(dim, num_heads, focusing_factor, kernel_size, qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


def _check(dim: int, kwargs: dict[str, Any]) -> str | None:
    """The block's own constraints, checked before building: default heads, odd kernel, positive focusing power."""
    heads = kwargs.get("num_heads")
    heads = _default_heads(dim) if heads is None else heads
    if isinstance(heads, int) and (heads < 1 or dim % heads):
        return f"width {dim} is not divisible by num_heads={heads} of block {BLOCK_KEY!r}; pick a divisor"
    kernel = kwargs.get("kernel_size", 5)
    if isinstance(kernel, int) and (kernel < 1 or kernel % 2 == 0):
        return f"kernel_size={kernel} of block {BLOCK_KEY!r} must be a positive odd number"
    power = kwargs.get("focusing_factor", 3)
    if isinstance(power, (int, float)) and power <= 0:
        return f"focusing_factor={power} of block {BLOCK_KEY!r} must be > 0"
    return None


# NOTE: register once: the module may be imported both as an entry point and directly (tests, scripts)
if BLOCK_KEY not in _factory._BLOCKS:
    register_block(BLOCK_KEY, kind="block", check=_check)(FLattenBlock)
