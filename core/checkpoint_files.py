"""Reading weights files with errors a user can act on: the file named, truncation told apart, mismatched keys listed.

Every place the project reads weights goes through here: ``train.py``'s ``--ckpt_path`` (resume, validate, test,
predict, ``runs/checkpoint_io.py``), a task's ``pretrained_file`` (``tasks/backbone.py``) and the export of
``best.ckpt`` (``runs/artifacts.py``). Files are read with ``weights_only=True`` (tensors and plain containers only),
so a foreign file cannot run code; safetensors files are read with ``safetensors``.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import CheckpointError

__all__ = ["check_state_dict", "checkpoint_errors", "explain_load_error", "load_checkpoint_file", "shown_keys"]

_SHOWN_KEYS = 5
_LOAD_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError, KeyError)


def shown_keys(keys: list[str]) -> str:
    """The first few of ``keys`` and how many there are, for one-line messages."""
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


def load_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", weights_only: bool = True, mmap: bool = False
) -> dict[str, Any]:
    """Read a ``torch.save`` or safetensors file; any failure is a one-line ``CheckpointError`` naming the file.
    ``mmap`` maps the tensors of a zip-format ``torch.save`` file instead of reading them (to read other entries).

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
        mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)


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
        parts.append(f"missing keys: {shown_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {shown_keys(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches (checkpoint vs model): {shown_keys(shapes)}")
    raise CheckpointError(
        f"checkpoint {path} is not a checkpoint of this model ({type(model).__name__}); {'; '.join(parts)}: "
        "use a checkpoint of the same task, backbone and num_classes"
    )
