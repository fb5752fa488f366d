"""Strata's command line: ``python train.py {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]``.

The command line itself is ``runs/cli.py`` (a LightningCLI composed from its public hooks); ``runs/`` is the run
layer (see docs/architecture.md).
"""

from __future__ import annotations

from runs.cli import StrataCLI, cli_main, main

__all__ = ["StrataCLI", "cli_main", "main"]

if __name__ == "__main__":
    main()
