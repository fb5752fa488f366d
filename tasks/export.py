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
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
from timm.models import save_for_hf
from torch import nn

__all__ = ["backbone_from_features", "export_for_timm"]


def export_for_timm(
    model: nn.Module,
    run_dir: str | Path,
    *,
    data_config: dict[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``pretrained_cfg.json`` for a timm model into ``run_dir``.

    Each file is written to a temporary folder first and moved into place, so a reader never sees a partial file.
    Returns the path of ``model.safetensors``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_config: dict[str, Any] = {}
    if label_names is not None:
        model_config["label_names"] = list(label_names)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".export-") as tmp:
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=True, data_config=data_config)
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
            os.replace(Path(tmp) / name, run_dir / name)
    return run_dir / "model.safetensors"


def backbone_from_features(name: str, features: nn.Module, **kwargs: Any) -> nn.Module:
    """The full timm model ``name`` (no classifier) holding the weights of its ``features_only`` version ``features``.

    Dense tasks train ``timm.create_model(name, features_only=True)``, whose state dict flattens nested module names
    (``stages.0`` -> ``stages_0``); this maps them back so the trained backbone exports in timm's layout. Modules the
    features model lacks (the final norm) keep their initialisation.
    """
    full = timm.create_model(name, num_classes=0, **kwargs)
    full_keys = set(full.state_dict())
    state = {}
    for key, value in features.state_dict().items():
        match = next((k for k in (key, key.replace("_", ".", 1)) if k in full_keys), None)
        if match is None:
            raise RuntimeError(f"backbone key {key!r} has no counterpart in {name}")
        state[match] = value
    used = {k.split(".")[0] for k in state}
    missing = {k for k in full_keys - set(state) if k.split(".")[0] in used and not k.endswith("num_batches_tracked")}
    if missing:
        raise RuntimeError(f"the trained backbone lacks {sorted(missing)[:5]} of {name}")
    full.load_state_dict(state, strict=False)
    return full
