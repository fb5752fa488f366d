"""The ablation's report: ``ablation.csv`` (one row per run), ``ablation.md`` (one row per cell, mean ± std over
seeds, the fairness statement) and ``ablation.png`` (best metric against GMACs and against training images/s,
error bars over seeds)."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.files import write_atomically, write_text_atomically

if TYPE_CHECKING:
    from .ablation_grid import Ablation

__all__ = ["cell_summaries", "write_report"]

RUN_COLUMNS = [
    "cell", "seed", "status", "reason", "params", "macs", "train_images_per_sec", "infer_images_per_sec",
    "peak_memory_mib", "monitor", "best_metric", "wall_seconds", "run",
]  # fmt: skip


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell_summaries(rows: list[dict[str, Any]], param_margin: float) -> list[dict[str, Any]]:
    """One entry per cell (in grid order): the seeds' mean ± std, the failures, and whether its parameter count
    differs from the first cell's by more than ``param_margin``."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    out = []
    base_params = None
    for name, runs in cells.items():
        ok = [r for r in runs if r["status"] != "failed"]
        params = ok[0]["params"] if ok else None
        if base_params is None and params:
            base_params = params
        best = _mean_std([r["best_metric"] for r in ok if r.get("best_metric") is not None])
        out.append(
            dict(
                cell=name,
                runs=len(runs),
                failed=[f"seed {r['seed']}: {r.get('reason')}" for r in runs if r["status"] == "failed"],
                params=params,
                macs=ok[0]["macs"] if ok else None,
                train_images_per_sec=_mean_std(
                    [r["train_images_per_sec"] for r in ok if r.get("train_images_per_sec")]
                ),
                infer_images_per_sec=_mean_std(
                    [r["infer_images_per_sec"] for r in ok if r.get("infer_images_per_sec")]
                ),
                peak_memory_mib=max((r["peak_memory_mib"] for r in ok if r.get("peak_memory_mib")), default=None),
                best_metric=best,
                monitor=ok[0].get("monitor") if ok else None,
                wall_seconds=sum(r.get("wall_seconds") or 0 for r in ok),
                off_budget=bool(params and base_params and abs(params / base_params - 1) > param_margin),
            )
        )
    return out


def _fmt(pair: tuple[float | None, float | None], digits: int) -> str:
    mean, std = pair
    return "—" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _markdown(ablation: Ablation, cells: list[dict[str, Any]]) -> str:
    monitor = next((c["monitor"] for c in cells if c["monitor"]), "best metric")
    lines = [
        f"# Ablation: {ablation.path}",
        "",
        f"Fair by construction: every cell starts from the same base config ({ablation.path}'s `base`: recipe, data "
        f"and data order), runs the same seeds ({', '.join(map(str, ablation.seeds))}), and differs only by its grid "
        f"overrides. ⚠ marks a cell whose parameter count differs from the first cell's by more than "
        f"{ablation.param_margin:.0%}.",
        "",
        f"| cell | params (M) | GMACs | train img/s | infer img/s | peak RSS (MiB) | {monitor} | wall (s) | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        params = f"{c['params'] / 1e6:.3f}{' ⚠' if c['off_budget'] else ''}" if c["params"] else "—"
        macs = f"{c['macs'] / 1e9:.4f}" if c["macs"] else "—"
        runs = f"{c['runs'] - len(c['failed'])}/{c['runs']}"
        lines.append(
            f"| {c['cell']} | {params} | {macs} | {_fmt(c['train_images_per_sec'], 1)} | "
            f"{_fmt(c['infer_images_per_sec'], 1)} | {c['peak_memory_mib'] or '—'} | {_fmt(c['best_metric'], 4)} | "
            f"{c['wall_seconds']:.0f} | {runs} |"
        )
    failures = [(c["cell"], f) for c in cells for f in c["failed"]]
    if failures:
        lines += ["", "Failed runs:", ""] + [f"- {cell}, {reason}" for cell, reason in failures]
    return "\n".join(lines) + "\n"


def _plot(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [c for c in cells if c["best_metric"][0] is not None and c["macs"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "macs", "GMACs at the training size"),
        (axes[1], "train_images_per_sec", "training images/s"),
    ):
        for c in points:
            x = c["macs"] / 1e9 if key == "macs" else c[key][0]
            xerr = None if key == "macs" else c[key][1]
            if x is None:
                continue
            ax.errorbar(x, c["best_metric"][0], yerr=c["best_metric"][1], xerr=xerr, fmt="o", capsize=3)
            ax.annotate(c["cell"], (x, c["best_metric"][0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(next((c["monitor"] for c in points if c["monitor"]), "best metric"))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomically(path, lambda f: f.write(buffer.getvalue()))


def write_report(ablation: Ablation, rows: list[dict[str, Any]]) -> None:
    """Write ``ablation.csv``, ``ablation.md`` and ``ablation.png`` into the ablation's ``out_dir``."""
    out = ablation.out_dir
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RUN_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text_atomically(out / "ablation.csv", buffer.getvalue())
    cells = cell_summaries(rows, ablation.param_margin)
    write_text_atomically(out / "ablation.md", _markdown(ablation, cells))
    _plot(cells, out / "ablation.png")
