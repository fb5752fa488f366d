"""Attention blocks: plain ``nn.Module``s (no timm registry, no Lightning), built by name with ``create_block``."""

from . import channel, coordinate, dual, inverted_residual, routing  # noqa: F401  (importing registers their blocks)
from .factory import create_block, list_blocks, register_block

__all__ = ["create_block", "list_blocks", "register_block"]
