"""Attention blocks: plain ``nn.Module``s (no timm registry, no Lightning), built by name with ``create_block``."""

from . import channel, coordinate, dual, inverted_residual, routing  # noqa: F401  (importing registers their blocks)
from .factory import (
    PLUGIN_GROUP,
    BlockPluginError,
    BlockSpec,
    block_spec,
    check_block_kwargs,
    closest_blocks,
    create_block,
    list_blocks,
    register_block,
)

__all__ = [
    "PLUGIN_GROUP",
    "BlockPluginError",
    "BlockSpec",
    "block_spec",
    "check_block_kwargs",
    "closest_blocks",
    "create_block",
    "list_blocks",
    "register_block",
]
