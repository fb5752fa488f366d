"""The run layer: how a run is made around a task and a datamodule (the engineering, as Lightning's Trainer and
callbacks are), in one place.

* ``cli.py``: the command line (``train.py``), ``run_directory.py``: run names and folders;
* ``checkpoint_io.py``: atomic saves and checked loads of checkpoints; ``random_streams.py``: per-rank random
  streams that resume; ``preemption.py``: SIGTERM / SLURM requeue;
* ``config_checks.py``: model against data before any image is read; ``health.py``: undecodable samples, overflow,
  non-finite weights;
* ``artifacts.py``: ``summary.json``, the timm export (``export.py``), the closing screen;
* ``loggers.py``: CSV / wandb / TensorBoard in the run directory; ``prediction_writers.py``: predict's files;
  ``overlays.py``: validation pictures.

It reads tasks only through their contract (``tasks/base.py``) and datamodules through theirs
(``datamodules/base.py``); nothing imports it but ``train.py``.
"""
