"""Shared pieces of the benchmark commands: timing, peak memory, precision, tables and the machine description.

Every comparison runs the reference and the candidate in one process and interleaves them (``interleaved_times``),
so that a slow moment of a shared machine hits both; results are medians and ratios.

Clock (``timer``): on CPU with one torch thread, the process CPU time (``time.process_time``): on a shared machine it
leaves out the time other processes hold the core, and single-threaded it equals the wall time of an idle machine.
Otherwise (CUDA, or several CPU threads, where CPU time sums the threads) the wall clock (``time.perf_counter``).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

__all__ = [
    "PRECISIONS",
    "autocast",
    "check_device",
    "interleaved_times",
    "machine_description",
    "markdown_table",
    "median",
    "peak_memory_bytes",
    "sync",
    "timer",
    "write_csv",
]

PRECISIONS = ("fp32", "bf16")


def check_device(device: str) -> None:
    """Raise a one-line ValueError when ``device`` cannot run here."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA build of torch and a GPU; use --device cpu")


def autocast(device: str, precision: str) -> AbstractContextManager:
    """``torch.autocast`` to bfloat16 for ``precision == "bf16"``, a no-op for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timer(device: str) -> tuple[Callable[[], float], str]:
    """The clock for timings on ``device`` and its name (see the module docstring)."""
    if device == "cpu" and torch.get_num_threads() == 1:
        return time.process_time, "process CPU time"
    return time.perf_counter, "wall clock"


def interleaved_times(
    fns: Mapping[str, Callable[[], object]], device: str, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions called in turn ``warmup + repeats`` times (warmup dropped)."""
    clock, _ = timer(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(clock() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the peak of the running sum of the allocations and frees that
    ``torch.profiler`` records (``profile_memory=True``), the CPU counterpart of it.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return peak


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_description(device: str) -> dict[str, str]:
    """What a result was measured on: date, device, CPU, cores, memory, torch version and threads."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cpu": _lscpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{mem_gib:.0f} GiB",
        "torch": torch.__version__,
        "threads": f"torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "clock": timer(device)[1],
    }
    return info


def _cell(value: object, fmt: str) -> str:
    if value is None or value == "":
        return "-"
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table of ``rows``; ``columns`` are ``(key, format)`` pairs, missing keys shown as ``-``."""
    lines = ["| " + " | ".join(key for key, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts) to ``path`` with the given column order; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
