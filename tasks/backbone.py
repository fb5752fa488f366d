"""Backbone construction shared by the tasks: any timm-registered model, by name, with a clear error otherwise."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from datamodules.errors import ConfigError

__all__ = ["ConfigError", "closest_model_names", "create_backbone"]


def closest_model_names(name: str, n: int = 5) -> list[str]:
    """The registered timm model names closest to ``name`` (the project's models are registered on import)."""
    import backbones  # noqa: F401  (registers the project's models)

    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.5)


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, ...)`` for any registered model, the project's or timm's.

    Args:
        name: registered model name (``resnet18``, ``biformer_tiny``, ...).
        pretrained: load the model's default pretrained weights (needs them on disk or a reachable hub).
        pretrained_file: load weights from this local file (``.safetensors``/``.pth``) through the model's
            ``checkpoint_filter_fn``; implies ``pretrained``.
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``drop_path_rate``, ``features_only``, ...).

    Raises:
        ConfigError: for an unknown model name, listing the closest registered names.
    """
    import backbones  # noqa: F401  (registers the project's models)

    if not timm.is_model(name):
        close = closest_model_names(name)
        hint = (
            f"closest registered names: {', '.join(close)}" if close else "list them with timm.list_models('*pattern*')"
        )
        raise ConfigError(f"unknown backbone {name!r} (model.backbone): {hint}")
    if pretrained_file is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=pretrained_file, **kwargs.pop("pretrained_cfg_overlay", {}))
        pretrained = True
    return timm.create_model(name, pretrained=pretrained, **kwargs)
