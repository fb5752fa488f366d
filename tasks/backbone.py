"""Backbone construction shared by the tasks: any timm-registered model, by name or from a weights file.

``create_backbone`` is the one way a task builds its backbone (classification: the full model; detection and
segmentation: ``features_only=True``); a bad name, a keyword the model does not take and a weights file that does not
fit are one-line ``ConfigError`` / ``CheckpointError`` messages (``backbone_errors``, ``pretrained_file_errors``).
``backbone_from_features`` turns a trained ``features_only`` backbone back into the full timm model for export.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import timm
from torch import nn

from core.checkpoint_files import load_checkpoint_file, shown_keys
from core.errors import CheckpointError, ConfigError

__all__ = [
    "backbone_errors",
    "backbone_from_features",
    "closest_model_names",
    "create_backbone",
    "pretrained_file_errors",
]


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
        ConfigError: an unknown model name (the closest registered names listed), an unknown block name or a keyword
            argument the model does not take.
        CheckpointError: ``pretrained_file`` is missing, corrupt, or holds weights of another model.
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
    with backbone_errors(name), pretrained_file_errors(pretrained_file, name):
        return timm.create_model(name, pretrained=pretrained, **kwargs)


@contextlib.contextmanager
def backbone_errors(backbone: str = "the backbone") -> Iterator[None]:
    """Around building a backbone: an unknown block name (the closest names kept), a composition that cannot build
    (``backbones.composed``), a block plugin that fails to load or a keyword the model does not take becomes a
    one-line ``ConfigError``."""
    from backbones.composed import CompositionError
    from blocks import BlockPluginError

    try:
        yield
    except CompositionError as error:
        raise ConfigError(f"model.{error}") from None
    except BlockPluginError as error:
        raise ConfigError(str(error)) from None
    except ValueError as error:
        if not str(error).startswith("unknown block"):
            raise
        raise ConfigError(f"{error} (model.backbone_kwargs)") from None
    except TypeError as error:
        if "keyword argument" not in str(error):
            raise
        raise ConfigError(
            f"model.backbone_kwargs do not fit {backbone} ({error}): drop the argument or use a backbone taking it"
        ) from None


_MISSING = re.compile(r'Missing key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)')
_UNEXPECTED = re.compile(r'Unexpected key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)')
_QUOTED = re.compile(r'"([^"]*)"')
_SIZE = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (\S+) from checkpoint, .* is (\S+)\.")


class _LoadReport(logging.Handler):
    """Collects the missing and unexpected keys timm logs after a non-strict pretrained load."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        keys = message.split("(", 1)[-1].split(")", 1)[0].split(", ")
        if message.startswith("Missing keys ("):
            self.missing += keys
        elif message.startswith("Unexpected keys ("):
            self.unexpected += keys


def _mismatch_error(path: str | os.PathLike, parts: list[str]) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} does not fit model.backbone; {'; '.join(parts)}: "
        "use weights of the same backbone (or a format its checkpoint_filter_fn converts)"
    )


@contextlib.contextmanager
def pretrained_file_errors(path: str | os.PathLike | None, backbone: str | None = None) -> Iterator[None]:
    """Around building ``backbone`` from ``pretrained_file``: check the file first, then fail on mismatched keys.

    timm loads strictly (a ``RuntimeError`` listing the keys, parsed here) unless it adapts the classifier to another
    ``num_classes``; then it only logs the missing and unexpected keys, which are collected here: any unexpected key,
    or a missing key outside the model's classifier, is a ``CheckpointError`` too, so weights of another model never
    load silently in part.
    """
    if path is None:
        yield
        return
    load_checkpoint_file(path)
    report = _LoadReport()
    timm_logger = logging.getLogger("timm.models._builder")
    level = timm_logger.level
    timm_logger.addHandler(report)
    timm_logger.setLevel(logging.INFO)
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        if "Error(s) in loading state_dict" not in text:
            raise
        parts = []
        for label, pattern in (("missing keys", _MISSING), ("unexpected keys", _UNEXPECTED)):
            match = pattern.search(text)
            if match:
                parts.append(f"{label}: {shown_keys(_QUOTED.findall(match.group(1)))}")
        sizes = [f"{k} {a} vs {b}" for k, a, b in _SIZE.findall(text)]
        if sizes:
            parts.append(f"shape mismatches (checkpoint vs model): {shown_keys(sizes)}")
        raise _mismatch_error(path, parts or [text.splitlines()[0]]) from None
    finally:
        timm_logger.removeHandler(report)
        timm_logger.setLevel(level)
    cfg = timm.get_pretrained_cfg(backbone) if backbone else None
    classifier = getattr(cfg, "classifier", None) or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    missing = [k for k in report.missing if not any(k.startswith(f"{c}.") for c in classifiers)]
    if missing or report.unexpected:
        parts = [f"missing keys: {shown_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {shown_keys(report.unexpected)}"] if report.unexpected else []
        raise _mismatch_error(path, parts)


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
