"""Where a run lives: its name, its folder ``<out_dir>/<name>/``, and the demo data a demo run generates first.

The run directory's files are listed in ``checkpoints/README.md`` and ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import os
from datetime import datetime
from pathlib import Path

from core.files import temporary_path

__all__ = ["DEMO_ROOT", "RUN_NAME_ENV", "default_run_name", "ensure_demo_data", "remove_stale_temporary_files"]

DEMO_ROOT = Path("data/demo")
RUN_NAME_ENV = "STRATA_RUN_NAME"

# demo layouts under DEMO_ROOT and the generator that writes each on first use
_DEMO_GENERATORS = {
    "imagenet": ("datamodules.shapes", "ensure_demo_data"),
    "coco": ("datamodules.shapes_coco", "ensure_demo_coco"),
    "ade20k": ("datamodules.shapes_ade20k", "ensure_demo_ade20k"),
}


def default_run_name(task: str, backbone: str) -> str:
    """``<task>-<backbone>-<stamp>``, the same in every process of one distributed job.

    The stamp is the SLURM job id or torchrun's run id when launched by them; otherwise the launching process picks
    a timestamp and hands it to the processes Lightning spawns through the environment.
    """
    if os.environ.get(RUN_NAME_ENV):
        return os.environ[RUN_NAME_ENV]
    stamp = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if stamp == "none":
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{task}-{backbone}-{stamp}"


def ensure_demo_data(root: Path) -> None:
    """Generate the demo dataset at ``root`` when it is one of the demo layouts (a no-op once it exists)."""
    if root.parent == DEMO_ROOT and root.name in _DEMO_GENERATORS:
        module, function = _DEMO_GENERATORS[root.name]
        getattr(importlib.import_module(module), function)(DEMO_ROOT)


def remove_stale_temporary_files(run_dir: Path) -> list[Path]:
    """Delete the ``.<name>.tmp`` files a killed process left in ``run_dir`` (call it holding the run's fit lock).

    Every replaced file of a run goes through such a temporary sibling (``core/files.py``); a SIGKILL mid-write
    leaves it behind, never a partial file in its place. Returns what was removed.
    """
    stale = [p for p in run_dir.glob(temporary_path("*").name) if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
