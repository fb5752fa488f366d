"""Training curves from a run's ``metrics.csv`` (Lightning ``CSVLogger``), for users without wandb/TensorBoard.

``metrics.csv`` has one row per logging step and per validation, columns ``epoch``, ``step`` and ``train/...`` /
``val/...`` metrics, empty where a row did not log that metric. :func:`plot_training_curves` draws, against the
optimizer step: the training losses with the validation loss, the learning rate, and the validation metrics
(grouped by kind, e.g. ``bbox_*`` / ``segm_*`` for COCO).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from core.files import write_atomically

__all__ = ["plot_training_curves", "read_metrics"]

# NOTE: COCO logs 12 numbers per IoU type; the curves show the headline ones
_COCO_MAIN = ("AP", "AP50", "AP75")


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a ``metrics.csv``, skipping empty and non-finite cells."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, cell in row.items():
                if key in ("epoch", "step") or not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series[key].append((int(float(step)), value))
    return dict(series)


def _panels(series: dict[str, list[tuple[int, float]]]) -> list[tuple[str, list[str]]]:
    losses = sorted(k for k in series if k.startswith("train/") and "loss" in k and not k.endswith("_epoch"))
    if "train/loss" in losses:  # NOTE: the total first, the parts after
        losses.remove("train/loss")
        losses.insert(0, "train/loss")
    if not losses:
        losses = sorted(k for k in series if k.startswith("train/") and "loss" in k)
    losses += sorted(k for k in series if k.startswith("val/") and "loss" in k)
    panels = [("loss", losses)] if losses else []
    rates = sorted(k for k in series if k.endswith("/lr") or k.endswith("lr-AdamW"))
    if rates:
        panels.append(("learning rate", rates))
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(k for k in series if k.startswith("val/") and "loss" not in k):
        metric = key.split("/", 1)[1]
        prefix, _, suffix = metric.rpartition("_")
        if prefix in ("bbox", "segm"):
            if suffix in _COCO_MAIN:
                groups[f"val {prefix}"].append(key)
        else:
            groups["val"].append(key)
    panels += [(title, keys) for title, keys in groups.items()]
    return panels


def plot_training_curves(run_dir: str | Path) -> Path | None:
    """Write ``<run_dir>/curves.png`` from ``<run_dir>/metrics.csv``; None (nothing written) if there is no
    ``metrics.csv`` or it holds no metric yet.

    Args:
        run_dir: the run directory (``checkpoints/<name>``).

    Returns:
        The written file, or None.
    """
    run_dir = Path(run_dir)
    source = run_dir / "metrics.csv"
    if not source.is_file():
        return None
    series = read_metrics(source)
    panels = _panels(series)
    if not panels:
        return None
    cols = 2 if len(panels) == 4 else min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = zip(*series[key])
            few = len(steps) <= 30
            ax.plot(steps, values, marker="o" if few else None, markersize=3, lw=1.2, label=key)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    out = run_dir / "curves.png"
    write_atomically(out, lambda f: fig.savefig(f, dpi=100, format="png"))
    return out
