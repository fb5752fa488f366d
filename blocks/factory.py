"""String-keyed factory for the attention blocks.

Contract (timm's ``create_attn`` convention): the first positional argument of every registered block is the
channel count, and every registered block maps ``(B, C, H, W) -> (B, C, H, W)`` for any ``H, W >= 1``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

__all__ = ["create_block", "list_blocks", "register_block"]

_BLOCKS: dict[str, Callable[..., nn.Module]] = {}


def register_block(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a block class (or constructor) under a short lowercase key."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BLOCKS:
            raise ValueError(f"block {name!r} is already registered by {_BLOCKS[name]!r}")
        _BLOCKS[name] = fn
        return fn

    return wrap


def list_blocks() -> list[str]:
    """The registered block keys, sorted."""
    return sorted(_BLOCKS)


def create_block(name: str, dim: int, **kwargs) -> nn.Module:
    """Build the block registered as ``name`` for ``dim`` channels.

    Raises:
        ValueError: for an unknown name, listing the closest registered names.
    """
    if name not in _BLOCKS:
        close = difflib.get_close_matches(name, list_blocks(), n=3, cutoff=0.3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown block {name!r}.{hint} Registered blocks: {', '.join(list_blocks())}")
    return _BLOCKS[name](dim, **kwargs)
