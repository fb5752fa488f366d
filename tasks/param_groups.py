"""Weight-decay parameter groups: timm's rule, or mmcv's ``paramwise_cfg.custom_keys`` rule of the dense recipes.

timm (``create_optimizer_v2``, the DeiT recipe) exempts every 1-D parameter (norms, biases) and the model's
``no_weight_decay()`` set. mmdetection / mmsegmentation exempt only the parameters whose *name* contains one of the
config's ``custom_keys`` with ``decay_mult=0`` (BiFormer's Mask R-CNN and UperNet configs: ``norm``,
``absolute_pos_embed``, ``relative_position_bias_table``) and decay everything else, biases included; configs without
``paramwise_cfg`` (BiFormer's RetinaNet and Semantic FPN) decay every parameter. Written here because mmcv's
``DefaultOptimizerConstructor`` is not a dependency.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from core.errors import ConfigError

__all__ = ["create_adamw", "no_decay_parameter_names"]


def _patterns(no_weight_decay: Sequence[str]) -> list[re.Pattern[str]]:
    patterns = []
    for key in no_weight_decay:
        try:
            patterns.append(re.compile(key))
        except re.error as error:
            raise ConfigError(f"model.no_weight_decay entry {key!r} is not a regular expression ({error})") from None
    return patterns


def no_decay_parameter_names(model: nn.Module, no_weight_decay: Sequence[str]) -> set[str]:
    """Names of the trainable parameters that one of ``no_weight_decay`` matches (``re.search`` on the name).

    A plain word such as ``norm`` is mmcv's substring key; a regular expression can state a paper's rule on this
    project's names when they differ from the official ones (e.g. ``blocks\\.\\d+\\.norm``).
    """
    patterns = _patterns(no_weight_decay)
    return {
        name
        for name, param in model.named_parameters()
        if param.requires_grad and any(p.search(name) for p in patterns)
    }


def create_adamw(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    no_weight_decay: Sequence[str] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (``torch.optim.AdamW`` through timm) over ``model``'s trainable parameters.

    Args:
        model: the module to optimise (frozen parameters are left out).
        lr: learning rate.
        weight_decay: decoupled weight decay.
        betas: AdamW betas.
        no_weight_decay: ``None`` for timm's rule (no decay on 1-D parameters and ``no_weight_decay()``); a list of
            name patterns for mmcv's rule (decay everything but the matches; ``[]`` decays every parameter).
    """
    if no_weight_decay is None:
        return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    exempt = no_decay_parameter_names(model, no_weight_decay)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in trainable if n not in exempt], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n in exempt], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=weight_decay, betas=tuple(betas))
