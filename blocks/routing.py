"""Bi-level routing attention (BRA) and the BiFormer block, with a fast token-level kernel.

"BiFormer: Vision Transformer with Bi-Level Routing Attention", Zhu et al., CVPR 2023 (arXiv 2303.08810),
https://github.com/rayleizhu/BiFormer. Written from the paper and the official ``ops/bra_legacy.py`` /
``models/_common.py`` (not copied); parameter names map to the official checkpoints by a rename
(``attn.qkv.qkv -> attn.qkv``, ``attn.wo -> attn.proj``, ``mlp.0/3 -> mlp.fc1/fc2``).

What differs from the official code, on purpose:

- **Speed.** The official code copies K/V ``topk`` times with ``torch.gather`` over an expanded tensor, whose backward
  allocates a gradient ``R`` times the size of K/V (``R`` regions) and keeps the probability matrix. Here tokens are
  put region-major *before* the projection, so q, k, v come out as contiguous ``(B*R, w2, c)``; the routed region
  blocks are picked with ``index_select`` (backward: ``index_add``) and fed to fused scaled-dot-product attention,
  which keeps no probability matrix. On CPU a custom autograd function around the flash kernel saves K/V once and
  re-gathers in backward. When regions hold only a few tokens (see :func:`use_masked_dense`) one dense attention per
  image with a region block mask is faster and is used instead. ``impl="reference"`` selects the plain gather kernel
  of ``blocks/routing_reference.py`` (same routing, same numbers up to rounding).
- **Any input size** (``pad_mode="mask"``, the default). Official BRA asserts ``H % n_win == 0`` or, with
  ``auto_pad=True``, zero-pads to a multiple of ``n_win`` without masking. Here the region size is
  ``rh = ceil(H / n_win)`` and the number of region rows is ``ceil(H / rh) <= n_win`` (same for W), so every region
  holds at least one real token (maps smaller than ``n_win`` get 1-token regions). The input is zero-padded at the
  bottom/right *before* the qkv projection (padded tokens hold ``q = k = v = bias``), but those values never reach a
  real output: padded keys are masked out of attention, region descriptors average over real tokens only, LePE runs
  on the unpadded V and padded queries are cropped - the result equals padding after the projection. ``topk`` is
  clamped to the number of regions; ``topk >= R`` is dense attention. For divisible sizes this is exactly the
  official algorithm.
- **The official padding** (``pad_mode="official"``), what ``auto_pad=True`` of ``ops/bra_legacy.py`` does and what
  the official COCO / ADE20K backbones use (``n_win`` 16 / 8): an exact ``n_win x n_win`` grid of
  ``ceil(H / n_win) x ceil(W / n_win)`` regions over the BRA input (after ``norm1``) zero-padded at the bottom/right
  to a multiple of ``n_win``, *before* the qkv projection; nothing is masked - padded tokens (``q = k = v = bias``)
  enter the region means, the routing and the attention as keys, LePE convolves the padded V map - and the padded
  rows/columns are cropped at the end (official ``forward``: pad before ``qkv``, means over all tokens, LePE on the
  padded V, crop after ``wo``). The block's ``pos_embed``, norms and MLP never see padding. Regions can be all
  padding (a 25-row map with ``n_win=16`` is padded to 32 rows, 2 per region: 3 all-padding region rows) and real
  tokens attend to padding, so a real output depends on how much padding its image size happens to need and on the
  qkv bias; that is why "mask" is the default. "official" computes what the official dense backbones compute, i.e.
  what the papers' COCO / ADE20K numbers were measured with and their dense checkpoints were trained with. The two
  modes are identical when ``H`` and ``W`` are multiples of ``n_win``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, register_notrace_function, register_notrace_module
from torch import Tensor, nn

from .factory import register_block
from .routing_reference import routed_attention_reference

__all__ = [
    "PAD_MODES",
    "AttentionLePE",
    "BiFormerBlock",
    "BiLevelRoutingAttention",
    "RegionRouter",
    "masked_dense_attention",
    "region_grid",
    "routed_attention",
    "use_masked_dense",
]

_IMPLS = ("fast", "reference")
PAD_MODES = ("mask", "official")
_SCALE_MODES = ("official", "head")
_DENSE_TOKENS_PER_ROUTED_REGION = 16
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


@register_notrace_function
def region_grid(height: int, width: int, n_win: int, exact: bool = False) -> tuple[int, int, int, int]:
    """Region size and count per side ``(rh, rw, nh, nw)``: ``rh = ceil(H / n_win)``, ``nh = ceil(H / rh) <= n_win``.

    ``exact=True`` is the official ``auto_pad`` grid: ``nh = nw = n_win`` regions of the same size.
    """
    rh, rw = -(-height // n_win), -(-width // n_win)
    if exact:
        return rh, rw, n_win, n_win
    return rh, rw, -(-height // rh), -(-width // rw)


def use_masked_dense(tokens: int, topk: int) -> bool:
    """Whether the fast path computes BRA as one dense attention per image with a region block mask.

    Dense costs ``R / topk`` times the routed FLOPs but skips the per-region gather and the tiny per-region attention
    problems; on CPU it wins when regions hold few tokens, e.g. biformer stage 3 at 224 (4-token regions, topk 16 of
    49), so it is used when the (padded) map has at most ``16 * topk`` tokens.
    """
    return tokens <= _DENSE_TOKENS_PER_ROUTED_REGION * topk


def _key_valid(height: int, width: int, grid: tuple[int, int, int, int], device: torch.device) -> Tensor:
    """``(R, w2)`` bool, True at real (unpadded) tokens, region-major like the partitioned tensors."""
    rh, rw, nh, nw = grid
    rows = (torch.arange(nh * rh, device=device) < height).view(nh, 1, rh, 1)
    cols = (torch.arange(nw * rw, device=device) < width).view(1, nw, 1, rw)
    return (rows & cols).reshape(nh * nw, rh * rw)


def _to_regions(x: Tensor, grid: tuple[int, int, int, int]) -> Tensor:
    """``(B, Hp, Wp, c)`` -> region-major ``(B * R, w2, c)`` (one copy)."""
    rh, rw, nh, nw = grid
    B, _, _, c = x.shape
    return x.reshape(B, nh, rh, nw, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, rh * rw, c)


def _from_regions(t: Tensor, batch: int, height: int, width: int, grid: tuple[int, int, int, int]) -> Tensor:
    """Region-major ``(B * R, w2, c)`` -> contiguous ``(B, H, W, c)``, padding cropped."""
    rh, rw, nh, nw = grid
    t = t.reshape(batch, nh, nw, rh, rw, -1).permute(0, 1, 3, 2, 4, 5).reshape(batch, nh * rh, nw * rw, -1)
    return t[:, :height, :width].contiguous() if (nh * rh, nw * rw) != (height, width) else t


def _heads(t: Tensor, heads: int) -> Tensor:
    """``(N, L, heads * d)`` -> ``(N, heads, L, d)`` (a view)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _select(t: Tensor, gidx: Tensor, heads: int) -> Tensor:
    """Routed region blocks of ``(B * R, w2, c)``: ``(B * R, heads, topk * w2, c / heads)`` (one copy)."""
    return _heads(t.index_select(0, gidx).view(t.shape[0], -1, t.shape[-1]), heads)


class _RoutedFlashCPU(torch.autograd.Function):
    """CPU flash attention over routed regions that saves K/V once (not ``topk`` times) and re-gathers in backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, gidx: Tensor, mask: Tensor | None, heads: int, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads(q, heads), _select(k, gidx, heads), _select(v, gidx, heads), attn_mask=mask, scale=scale
        )
        ctx.save_for_backward(q, k, v, gidx, mask, out, lse)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, gidx, mask, out, lse = ctx.saved_tensors
        heads, dtype = ctx.heads, q.dtype
        if dtype != torch.float32:  # NOTE: the CPU flash backward is many times slower in bf16 than in fp32
            q, k, v, out, grad_out = (t.float() for t in (q, k, v, out, grad_out))
            mask = None if mask is None else mask.float()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(),
            _heads(q, heads),
            _select(k, gidx, heads),
            _select(v, gidx, heads),
            out,
            lse,
            0.0,
            False,
            attn_mask=mask,
            scale=ctx.scale,
        )
        # NOTE: the kernel returns (N, heads, L, d) views of (N, L, heads, d) memory, so these reshapes are free
        dk = torch.zeros_like(k).index_add_(0, gidx, dk.transpose(1, 2).reshape(gidx.shape[0], k.shape[1], -1))
        dv = torch.zeros_like(v).index_add_(0, gidx, dv.transpose(1, 2).reshape(gidx.shape[0], v.shape[1], -1))
        dq = dq.transpose(1, 2).reshape(q.shape)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None, None


def routed_attention(
    q: Tensor, k: Tensor, v: Tensor, gidx: Tensor, mask: Tensor | None, heads: int, scale: float
) -> Tensor:
    """Attention of every query region over the tokens of its routed key regions (fast kernel).

    Args:
        q, k, v: region-major ``(B * R, w2, c)`` (q and k share ``c``).
        gidx: flat routed region ids ``b * R + r`` in query-region order, ``(B * R * topk,)``.
        mask: additive ``(B * R, 1, 1, topk * w2)`` mask in ``q.dtype`` (``-inf`` at padding keys) or None.
        heads: number of heads.
        scale: multiplier of the logits.

    Returns:
        ``(B * R, w2, c_v)``.
    """
    BR, w2, _ = q.shape
    flash = _HAS_CPU_FLASH and q.device.type == "cpu" and q.shape[-1] == v.shape[-1]
    flash = flash and q.dtype in (torch.float32, torch.bfloat16)
    if flash and not torch.jit.is_scripting():
        out = _RoutedFlashCPU.apply(q, k, v, gidx, mask, heads, scale)
    else:
        qh, kh, vh = _heads(q, heads), _select(k, gidx, heads), _select(v, gidx, heads)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(BR, w2, -1)


def masked_dense_attention(
    q: Tensor, k: Tensor, v: Tensor, allow: Tensor, key_valid: Tensor | None, heads: int, scale: float
) -> Tensor:
    """The same routed attention computed densely per image with a region block mask (for tiny regions).

    Args:
        q, k, v: region-major ``(B * R, w2, c)``.
        allow: ``(B, R, R)`` bool, query region ``i`` may attend key region ``j``.
        key_valid: ``(R, w2)`` bool, False at padding tokens, or None.
        heads: number of heads.
        scale: multiplier of the logits.

    Returns:
        ``(B * R, w2, c_v)``.
    """
    B, R, _ = allow.shape
    BR, w2, _ = q.shape
    n = R * w2
    keep = allow.view(B, R, 1, R, 1)
    if key_valid is not None:
        keep = keep & key_valid.view(1, 1, 1, R, w2)
    keep = keep.expand(B, R, w2, R, w2).reshape(B, 1, n, n)
    mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
    qh, kh, vh = (_heads(t.reshape(B, n, -1), heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(BR, w2, -1)


class RegionRouter(nn.Module):
    """Region-to-region routing: top-k key regions per query region by ``(scale * q_r) @ k_r^T`` (no parameters).

    The descriptors are detached: the routing is not differentiated (official ``diff_routing=False``), and its
    indices only select which tokens are attended.
    """

    def __init__(self, topk: int, scale: float) -> None:
        super().__init__()
        self.topk = topk
        self.scale = scale

    def forward(self, q_win: Tensor, k_win: Tensor) -> Tensor:
        """``(B, R, c)`` region descriptors -> ``(B, R, min(topk, R))`` int64 key-region ids."""
        logits = (q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1)
        return torch.topk(logits, k=min(self.topk, logits.shape[-1]), dim=-1).indices


@register_notrace_module  # NOTE: shape-dependent region geometry; a leaf for FX feature extraction
class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (BRA) of BiFormer (Zhu et al., CVPR 2023, arXiv 2303.08810), tokens ``(B, H, W, C)``.

    With ``q, k, v = qkv(x)`` split into ``S x S`` regions (``S = n_win``, see the module docstring for sizes that do
    not divide), region descriptors ``q_r = mean(q)``, ``k_r = mean(k)`` per region, and
    ``I = topk(q_r k_r^T * scale)`` the ``topk`` key regions of every query region (not differentiated)::

        out = proj( Attention(q_i, k[I_i], v[I_i]) + LePE(v) )     # per query region i, multi-head

    where ``LePE`` is a depthwise ``side_dwconv x side_dwconv`` conv over the whole V map. Sizes that are not
    multiples of ``n_win`` are zero-padded at the bottom/right and cropped; ``pad_mode`` says how (module docstring).

    Args:
        dim: channels ``C`` (also the V width).
        num_heads: heads; default ``max(1, dim // 32)`` (BiFormer's ``head_dim=32``).
        n_win: regions per side ``S``.
        topk: routed key regions per query region; ``>= S*S`` is dense attention.
        qk_dim: width of q and k; default ``dim``.
        qkv_bias: bias of the joint ``qkv`` Linear(dim, 2 * qk_dim + dim).
        scale_mode: ``"official"`` -> ``qk_dim ** -0.5`` (the official quirk: full width, not head width; needed for
            the released checkpoints); ``"head"`` -> ``(qk_dim / num_heads) ** -0.5``. Used for routing and attention.
        qk_scale: explicit scale, overrides ``scale_mode``.
        side_dwconv: LePE kernel size (odd); 0 disables LePE.
        impl: ``"fast"`` (index_select + fused attention, or block-masked dense attention for tiny regions) or
            ``"reference"`` (gather over expand, explicit softmax); an attribute, switchable after construction.
        pad_mode: ``"mask"`` (padding masked out: ``ceil(H / rh)`` region rows, keys and region means over real tokens
            only, LePE on the unpadded V) or ``"official"`` (the official ``auto_pad``: exact ``n_win x n_win`` grid,
            padding unmasked, LePE on the padded V); both crop the padding and agree on multiples of ``n_win``.

    Shapes: ``(B, H, W, C) -> (B, H, W, C)`` for any ``H, W >= 1``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        n_win: int = 7,
        topk: int = 4,
        qk_dim: int | None = None,
        qkv_bias: bool = True,
        scale_mode: str = "official",
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        impl: str = "fast",
        pad_mode: str = "mask",
    ) -> None:
        super().__init__()
        num_heads = num_heads or max(1, dim // 32)
        qk_dim = qk_dim or dim
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim} and qk_dim={qk_dim}; pick a divisor")
        if n_win < 1 or topk < 1:
            raise ValueError(f"n_win={n_win} and topk={topk} must be >= 1")
        if scale_mode not in _SCALE_MODES:
            raise ValueError(f"scale_mode={scale_mode!r} must be one of {_SCALE_MODES}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r} must be one of {PAD_MODES}")
        if side_dwconv < 0 or (side_dwconv and side_dwconv % 2 == 0):
            raise ValueError(f"side_dwconv={side_dwconv} must be 0 (no LePE) or an odd kernel size")
        self.dim, self.qk_dim, self.num_heads, self.n_win, self.topk = dim, qk_dim, num_heads, n_win, topk
        self.scale_mode = scale_mode
        self.scale = qk_scale or (qk_dim if scale_mode == "official" else qk_dim // num_heads) ** -0.5
        self.impl = impl  # validated on use so that it can be switched on a built module
        self.pad_mode = pad_mode

        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv else None
        self.router = RegionRouter(topk, self.scale)
        self.proj = nn.Linear(dim, dim)
        self._slices = (slice(0, qk_dim), slice(qk_dim, 2 * qk_dim), slice(2 * qk_dim, 2 * qk_dim + dim))
        # NOTE: set only while an attention capture records this block (a hook-free callback, None otherwise)
        self.capture: Callable[..., None] | None = None

    @contextlib.contextmanager
    def mac_counting(self) -> Iterator[None]:
        """While MACs are counted, run the plain gather kernel (the block contract, ``blocks/factory.py``): the fast
        path's block-masked dense attention for tiny regions multiplies more zeros than the algorithm needs."""
        impl, self.impl = self.impl, "reference"
        try:
            yield
        finally:
            self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, _ = x.shape
        official = self.pad_mode == "official"
        grid = region_grid(H, W, self.n_win, exact=official)
        rh, rw, nh, nw = grid
        Hp, Wp, R, w2 = nh * rh, nw * rw, nh * nw, rh * rw
        padded = (Hp, Wp) != (H, W)
        if padded:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        # NOTE: region-major before the projection, so q, k, v are contiguous (B * R, w2, c) without another copy
        x = _to_regions(x, grid)
        if self.impl == "reference":
            q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        elif self.impl == "fast":  # NOTE: three contiguous projections (same weights) for cheap K/V row selection
            w, b = self.qkv.weight, self.qkv.bias
            q, k, v = (F.linear(x, w[s], None if b is None else b[s]) for s in self._slices)
        else:
            raise ValueError(f"impl={self.impl!r} must be one of {_IMPLS}")
        # NOTE: official auto_pad masks nothing: padded tokens are keys and enter the region means
        key_valid = _key_valid(H, W, grid, x.device) if padded and not official else None

        with torch.no_grad():  # region descriptors: means per region (over its real tokens when masked)
            if key_valid is None:
                q_win, k_win = q.mean(1), k.mean(1)
            else:
                valid = key_valid.repeat(B, 1).unsqueeze(-1)
                q_win, k_win = ((t * valid).sum(1) / valid.sum(1) for t in (q, k))
        idx = self.router(q_win.view(B, R, -1), k_win.view(B, R, -1))  # (B, R, topk)
        topk = idx.shape[-1]
        if self.capture is not None:
            self.capture(q=q, k=k, v=v, idx=idx, grid=grid, size=(H, W), key_valid=key_valid)

        if self.impl == "reference":
            kv = torch.cat([k, v], dim=-1).view(B, R, w2, -1)
            out = routed_attention_reference(q.view(B, R, w2, -1), kv, idx, self.scale, self.num_heads, key_valid)
            out = out.view(B * R, w2, -1)
        elif use_masked_dense(R * w2, topk):
            allow = torch.zeros(B, R, R, dtype=torch.bool, device=x.device).scatter_(2, idx, True)
            out = masked_dense_attention(q, k, v, allow, key_valid, self.num_heads, self.scale)
        else:
            gidx = (idx + torch.arange(B, device=idx.device).view(B, 1, 1) * R).reshape(-1)
            mask = None
            if key_valid is not None:
                keep = key_valid[idx].reshape(B * R, 1, 1, topk * w2)
                mask = torch.zeros(keep.shape, dtype=q.dtype, device=x.device).masked_fill_(~keep, float("-inf"))
            out = routed_attention(q, k, v, gidx, mask, self.num_heads, self.scale)

        out = _from_regions(out, B, H, W, grid)
        if self.lepe is not None:
            if official:  # NOTE: LePE over the padded V map (padding holds v = bias), then cropped
                lepe = self.lepe(_from_regions(v, B, Hp, Wp, grid).permute(0, 3, 1, 2))[:, :, :H, :W]
            else:
                lepe = self.lepe(_from_regions(v, B, H, W, grid).permute(0, 3, 1, 2))
            out = out + lepe.permute(0, 2, 3, 1)
        return self.proj(out)


class AttentionLePE(nn.Module):
    """Global multi-head self-attention with LePE, BiFormer's stage-4 attention (arXiv 2303.08810), ``(B, H, W, C)``.

    ``out = proj( softmax(q k^T * head_dim^-0.5) v + DWConv_k(x) )`` with ``q, k, v = qkv(x)`` (no bias) and the
    depthwise LePE conv applied to the attention *input* ``x`` (official ``models/_common.py``), fused SDPA.

    Args:
        dim: channels.
        num_heads: heads (official default 8 regardless of ``dim``).
        qkv_bias: bias of ``qkv`` (official False).
        qk_scale: explicit scale, default ``head_dim ** -0.5``.
        side_dwconv: LePE kernel size (odd); 0 disables LePE.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None, side_dwconv: int = 5
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}; pick a divisor")
        if side_dwconv < 0 or (side_dwconv and side_dwconv % 2 == 0):
            raise ValueError(f"side_dwconv={side_dwconv} must be 0 (no LePE) or an odd kernel size")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """BiFormer block (Zhu et al., CVPR 2023, arXiv 2303.08810), ``(B, C, H, W) -> (B, C, H, W)``, NHWC inside.

    ::

        x = x + DWConv3x3(x)                                   # pos_embed
        x = x + DropPath(LayerScale(attn(LN(x))))              # BRA, or AttentionLePE for attn="full"
        x = x + DropPath(LayerScale(Mlp(LN(x))))               # Linear(C, r C) -> GELU -> Linear(r C, C)

    LayerNorms use ``eps=1e-6``; layer scale is off unless ``layer_scale_init_value`` is given.

    Args:
        dim: channels.
        attn: ``"bra"`` (stages 1-3) or ``"full"`` (stage 4, :class:`AttentionLePE`).
        num_heads: heads; default ``dim // 32`` for BRA and 8 for full attention (as the official model).
        n_win, topk, scale_mode, qk_scale, impl, pad_mode: see :class:`BiLevelRoutingAttention` (BRA only).
        side_dwconv: LePE kernel size.
        mlp_ratio: MLP hidden width ratio.
        drop_path: stochastic depth rate.
        layer_scale_init_value: initial layer scale, None/<=0 for none.
    """

    def __init__(
        self,
        dim: int,
        attn: str = "bra",
        num_heads: int | None = None,
        n_win: int = 7,
        topk: int = 4,
        mlp_ratio: float = 3.0,
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = None,
        side_dwconv: int = 5,
        scale_mode: str = "official",
        qk_scale: float | None = None,
        impl: str = "fast",
        pad_mode: str = "mask",
    ) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attn == "bra":
            self.attn = BiLevelRoutingAttention(
                dim,
                num_heads,
                n_win,
                topk,
                scale_mode=scale_mode,
                qk_scale=qk_scale,
                side_dwconv=side_dwconv,
                impl=impl,
                pad_mode=pad_mode,
            )
        elif attn == "full":
            self.attn = AttentionLePE(dim, num_heads or 8, qk_scale=qk_scale, side_dwconv=side_dwconv)
        else:
            raise ValueError(f"attn={attn!r} must be 'bra' or 'full'")
        ls = layer_scale_init_value is not None and layer_scale_init_value > 0
        self.ls1 = LayerScale(dim, layer_scale_init_value) if ls else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init_value) if ls else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x.permute(0, 3, 1, 2)


@register_block("bra", accepts=(BiFormerBlock,))
def bra_block(dim: int, **kwargs) -> BiFormerBlock:
    """BiFormer block with bi-level routing attention (kwargs of :class:`BiFormerBlock`: n_win=7, topk=4, ...)."""
    return BiFormerBlock(dim, attn="bra", **kwargs)


@register_block("bra_full", accepts=(BiFormerBlock,))
def bra_full_block(dim: int, **kwargs) -> BiFormerBlock:
    """BiFormer stage-4 block: the same block with global :class:`AttentionLePE` (num_heads default 8)."""
    return BiFormerBlock(dim, attn="full", **kwargs)
