"""Strata's BiFormer parameter names mapped back to the official code's (rayleizhu/BiFormer ``models/biformer.py``)."""

from __future__ import annotations

import re

__all__ = ["biformer_name_to_official"]

_STEM = {"conv1": "0", "norm1": "1", "conv2": "3", "norm2": "4"}
_DOWN = {"conv": "0", "norm": "1"}


def biformer_name_to_official(name: str) -> str:
    """The official name of one of Strata's ``biformer_*`` state-dict keys (classification layout)."""
    name = re.sub(r"^stem\.(\w+)\.", lambda m: f"downsample_layers.0.{_STEM[m[1]]}.", name)
    name = re.sub(r"^stages\.(\d)\.downsample\.(\w+)\.", lambda m: f"downsample_layers.{m[1]}.{_DOWN[m[2]]}.", name)
    name = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", name)
    name = re.sub(r"^(stages\.[0-2]\.\d+\.attn)\.qkv\.", r"\1.qkv.qkv.", name).replace(".attn.proj.", ".attn.wo.")
    name = re.sub(r"^(stages\.3\.\d+\.attn)\.wo\.", r"\1.proj.", name)
    name = name.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.3.")
    return name.replace("norm_pre.", "norm.").replace("head.fc.", "head.")
