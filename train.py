"""Strata's command line: ``python train.py {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]``.

The command line itself is ``runs/cli.py`` (a LightningCLI composed from its public hooks); ``runs/`` is the run
layer (see docs/architecture.md). ``python train.py ablate --config ABLATION.yaml`` runs a grid of such runs and
writes one table (``runs/ablation.py``).
"""

from __future__ import annotations

import sys

from runs.cli import StrataCLI, cli_main, main

__all__ = ["StrataCLI", "cli_main", "main"]

if __name__ == "__main__":
    if sys.argv[1:2] == ["ablate"]:
        from runs.ablation import main as ablate

        ablate(sys.argv[2:])
    else:
        main()
