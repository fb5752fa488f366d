"""Loading checkpoints with errors a user can act on: the file named, truncation told apart, mismatched keys listed.

Every place the project reads weights goes through here: ``train.py``'s ``--ckpt_path`` (resume, validate, test,
predict) through ``CheckedCheckpointIO``; a task's ``pretrained_file`` through ``pretrained_file_errors``; the export
of ``best.ckpt`` through ``load_checkpoint_file``. Files are read with ``weights_only=True`` (tensors and plain
containers only), so a foreign file cannot run code; safetensors files are read with ``safetensors``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from datamodules.errors import UserError

from .checkpoint_io import AtomicCheckpointIO

__all__ = [
    "CheckedCheckpointIO",
    "CheckpointError",
    "check_state_dict",
    "checkpoint_errors",
    "explain_load_error",
    "load_checkpoint_file",
    "pretrained_file_errors",
]

_SHOWN_KEYS = 5
_LOAD_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError, KeyError)


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, unsafe to unpickle, or of another model."""


def _keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else shown


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # NOTE: safetensors starts with a little-endian u64 header length and then the JSON header's "{"
    return len(head) == 9 and head[8:9] == b"{"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def explain_load_error(path: str | Path, error: BaseException) -> CheckpointError:
    """The one-line ``CheckpointError`` for ``error`` raised while reading the checkpoint at ``path``."""
    path = Path(path)
    if not path.is_file():
        return CheckpointError(f"checkpoint {path} does not exist: fix the path (--ckpt_path or model.pretrained_file)")
    if "Unsupported global" in str(error):
        unsafe = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error))))
        return CheckpointError(
            f"checkpoint {path} holds Python objects that weights_only=True refuses to load ({', '.join(unsafe)}): "
            "re-save its tensors only (e.g. torch.save(model.state_dict(), ...)) if you trust the file"
        )
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes; {_first_line(error)}): "
        "restore it or use another file"
    )


@contextlib.contextmanager
def checkpoint_errors(path: str | Path | None) -> Iterator[None]:
    """Around code that reads the checkpoint at ``path``: a read failure becomes ``explain_load_error``'s message."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        if path is None or not isinstance(error, (*_LOAD_ERRORS, SafetensorError)):
            raise
        raise explain_load_error(path, error) from None


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """Read a ``torch.save`` or safetensors file; any failure is a one-line ``CheckpointError`` naming the file.

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, or holds objects ``weights_only=True``
            refuses (the message lists them).
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (0 bytes): restore it or use another file")
    with checkpoint_errors(path):
        if not path.is_file():
            raise FileNotFoundError(path)
        if _is_safetensors(path):
            device = map_location if isinstance(map_location, str) else "cpu"
            return load_file(str(path), device=device)
        return torch.load(path, map_location=map_location, weights_only=weights_only)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], path: str | Path) -> None:
    """Raise a ``CheckpointError`` listing the missing, unexpected and wrongly shaped keys of ``state_dict``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_keys(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches (checkpoint vs model): {_keys(shapes)}")
    raise CheckpointError(
        f"checkpoint {path} is not a checkpoint of this model ({type(model).__name__}); {'; '.join(parts)}: "
        "use a checkpoint of the same task, backbone and num_classes"
    )


class CheckedCheckpointIO(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` whose loads fail with ``CheckpointError``: file named, keys listed (``--ckpt_path``).

    Args:
        model: the LightningModule the checkpoint will be loaded into; its ``state_dict`` keys and shapes are checked
            before Lightning loads the checkpoint (None, or a module with ``strict_loading = False``: no key check).
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        checkpoint = load_checkpoint_file(
            path,
            map_location=map_location if map_location is not None else "cpu",
            weights_only=True if weights_only is None else weights_only,
        )
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"checkpoint {path} has no 'state_dict': it is not a Lightning checkpoint (a weights file goes to "
                "model.pretrained_file instead)"
            )
        if self.model is not None and getattr(self.model, "strict_loading", True):
            check_state_dict(self.model, state, path)
        return checkpoint


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
                parts.append(f"{label}: {_keys(_QUOTED.findall(match.group(1)))}")
        sizes = [f"{k} {a} vs {b}" for k, a, b in _SIZE.findall(text)]
        if sizes:
            parts.append(f"shape mismatches (checkpoint vs model): {_keys(sizes)}")
        raise _mismatch_error(path, parts or [text.splitlines()[0]]) from None
    finally:
        timm_logger.removeHandler(report)
        timm_logger.setLevel(level)
    cfg = timm.get_pretrained_cfg(backbone) if backbone else None
    classifier = getattr(cfg, "classifier", None) or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    missing = [k for k in report.missing if not any(k.startswith(f"{c}.") for c in classifiers)]
    if missing or report.unexpected:
        parts = [f"missing keys: {_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {_keys(report.unexpected)}"] if report.unexpected else []
        raise _mismatch_error(path, parts)
