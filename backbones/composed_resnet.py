"""``composed_resnet``: timm's own ResNet with any registered attention gate of the project in each stage.

Paper: `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385; the gates are the
project's ``kind="attention"`` blocks (``se``, ``eca``, ``ca`` and any plugin's). timm's ``Bottleneck`` /
``BasicBlock`` call their ``attn_layer`` on the block's output channels after the last conv and norm, before the
residual add (the SE-ResNet placement); here that layer is the stage's gate, chosen from the config::

    backbone: composed_resnet
    backbone_kwargs: {layers: [3, 4, 6, 3], attn: [se, se, ca, ca], attn_kwargs: {reduction: 16}}

``attn`` / ``attn_kwargs`` take one value for every stage or one per stage (``null``: no gate there); every other
keyword goes to timm's ``ResNet`` (``stem_type``, ``avg_down``, ``channels``, ...). The gates are checked before
anything is built, as in ``composed_backbone``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from blocks import block_spec, check_block_kwargs, create_block, list_blocks

from .composed import FIELD, CompositionError

__all__ = ["StageGates"]

_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class StageGates:
    """timm's ``attn_layer`` for a ResNet whose stages output distinct widths: the gate of the stage of ``channels``.

    Args:
        gates: output width of each stage -> ``(block key, kwargs)`` or None for no gate.
    """

    def __init__(self, gates: dict[int, tuple[str, dict[str, Any]] | None]) -> None:
        self.gates = gates

    def __call__(
        self, channels: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        gate = self.gates[channels]
        if gate is None:
            return nn.Identity()
        key, kwargs = gate
        return create_block(key, channels, **kwargs).to(device=device, dtype=dtype)


def _per_stage(value: Any, n: int, name: str) -> list[Any]:
    if value is None or isinstance(value, (str, dict)) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise CompositionError(f"{FIELD}.{name} has {len(value)} entries but layers has {n} stages")
    return list(value)


def _stage_gates(widths: list[int], attn: Any, attn_kwargs: Any) -> StageGates:
    if len(set(widths)) != len(widths):
        raise CompositionError(f"{FIELD}.channels gives two stages one width ({widths}): each stage needs its own")
    keys, kwargs = _per_stage(attn, len(widths), "attn"), _per_stage(attn_kwargs or {}, len(widths), "attn_kwargs")
    gates: dict[int, tuple[str, dict[str, Any]] | None] = {}
    for i, (width, key, kw) in enumerate(zip(widths, keys, kwargs)):
        if key is None:
            gates[width] = None
            continue
        try:
            spec = block_spec(key)
        except ValueError as error:
            raise CompositionError(f"{FIELD}.attn[{i}]: {error}") from None
        if spec.kind != "attention":
            gates_list = ", ".join(list_blocks("attention"))
            raise CompositionError(
                f"{FIELD}.attn[{i}]={key!r} is a {spec.kind}, not an attention gate: use {gates_list}"
            )
        problems = check_block_kwargs(key, width, dict(kw or {}))
        if problems:
            raise CompositionError(f"{FIELD}.attn_kwargs[{i}] (stage {i}, {key}): {problems[0]}")
        gates[width] = (key, dict(kw or {}))
    return StageGates(gates)


default_cfgs = generate_default_cfgs(
    {
        "composed_resnet": {
            "url": "",
            "num_classes": 1000,
            "input_size": (3, 224, 224),
            "pool_size": (7, 7),
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "conv1",
            "classifier": "fc",
        }
    }
)


@register_model
def composed_resnet(
    pretrained: bool = False,
    layers: Sequence[int] = (3, 4, 6, 3),
    block: str = "bottleneck",
    attn: str | Sequence[str | None] | None = "se",
    attn_kwargs: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> ResNet:
    """timm's ResNet (``block`` 'basic' or 'bottleneck') with a project gate per stage; see the module docstring."""
    if block not in _BLOCKS:
        raise CompositionError(f"{FIELD}.block={block!r} must be one of {', '.join(_BLOCKS)}")
    block_cls = _BLOCKS[block]
    channels = list(kwargs.get("channels", (64, 128, 256, 512)))
    if len(channels) != len(layers):
        raise CompositionError(f"{FIELD}.channels has {len(channels)} entries but layers has {len(layers)} stages")
    gates = _stage_gates([c * block_cls.expansion for c in channels], attn, attn_kwargs)
    block_args = dict(kwargs.pop("block_args", None) or {}, attn_layer=gates)
    return build_model_with_cfg(
        ResNet, "composed_resnet", pretrained, block=block_cls, layers=list(layers), block_args=block_args, **kwargs
    )
