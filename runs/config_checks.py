"""Config checks that need both the model and the data, run by ``train.py`` before any image is read.

``check_model_fits_data`` compares the task's ``num_classes`` with the datamodule's and every input size the
datamodule and the task declare (``input_sizes()`` of the data and task contracts: classification ``img_size``;
ADE20K ``crop_size``, ``eval_short_side`` and the task's slide crop; COCO the shortest side of ``img_scale`` and
``multi_scale``) with the backbone's total stride
(the largest ``feature_info`` reduction) and, for models with a fixed input size (``pretrained_cfg``
``fixed_input_size``, e.g. ViTs with absolute position embeddings), with that size.
"""

from __future__ import annotations

from torch import nn

from core.errors import ConfigError
from datamodules.base import StrataDataModule
from tasks.base import StrataTask

__all__ = ["backbone_stride", "check_model_fits_data", "data_input_sizes"]


def _find_backbone(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if hasattr(m, "feature_info") and m is not model), None)


def _fixed_input_size(backbone: nn.Module) -> tuple[int, int] | None:
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "strict_img_size", False) and patch_embed.img_size:
        return tuple(int(v) for v in patch_embed.img_size)  # NOTE: the built size (img_size kwarg honoured)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and "input_size" in cfg:
        return tuple(int(v) for v in cfg["input_size"][-2:])
    return None


def backbone_stride(backbone: nn.Module) -> int | None:
    """The largest reduction among the model's feature levels (its total stride), None when it does not say."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        return None
    if hasattr(info, "reduction"):
        reductions = info.reduction()
    else:
        reductions = [level.get("reduction") for level in info if isinstance(level, dict)]
    reductions = [int(r) for r in reductions if r]
    return max(reductions) if reductions else None


def data_input_sizes(datamodule: StrataDataModule, model: StrataTask) -> dict[str, int]:
    """``{argument: smallest image side}`` for every input size the datamodule and the task's inference use."""
    return {**datamodule.input_sizes(), **model.input_sizes()}


def check_model_fits_data(model: StrataTask, datamodule: StrataDataModule) -> None:
    """Raise a one-line ``ConfigError`` when the model cannot work on the datamodule's data (see the module doc)."""
    hp = model.hparams
    data_classes = datamodule.num_classes
    if "num_classes" in hp and int(hp["num_classes"]) != int(data_classes):
        raise ConfigError(
            f"model.num_classes {hp['num_classes']} does not match the {data_classes} classes of the data "
            f"({datamodule.describe()}): leave model.num_classes unset "
            "(train.py links it from the data) or point data.root at the right dataset"
        )
    backbone = _find_backbone(model)
    if backbone is None:
        return
    name = hp.get("backbone", type(backbone).__name__)
    sizes = data_input_sizes(datamodule, model)
    stride = backbone_stride(backbone)
    for arg, size in sizes.items():
        if stride is not None and size < stride:
            raise ConfigError(
                f"{arg} {size} is smaller than the total stride {stride} of {name}: use images of at least {stride} "
                "pixels"
            )
    fixed = _fixed_input_size(backbone)
    if fixed is not None:
        for arg, size in sizes.items():
            if arg != "data.img_size" or (size, size) != fixed:
                raise ConfigError(
                    f"{name} takes only {fixed[0]}x{fixed[1]} inputs but {arg} is {size}: set data.img_size "
                    f"{fixed[0]} or pick a backbone without a fixed input size"
                )
