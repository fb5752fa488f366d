"""``composed_backbone``: a hierarchical backbone whose whole architecture comes from its keyword arguments.

One registered timm model for any stack of registered blocks (``blocks.list_blocks()``, plugins included): the
config gives depths, widths, the block key and block kwargs of every stage (a scalar broadcasts to all stages), the
stem, the downsampling, the norms, the head and the drop-path rate, and :class:`~backbones.hierarchical.HierarchicalNet`
assembles them. The paper models are configurations of it: ``configs/composed/biformer_tiny.yaml`` and
``configs/composed/strata_hybrid_tiny.yaml`` rebuild ``biformer_tiny`` and ``strata_hybrid_tiny`` with the same
parameters, state-dict keys and outputs. In a run config::

    model:
      init_args:
        backbone: composed_backbone
        backbone_kwargs:
          depths: [2, 2, 8, 2]
          embed_dims: [64, 128, 256, 512]
          block: [mbconv, mbconv, bra, dual]
          block_kwargs: [{attn: se}, {attn: se}, {n_win: 7, topk: 16}, {window_size: 7}]

Everything is checked before a module is built (``check_composition``): an unknown block (closest keys listed), a
per-stage list of the wrong length, a keyword a block does not take, a width ``num_heads`` does not divide. Each is
a one-line ``CompositionError`` naming the field (``ValueError``; the command line turns it into exit code 2). The
arguments are plain YAML values, so the exported ``config.json`` holds them as timm's ``model_args`` and
``timm.create_model("local-dir:RUN", pretrained=True)`` rebuilds the architecture with no YAML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from blocks import block_spec, check_block_kwargs

from .conv_attention_hybrid import checkpoint_filter_fn
from .hierarchical import HierarchicalNet, build_hierarchical

__all__ = ["CompositionError", "check_composition"]

FIELD = "backbone_kwargs"


class CompositionError(ValueError):
    """A ``composed_backbone`` argument that cannot build; the message names the field and the fix."""


def _stage_values(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (str, dict)) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise CompositionError(
            f"{FIELD}.{name} has {len(value)} entries but depths has {n} stages: give one value or one per stage"
        )
    return list(value)


def check_composition(
    depths: Sequence[int], embed_dims: Sequence[int], block: Any, block_kwargs: Any = None
) -> list[tuple[str, dict[str, Any]]]:
    """Check the per-stage arguments of a composed backbone without building anything; return ``(key, kwargs)``
    per stage.

    Raises:
        CompositionError: the first problem, in one line naming the field.
    """
    depths, embed_dims = list(depths), list(embed_dims)
    n = len(depths)
    if n < 1 or any(not isinstance(d, int) or d < 1 for d in depths):
        raise CompositionError(f"{FIELD}.depths={depths} needs one positive integer per stage")
    if len(embed_dims) != n:
        raise CompositionError(
            f"{FIELD}.embed_dims has {len(embed_dims)} entries but depths has {n} stages: give one width per stage"
        )
    keys = _stage_values(block, n, "block")
    kwargs = _stage_values(block_kwargs if block_kwargs is not None else {}, n, "block_kwargs")
    stages = []
    for i, (key, dim, kw) in enumerate(zip(keys, embed_dims, kwargs)):
        where = (
            f"{FIELD}.block[{i}]" if isinstance(block, Sequence) and not isinstance(block, str) else f"{FIELD}.block"
        )
        if not isinstance(key, str):
            raise CompositionError(f"{where}={key!r} must be a registered block key (blocks.list_blocks())")
        if not isinstance(kw, dict):
            raise CompositionError(f"{FIELD}.block_kwargs[{i}]={kw!r} must be a mapping of keyword arguments")
        try:
            block_spec(key)
        except ValueError as error:
            raise CompositionError(f"{where}: {error}") from None
        problems = check_block_kwargs(key, int(dim), kw)
        if problems:
            raise CompositionError(f"{FIELD}.block_kwargs[{i}] (stage {i}, {key}, width {dim}): {problems[0]}")
        stages.append((key, dict(kw)))
    return stages


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"composed_backbone": _cfg()})


@register_model
def composed_backbone(
    pretrained: bool = False,
    depths: Sequence[int] = (2, 2, 6, 2),
    embed_dims: Sequence[int] = (64, 128, 256, 512),
    block: str | Sequence[str] = "bra",
    block_kwargs: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> HierarchicalNet:
    """A :class:`HierarchicalNet` from plain arguments; see the module docstring. ``kwargs`` are the other
    ``HierarchicalNet`` arguments (``stem_type``, ``downsample_type``, ``norm_layer``, ``final_norm``,
    ``head_type``, ``drop_path_rate``, ...) and timm's (``num_classes``, ``features_only``, ...)."""
    stages = check_composition(depths, embed_dims, block, block_kwargs)
    if kwargs.get("stem_type") == "patch" and kwargs.get("pretrained_cfg_overlay") is None:
        kwargs["pretrained_cfg_overlay"] = dict(first_conv="stem.conv")
    return build_hierarchical(
        "composed_backbone",
        pretrained,
        checkpoint_filter_fn,
        depths=list(depths),
        embed_dims=list(embed_dims),
        block=[key for key, _ in stages],
        block_kwargs=[kw for _, kw in stages],
        **kwargs,
    )
