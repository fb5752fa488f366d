"""Attention capture: what the attention blocks computed in one forward pass, recorded for one image of the batch.

Forward hooks on existing submodules wherever the needed tensor passes through one:

* coordinate attention (``blocks.coordinate.CoordinateAttention``, arXiv 2103.02907): ``conv_h`` / ``conv_w``
  outputs -> the H gate ``sigmoid(conv_h(f_h))`` ``(C, H)`` and the W gate ``(C, W)``;
* squeeze-and-excitation / ECA (any timm ``SEModule`` / ``EcaModule``, arXiv 1709.01507 / 1910.03151): the
  ``gate`` output -> the channel weights ``(C,)``;
* DaViT (``blocks.dual``, arXiv 2204.03645): the spatial block's ``norm1`` output (map size) and its window
  attention's ``qkv`` output -> per-window ``softmax(q k^T / sqrt(d) + mask)``; the channel block's ``qkv`` output
  -> the channel-group matrices ``softmax(d^-1/2 k^T v)`` ``(groups, d, d)``.

Bi-level routing attention (``blocks.routing.BiLevelRoutingAttention``, arXiv 2303.08810) computes its region-major
q, k, v and top-k region ids only inside ``forward``; it hands them to its ``capture`` attribute, which is None
(one ``if``) unless a capture is attached. Nothing is recorded, and no hook exists, outside ``with
AttentionCapture(model)``: the model's outputs and speed are those of a model never captured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from timm.layers import EcaModule, SEModule
from torch import Tensor, nn

from blocks.coordinate import CoordinateAttention
from blocks.dual import ChannelBlock, SpatialBlock
from blocks.routing import BiLevelRoutingAttention

__all__ = [
    "AttentionCapture",
    "ChannelGroupRecord",
    "ChannelWeightsRecord",
    "CoordinateGatesRecord",
    "RoutingRecord",
    "WindowRecord",
]


@dataclass
class CoordinateGatesRecord:
    """Coordinate attention gates of one image (Hou et al., "Coordinate Attention for Efficient Mobile Network
    Design", arXiv 2103.02907): ``h_gate = a_h`` ``(C, H)``, ``w_gate = a_w`` ``(C, W)``, the block computes
    ``y = x * a_h * a_w``."""

    name: str
    h_gate: Tensor | None = None
    w_gate: Tensor | None = None

    def product(self) -> Tensor:
        """``a_h * a_w`` per channel, ``(C, H, W)``: the multiplier the block applies to ``x``."""
        return self.h_gate[:, :, None] * self.w_gate[:, None, :]


@dataclass
class ChannelWeightsRecord:
    """Channel weights ``(C,)`` of an SE or ECA module, ``y = x * weights`` (``kind`` ``"se"``: "Squeeze-and-Excitation
    Networks", arXiv 1709.01507, ``sigmoid(W2 relu(W1 GAP(x)))``; ``"eca"``: "ECA-Net", arXiv 1910.03151,
    ``sigmoid(conv1d_k(GAP(x)))``)."""

    name: str
    kind: str
    weights: Tensor


@dataclass
class RoutingRecord:
    """Bi-level routing of one image (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention",
    arXiv 2303.08810): region geometry, top-k region ids and the region-major q, k, v.

    Token attention of query ``t`` in region ``i``: ``softmax_j(scale * q_t . k_j)`` over the tokens ``j`` of the
    regions ``idx[i]`` (padding tokens excluded when ``key_valid`` marks them, the default ``pad_mode="mask"``; under
    ``pad_mode="official"`` padded tokens are keys too, so the weights shown over the cropped map can sum to less than
    1), per head.

    Regions are numbered row-major over the ``nh x nw`` region grid of the ``size = (H, W)`` token map; region ``r``
    covers token rows ``[(r // nw) * rh, ...)`` and columns ``[(r % nw) * rw, ...)`` (cropped to the map).
    ``idx`` is ``(R, topk)``, exactly the block's router output; ``q``/``k``/``v`` are ``(R, rh * rw, c)``.
    """

    name: str
    idx: Tensor
    grid: tuple[int, int, int, int]
    size: tuple[int, int]
    q: Tensor
    k: Tensor
    v: Tensor
    key_valid: Tensor | None
    num_heads: int
    scale: float

    def region_of(self, row: int, col: int) -> int:
        """The region holding token ``(row, col)`` of the map."""
        rh, rw, _, nw = self.grid
        return (row // rh) * nw + col // rw

    def routed_regions(self, region: int) -> list[int]:
        """The key regions query region ``region`` attends to, in the router's (descending score) order."""
        return [int(r) for r in self.idx[region]]

    def region_mask(self, regions: list[int]) -> Tensor:
        """Bool ``(H, W)`` map, True on the tokens of ``regions``."""
        rh, rw, nh, nw = self.grid
        chosen = torch.zeros(nh * nw, dtype=torch.bool, device=self.idx.device)
        chosen[regions] = True
        mask = chosen.view(nh, nw).repeat_interleave(rh, 0).repeat_interleave(rw, 1)
        return mask[: self.size[0], : self.size[1]]

    def _query(self, row: int, col: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rh, rw, _, _ = self.grid
        region = self.region_of(row, col)
        q = self.q[region, (row % rh) * rw + col % rw].float().view(self.num_heads, -1)  # (heads, d)
        keys = self.idx[region]
        k = self.k[keys].float().flatten(0, 1).view(-1, self.num_heads, q.shape[-1])  # (topk * w2, heads, d)
        v = self.v[keys].float().flatten(0, 1)  # (topk * w2, dim)
        logits = torch.einsum("hd,nhd->hn", q * self.scale, k)
        if self.key_valid is not None:
            logits = logits.masked_fill(~self.key_valid[keys].flatten().view(1, -1), float("-inf"))
        return logits.softmax(-1), keys, v, q

    def token_attention(self, row: int, col: int) -> Tensor:
        """Attention probabilities of query token ``(row, col)`` per head over the map, ``(heads, H, W)``.

        Zero outside the routed regions; each head sums to 1 (the block's token-level softmax).
        """
        probs, keys, _, _ = self._query(row, col)
        rh, rw, nh, nw = self.grid
        full = probs.new_zeros(self.num_heads, nh * nw, rh * rw)
        full[:, keys] = probs.view(self.num_heads, len(keys), rh * rw)
        full = full.view(self.num_heads, nh, nw, rh, rw).permute(0, 1, 3, 2, 4).reshape(self.num_heads, nh * rh, -1)
        return full[:, : self.size[0], : self.size[1]]

    def token_output(self, row: int, col: int) -> Tensor:
        """The routed attention output of token ``(row, col)`` (before LePE and the projection), ``(dim,)``."""
        probs, _, v, _ = self._query(row, col)
        v = v.view(-1, self.num_heads, v.shape[-1] // self.num_heads)
        return torch.einsum("hn,nhd->hd", probs, v).flatten()


@dataclass
class WindowRecord:
    """Window attention of one image (Ding et al., "DaViT: Dual Attention Vision Transformers", arXiv 2204.03645):
    ``softmax(q k^T / sqrt(d) + mask)`` per window and head, from the map ``size``, ``window`` ``(wh, ww)`` and the
    windows' ``qkv``.

    ``qkv`` is ``(nh * nw, wh * ww, 3 * C)``, windows row-major over the zero-padded map, tokens row-major inside.
    """

    name: str
    size: tuple[int, int] | None = None
    window: tuple[int, int] = (7, 7)
    num_heads: int = 1
    qkv: Tensor | None = None

    def window_bounds(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` on the map of the window holding token ``(row, col)`` (cropped)."""
        wh, ww = self.window
        top, left = (row // wh) * wh, (col // ww) * ww
        return top, left, min(top + wh, self.size[0]), min(left + ww, self.size[1])

    def _probs(self, row: int, col: int) -> tuple[Tensor, Tensor, int]:
        H, W = self.size
        wh, ww = self.window
        nw = -(-W // ww)
        index = (row // wh) * nw + col // ww
        qkv = self.qkv[index].float()
        N, C3 = qkv.shape
        q, k, v = qkv.view(N, 3, self.num_heads, C3 // 3 // self.num_heads).unbind(1)  # (N, heads, d)
        token = (row % wh) * ww + col % ww
        logits = torch.einsum("hd,nhd->hn", q[token], k) * q.shape[-1] ** -0.5
        top, left = (row // wh) * wh, (col // ww) * ww
        rows = torch.arange(top, top + wh, device=logits.device).view(wh, 1) < H
        cols = torch.arange(left, left + ww, device=logits.device).view(1, ww) < W
        logits = logits.masked_fill(~(rows & cols).flatten().view(1, -1), float("-inf"))
        return logits.softmax(-1), v, index

    def token_attention(self, row: int, col: int) -> Tensor:
        """Attention of query token ``(row, col)`` per head over the map, ``(heads, H, W)``, zero outside its window."""
        probs, _, _ = self._probs(row, col)
        wh, ww = self.window
        top, left, bottom, right = self.window_bounds(row, col)
        out = probs.new_zeros(self.num_heads, *self.size)
        out[:, top:bottom, left:right] = probs.view(self.num_heads, wh, ww)[:, : bottom - top, : right - left]
        return out

    def token_output(self, row: int, col: int) -> Tensor:
        """Window attention output of token ``(row, col)`` before the projection, ``(C,)``."""
        probs, v, _ = self._probs(row, col)
        return torch.einsum("hn,nhd->hd", probs, v).flatten()


@dataclass
class ChannelGroupRecord:
    """Channel-group attention of one image (DaViT, arXiv 2204.03645): ``attn = softmax(d^-1/2 k^T v)`` per group,
    ``(groups, d, d)``; the block's output channel ``i`` of a group is ``sum_j attn[i, j] q_j``."""

    name: str
    attn: Tensor


@dataclass
class _Pending:
    window: dict[str, WindowRecord] = field(default_factory=dict)
    gates: dict[str, CoordinateGatesRecord] = field(default_factory=dict)


class AttentionCapture:
    """Records the attention of every supported block of ``model`` while the context is open (coordinate attention,
    SE/ECA, bi-level routing, DaViT window and channel-group attention: papers and formulas in the record classes).

    ``records`` maps module names (``model.named_modules()``) to the record of the last forward pass, for batch
    element ``index``. On exit every hook is removed and every routing block's ``capture`` reset to None.

    Example::

        with AttentionCapture(model) as capture:
            model(images)
        gates = capture.of_type(CoordinateGatesRecord)

    Args:
        model: any ``nn.Module``; unsupported modules are ignored.
        index: batch element to record.
    """

    def __init__(self, model: nn.Module, index: int = 0) -> None:
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        self.model = model
        self.index = index
        self.records: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._routing: list[BiLevelRoutingAttention] = []
        self._pending = _Pending()

    def __enter__(self) -> AttentionCapture:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def of_type(self, kind: type) -> list[Any]:
        """The records of one type, in module order."""
        return [r for r in self.records.values() if isinstance(r, kind)]

    def attach(self) -> None:
        """Install the hooks (and the routing blocks' capture callbacks)."""
        if self._handles or self._routing:
            raise ValueError("this AttentionCapture is already attached; call detach() first")
        for name, module in self.model.named_modules():
            if isinstance(module, CoordinateAttention):
                self._hook(module.conv_h, partial(self._on_gate, name, "h"))
                self._hook(module.conv_w, partial(self._on_gate, name, "w"))
            elif isinstance(module, (SEModule, EcaModule)):
                kind = "se" if isinstance(module, SEModule) else "eca"
                self._hook(module.gate, partial(self._on_channel_weights, name, kind))
            elif isinstance(module, BiLevelRoutingAttention):
                if module.capture is not None:
                    raise ValueError(f"{name} is already being captured; close the other AttentionCapture first")
                module.capture = partial(self._on_routing, name, module)
                self._routing.append(module)
            elif isinstance(module, SpatialBlock):
                self._hook(module.norm1, partial(self._on_window_size, name, module))
                self._hook(module.attn.qkv, partial(self._on_window_qkv, name))
            elif isinstance(module, ChannelBlock):
                self._hook(module.attn.qkv, partial(self._on_channel_qkv, name, module.attn))

    def detach(self) -> None:
        """Remove every hook; the model is as if never captured."""
        for handle in self._handles:
            handle.remove()
        for module in self._routing:
            module.capture = None
        self._handles, self._routing = [], []

    def _hook(self, module: nn.Module, fn: Any) -> None:
        self._handles.append(module.register_forward_hook(lambda _m, _inp, out: fn(out)))

    def _on_gate(self, name: str, axis: str, out: Tensor) -> None:
        record = self.records.setdefault(name, CoordinateGatesRecord(name))
        gate = out[self.index].detach().sigmoid()[:, :, 0]  # conv_h: (C, H, 1); conv_w: (C, W, 1)
        if axis == "h":
            record.h_gate = gate
        else:
            record.w_gate = gate

    def _on_channel_weights(self, name: str, kind: str, out: Tensor) -> None:
        self.records[name] = ChannelWeightsRecord(name, kind, out[self.index].detach().flatten())

    def _on_routing(self, name: str, module: BiLevelRoutingAttention, **t: Any) -> None:
        _, _, nh, nw = t["grid"]
        R = nh * nw
        rows = slice(self.index * R, (self.index + 1) * R)
        self.records[name] = RoutingRecord(
            name=name,
            idx=t["idx"][self.index].detach(),
            grid=tuple(t["grid"]),
            size=tuple(t["size"]),
            q=t["q"][rows].detach(),
            k=t["k"][rows].detach(),
            v=t["v"][rows].detach(),
            key_valid=t["key_valid"],
            num_heads=module.num_heads,
            scale=module.scale,
        )

    def _on_window_size(self, name: str, module: SpatialBlock, out: Tensor) -> None:
        self._pending.window[name] = WindowRecord(
            name, size=tuple(out.shape[1:3]), window=tuple(module.window_size), num_heads=module.attn.num_heads
        )

    def _on_window_qkv(self, name: str, out: Tensor) -> None:
        record = self._pending.window.pop(name)
        (H, W), (wh, ww) = record.size, record.window
        windows = -(-H // wh) * -(-W // ww)
        record.qkv = out[self.index * windows : (self.index + 1) * windows].detach()
        self.records[name] = record

    def _on_channel_qkv(self, name: str, attn: nn.Module, out: Tensor) -> None:
        N, C3 = out.shape[1:]
        _, k, v = out[self.index].detach().float().view(N, 3, attn.num_heads, C3 // 3 // attn.num_heads).unbind(1)
        matrix = ((k * attn.scale).permute(1, 2, 0) @ v.transpose(0, 1)).softmax(-1)  # (groups, d, d)
        self.records[name] = ChannelGroupRecord(name, matrix)
