"""``python train.py ablate --config ABLATION.yaml``: every cell of a grid as a normal run, then one fair table.

Each cell and seed is an ordinary ``train.py fit`` run in ``<out_dir>/<cell>-s<seed>`` (resumable, exportable), run
as a subprocess so that a failure (out of memory, a bad block kwarg) ends only that cell: it is recorded as failed
with its one-line reason and the rest go on. A rerun of the command skips the runs that finished (their
``summary.json`` exists) and resumes an unfinished one from its ``last.ckpt`` (``train.py``'s own resume). Cells run
one after another; ``--parallel N`` on a machine with N GPUs runs N at a time, one per device
(``CUDA_VISIBLE_DEVICES``).

Fair by construction: every cell gets the same base config (recipe, data, data order) and the same seeds; only the
grid's overrides differ. Per run the table gets: parameters and MACs at the training size of the exported model
(``core.model_cost``), training images/s (``summary.json``), inference images/s of the exported model measured
here one cell after another on one batch (median of timed passes), the peak resident memory of the run's process
(``wait4``'s ``ru_maxrss``), the best metric and the wall time. ``runs/ablation_report.py`` writes
``ablation.csv``, ``ablation.md`` and ``ablation.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from core.errors import UserError
from core.model_cost import count_macs, count_params

from .ablation_grid import Ablation, Cell, load_ablation
from .ablation_report import write_report

__all__ = ["main", "run_ablation"]

REPO = Path(__file__).resolve().parents[1]


def _failure_reason(stderr: str, returncode: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    if any("out of memory" in line.lower() for line in lines):
        return "out of memory"
    return lines[-1][:300] if lines else f"exit code {returncode}"


def _img_size(config: dict[str, Any]) -> int:
    data = (config.get("data") or {}).get("init_args") or {}
    size = data.get("img_size") or data.get("crop_size") or 224
    return int(size[0] if isinstance(size, (list, tuple)) else size)


@torch.no_grad()
def _inference_images_per_sec(model: torch.nn.Module, img_size: int, batch: int, repeats: int = 5) -> float:
    x = torch.randn(batch, 3, img_size, img_size)
    model.eval()(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def _measure(run_dir: Path, img_size: int, batch: int) -> dict[str, Any]:
    import timm

    import backbones  # noqa: F401  (registers the project's models)

    model = timm.create_model(f"local-dir:{run_dir}", pretrained=True)
    return dict(
        params=count_params(model),
        macs=count_macs(model, img_size),
        infer_images_per_sec=round(_inference_images_per_sec(model, img_size, batch), 2),
    )


def _run_cell(ablation: Ablation, cell: Cell, seed: int, device: str | None) -> dict[str, Any]:
    name = f"{cell.name}-s{seed}"
    run_dir = ablation.out_dir / name
    row: dict[str, Any] = dict(cell=cell.name, seed=seed, run=str(run_dir), **cell.levels)
    config = ablation.cell_config(cell)
    summary_file = run_dir / "summary.json"
    peak_mib = None
    if summary_file.is_file():
        row["status"] = "finished (earlier)"
    else:
        cells_dir = ablation.out_dir / ".cells"
        cells_dir.mkdir(parents=True, exist_ok=True)
        config_file = cells_dir / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [
            sys.executable, str(REPO / "train.py"), "fit", "--config", str(config_file), "--name", name,
            "--out_dir", str(ablation.out_dir), "--seed_everything", str(seed), *ablation.args,
        ]  # fmt: skip
        env = dict(os.environ)
        env.setdefault("PYTHONPATH", str(REPO))
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        log = (cells_dir / f"{name}.log").open("a")
        print(f"[ablate] {name}: running", flush=True)
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.PIPE, text=True)
        stderr = process.stderr.read() if process.stderr else ""
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.write(stderr)
        log.close()
        peak_mib = round(usage.ru_maxrss / 1024, 1)  # NOTE: Linux reports KiB
        if process.returncode != 0 or not summary_file.is_file():
            row.update(status="failed", reason=_failure_reason(stderr, process.returncode))
            print(f"[ablate] {name}: failed: {row['reason']}", flush=True)
            return row
        row["status"] = "finished"
    summary = json.loads(summary_file.read_text())
    row.update(
        monitor=summary.get("monitor"),
        best_metric=summary.get("best_metric"),
        train_images_per_sec=summary.get("train_images_per_sec"),
        wall_seconds=summary.get("wall_seconds"),
        peak_memory_mib=peak_mib,
    )
    batch = int(((config.get("data") or {}).get("init_args") or {}).get("batch_size", 32))
    row.update(_measure(run_dir, _img_size(config), batch))
    print(f"[ablate] {name}: {row['status']}, best {row['best_metric']}", flush=True)
    return row


def run_ablation(ablation: Ablation, parallel: int = 1) -> list[dict[str, Any]]:
    """Run (or skip, or resume) every cell and seed, write the report, return one row per run."""
    jobs = [(cell, seed) for cell in ablation.cells for seed in ablation.seeds]
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    if parallel <= 1:
        for i, (cell, seed) in enumerate(jobs):
            rows[i] = _run_cell(ablation, cell, seed, None)
    else:
        devices = [str(d) for d in range(parallel)]
        lock = threading.Lock()
        queue = list(enumerate(jobs))

        def worker(device: str) -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    i, (cell, seed) = queue.pop(0)
                rows[i] = _run_cell(ablation, cell, seed, device)

        threads = [threading.Thread(target=worker, args=(d,)) for d in devices]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    done = [row for row in rows if row is not None]
    write_report(ablation, done)
    return done


def main(argv: list[str] | None = None) -> None:
    """``train.py ablate`` entry point; a bad ablation file is one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="train.py ablate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the ablation YAML (see runs/ablation_grid.py)")
    parser.add_argument("--parallel", type=int, default=1, help="cells at a time, one GPU each (default 1)")
    args = parser.parse_args(argv)
    if args.parallel > 1 and args.parallel > torch.cuda.device_count():
        print(f"error: --parallel {args.parallel} needs {args.parallel} GPUs, found {torch.cuda.device_count()}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    try:
        ablation = load_ablation(args.config)
        rows = run_ablation(ablation, args.parallel)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    failed = [row for row in rows if row["status"] == "failed"]
    print(f"[ablate] {len(rows) - len(failed)} of {len(rows)} runs finished; report in {ablation.out_dir}/ablation.md")
