"""Export trained weights in timm's layout so ``timm.create_model`` loads them anywhere.

Writes ``model.safetensors`` and ``config.json`` (timm's Hugging Face layout, via ``timm.models.save_for_hf``) plus
``pretrained_cfg.json`` (the run-directory contract). Two ways to load the result::

    timm.create_model(backbone, pretrained=True, num_classes=K,
                      pretrained_cfg_overlay=dict(file="<run>/model.safetensors", num_classes=K))
    timm.create_model("local-dir:<run>", pretrained=True)

``num_classes`` must be in the overlay too: timm drops the classifier weights when the model's class count differs
from its pretrained cfg's (1000 for ImageNet models).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timm.models import save_for_hf
from torch import nn

from core.files import disk_full_errors, move_into_place

__all__ = ["export_for_timm"]


def export_for_timm(
    model: nn.Module,
    run_dir: str | Path,
    *,
    data_config: dict[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``pretrained_cfg.json`` for a timm model into ``run_dir``.

    Each file is written to a temporary folder first and moved into place, so a reader never sees a partial file; a
    full disk is a one-line ``DiskFullError`` (``core.files.disk_full_errors``). ``model_args`` (plain values) go into
    ``config.json`` as timm's ``model_args``, so ``local-dir:`` loading builds the architecture the weights belong to
    (a ``composed_backbone``'s stages, a dense task's ``n_win``). Returns the path of ``model.safetensors``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_config: dict[str, Any] = {}
    if label_names is not None:
        model_config["label_names"] = list(label_names)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".export-") as tmp:
        with disk_full_errors(run_dir / "model.safetensors"):
            save_for_hf(
                model,
                tmp,
                model_config=model_config,
                model_args=model_args or None,
                safe_serialization=True,
                data_config=data_config,
            )
        config = json.loads((Path(tmp) / "config.json").read_text())
        pretrained_cfg = dict(config.get("pretrained_cfg", {}))
        pretrained_cfg.pop("tag", None)  # NOTE: the tag of the weights training started from, not of these
        pretrained_cfg.update(
            architecture=config["architecture"],
            num_classes=config["num_classes"],
            file="model.safetensors",
        )
        if label_names is not None:
            pretrained_cfg["label_names"] = list(label_names)
        (Path(tmp) / "pretrained_cfg.json").write_text(json.dumps(pretrained_cfg, indent=2) + "\n")
        for name in ("model.safetensors", "config.json", "pretrained_cfg.json"):
            move_into_place(Path(tmp) / name, run_dir / name)
    return run_dir / "model.safetensors"
