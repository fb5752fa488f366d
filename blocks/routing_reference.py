"""Plain reference kernel of bi-level routing attention: gather of the routed regions over an expanded tensor.

"BiFormer: Vision Transformer with Bi-Level Routing Attention", Zhu et al., CVPR 2023 (arXiv 2303.08810).

This is the straightforward implementation of the token-level step, written after the official ``KVGather`` +
attention of ``ops/bra_legacy.py``: the concatenated K/V of all regions is viewed as ``(B, R, R, w2, c)`` by
``expand``, the routed regions are picked with ``torch.gather`` (materialising ``topk`` copies of K/V) and attention
is computed with an explicit softmax (the probability matrix is kept for backward). The backward of that gather
allocates a zero tensor of the *expanded* shape, ``R`` times the size of K/V, which is what makes it slow.

It is kept as the numerical reference for the tests and as the baseline of ``scripts/benchmark_bra.py``; the model
uses the fast kernel in ``blocks/routing.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["routed_attention_reference"]


def routed_attention_reference(
    q: Tensor, kv: Tensor, idx: Tensor, scale: float, num_heads: int, key_valid: Tensor | None = None
) -> Tensor:
    """Multi-head attention of every query region over the tokens of its routed key regions.

    Args:
        q: queries in region-major layout, ``(B, R, w2, qk_dim)``.
        kv: keys and values concatenated on channels, ``(B, R, w2, qk_dim + dim)``.
        idx: routed key regions of every query region, ``(B, R, topk)`` (int64).
        scale: multiplier of the logits.
        num_heads: heads; channel ``c`` of a head-split tensor belongs to head ``c // head_dim``.
        key_valid: ``(R, w2)`` bool, False at padding tokens (they get no attention weight); None if unpadded or
            if padding takes part as keys (``pad_mode="official"``, the official ``auto_pad``).

    Returns:
        ``(B, R, w2, dim)``.
    """
    B, R, w2, ckv = kv.shape
    qk_dim = q.shape[-1]
    topk = idx.shape[-1]
    kv_sel = torch.gather(
        kv.view(B, 1, R, w2, ckv).expand(-1, R, -1, -1, -1),
        dim=2,
        index=idx.view(B, R, topk, 1, 1).expand(-1, -1, -1, w2, ckv),
    )  # (B, R, topk, w2, ckv)
    k_sel, v_sel = kv_sel.split([qk_dim, ckv - qk_dim], dim=-1)
    k_sel = k_sel.reshape(B * R, topk * w2, num_heads, -1).permute(0, 2, 3, 1)  # (BR, m, c, topk * w2)
    v_sel = v_sel.reshape(B * R, topk * w2, num_heads, -1).transpose(1, 2)  # (BR, m, topk * w2, c)
    q = q.reshape(B * R, w2, num_heads, -1).transpose(1, 2)  # (BR, m, w2, c)
    logits = (q * scale) @ k_sel
    if key_valid is not None:
        valid = key_valid[idx].reshape(B * R, 1, 1, topk * w2)
        logits = logits.masked_fill(~valid, float("-inf"))
    out = logits.softmax(dim=-1) @ v_sel  # (BR, m, w2, c)
    return out.transpose(1, 2).reshape(B, R, w2, -1)
