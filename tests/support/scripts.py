"""The project's command-line scripts (``scripts/*.py``) imported as modules, as ``python scripts/<name>.py`` runs them.

A script finds its sibling modules (``benchmark_common``) because Python puts the script's folder first on
``sys.path``; ``load_script`` does the same, so tests call ``main()`` in-process.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["REPO", "SCRIPTS", "load_script"]

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (imported once, with ``scripts/`` on ``sys.path`` as when it runs)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)
