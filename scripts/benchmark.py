"""Benchmark registered models: parameters, MACs, inference and training images/s, peak memory.

The anchor is timm's ``benchmark.py``: for each model, random inputs of one size and batch, a few warmup steps, then
timed steps, the models taking turns step by step (every model's step ``i`` runs before any model's step ``i + 1``),
so that a busy moment of a shared machine slows all of them alike; single-threaded CPU runs are timed in process CPU
time (``benchmark_common.timer``). Inference is a forward pass under
``torch.no_grad`` in eval mode; training is one SGD step (forward, cross-entropy, backward, optimizer step) in train
mode. Images/s is ``batch / median step time``. MACs come from
``scripts/inspect_models.py`` (FlopCounterMode FLOPs / 2 of one forward at batch 1; bi-level routing counted with its
gather kernel). Peak memory is what one step allocates above what was allocated before it (CUDA
``max_memory_allocated``; on CPU the peak of the allocations recorded by ``torch.profiler``).

Precision ``bf16`` runs the steps under ``torch.autocast(dtype=torch.bfloat16)`` with fp32 weights (mixed precision,
as training does); ``--channels-last`` converts model and inputs to channels-last memory; ``--compile`` wraps the
model in ``torch.compile``. The same command runs on a GPU with ``--device cuda``.

Outputs, in ``--out-dir``: ``<name>.csv`` (one row per model), ``<name>.md`` (settings, machine, command and the
table) and ``<name>.png`` (images/s against GMACs, one point per model, inference and training panels).

Usage::

    python scripts/benchmark.py [--models 'strata_*,biformer_tiny'] [--img-size 224] [--batch-size 8]
        [--bench both|infer|train] [--precision fp32|bf16] [--channels-last] [--compile] [--device cpu|cuda]
        [--warmup 2] [--iters 5] [--threads N] [--out-dir docs/benchmarks] [--name models_cpu]
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from benchmark_common import (
    PRECISIONS,
    autocast,
    check_device,
    machine_description,
    markdown_table,
    median,
    peak_memory_bytes,
    sync,
    timer,
    write_csv,
)
from inspect_models import count_params, params_and_macs, project_models
from torch import nn

COLUMNS = [
    ("model", "{}"),
    ("params_m", "{:.2f}"),
    ("gmacs", "{:.3f}"),
    ("img_size", "{}"),
    ("batch", "{}"),
    ("precision", "{}"),
    ("channels_last", "{}"),
    ("compile", "{}"),
    ("device", "{}"),
    ("infer_img_s", "{:.1f}"),
    ("infer_ms", "{:.1f}"),
    ("infer_peak_mib", "{:.1f}"),
    ("train_img_s", "{:.1f}"),
    ("train_ms", "{:.1f}"),
    ("train_peak_mib", "{:.1f}"),
    ("error", "{}"),
]


def resolve_models(spec: str | None) -> list[str]:
    """Model names from a comma list of names or fnmatch patterns; ``None`` means every project model."""
    if not spec:
        return project_models()
    every = timm.list_models()
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        matched = fnmatch.filter(every, item) if any(c in item for c in "*?[") else [item] if item in every else []
        if not matched:
            raise ValueError(f"--models: no registered model matches {item!r}; list them with inspect_models.py list")
        names.extend(m for m in matched if m not in names)
    return names


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, device: str, precision: str
) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        out = model(x)
        loss = F.cross_entropy(out.float(), y)
    loss.backward()
    optimizer.step()


class ModelBench:
    """One model's row of the table and its inference and training steps (see the module docstring)."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.row: dict[str, object] = dict(
            model=name,
            img_size=args.img_size,
            batch=args.batch_size,
            precision=args.precision,
            channels_last=args.channels_last,
            compile=args.compile,
            device=args.device,
        )
        self.times: dict[str, list[float]] = {"infer": [], "train": []}
        torch.manual_seed(0)
        self.model = timm.create_model(name).to(args.device)
        _, macs = params_and_macs(name, args.img_size)
        self.row["params_m"], self.row["gmacs"] = count_params(self.model) / 1e6, macs / 1e9
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=memory_format)
        self.run = torch.compile(self.model, backend=args.compile_backend) if args.compile else self.model
        in_chans = getattr(self.model, "in_chans", 3)
        x = torch.randn(args.batch_size, in_chans, args.img_size, args.img_size, device=args.device)
        self.x = x.contiguous(memory_format=memory_format)
        self.y = torch.randint(0, self.model.num_classes, (args.batch_size,), device=args.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)

    @torch.no_grad()
    def infer(self) -> None:
        self.model.eval()
        with autocast(self.args.device, self.args.precision):
            self.run(self.x)

    def train(self) -> None:
        self.model.train()
        _train_step(self.run, self.optimizer, self.x, self.y, self.args.device, self.args.precision)

    def finish(self, mode: str) -> None:
        """Fill in the median time, images/s and (one more step) peak memory of ``mode``."""
        t = median(self.times[mode])
        self.row[f"{mode}_ms"], self.row[f"{mode}_img_s"] = 1e3 * t, self.args.batch_size / t
        self.row[f"{mode}_peak_mib"] = peak_memory_bytes(getattr(self, mode), self.args.device) / 2**20


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"


def benchmark_models(names: Sequence[str], args: argparse.Namespace) -> list[dict[str, object]]:
    """Rows for ``names``; the models take turns step by step, so that a busy moment of the machine hits them all.

    A model that fails (to build, to compile, to run) gets an ``error`` and leaves the rotation; the others go on.
    """
    benches: list[ModelBench] = []
    rows: list[dict[str, object]] = []
    for name in names:
        try:
            benches.append(ModelBench(name, args))
            rows.append(benches[-1].row)
        except Exception as err:  # NOTE: one failing model (e.g. no meta support) must not lose the others' rows
            traceback.print_exc()
            rows.append(dict(model=name, error=_error(err)))
    clock, _ = timer(args.device)
    modes = ["infer", "train"] if args.bench == "both" else [args.bench]
    for mode in modes:
        for i in range(args.warmup + args.iters):
            for bench in benches:
                if bench.row.get("error"):
                    continue
                try:
                    sync(args.device)
                    t0 = clock()
                    getattr(bench, mode)()
                    sync(args.device)
                    if i >= args.warmup:
                        bench.times[mode].append(clock() - t0)
                except Exception as err:  # NOTE: e.g. a compile error; keep the other models' rows
                    traceback.print_exc()
                    bench.row["error"] = _error(err)
            print(f"{mode} round {i + 1}/{args.warmup + args.iters} done", flush=True)
        for bench in benches:
            if not bench.row.get("error"):
                bench.finish(mode)
    return rows


def _is_project_model(name: str) -> bool:
    return timm.models.model_entrypoint(name).__module__.startswith("backbones.")


def plot(rows: Sequence[dict[str, object]], path: Path, title: str) -> None:
    """Images/s against GMACs, one labelled point per model (ours blue, timm's grey); inference and training panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = [(key, label) for key, label in (("infer_img_s", "inference"), ("train_img_s", "training"))]
    panels = [(k, lab) for k, lab in panels if any(r.get(k) for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 5.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(r["gmacs"], r[key], r["model"]) for r in rows if r.get(key) and r.get("gmacs")]
        for ours, color, legend in ((True, "tab:blue", "this project"), (False, "tab:gray", "timm")):
            mine = [p for p in points if _is_project_model(p[2]) == ours]
            if mine:
                ax.scatter([p[0] for p in mine], [p[1] for p in mine], s=40, color=color, label=legend, zorder=3)
        for gmacs, speed, model in points:
            ax.annotate(model, (gmacs, speed), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("GMACs per image (log scale)")
        ax.set_ylabel(f"{label} images/s (log scale; higher is faster)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.3, y=0.2)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings_line(args: argparse.Namespace) -> str:
    flags = [args.precision] + (["channels_last"] if args.channels_last else [])
    flags += [f"compile({args.compile_backend})"] if args.compile else []
    return f"{args.device}, {args.img_size}x{args.img_size}, batch {args.batch_size}, {', '.join(flags)}"


def write_outputs(rows: list[dict[str, object]], args: argparse.Namespace, argv: Sequence[str]) -> list[Path]:
    out = Path(args.out_dir)
    csv_path, md_path, png_path = (out / f"{args.name}.{ext}" for ext in ("csv", "md", "png"))
    write_csv(csv_path, rows, [k for k, _ in COLUMNS])
    columns = [c for c in COLUMNS if any(r.get(c[0]) not in (None, "") for r in rows)]
    machine = machine_description(args.device)
    command = "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in argv)
    text = (
        f"Settings: {settings_line(args)}; median of {args.iters} steps after {args.warmup} warmup.\n\n"
        f"Machine: {', '.join(f'{k} {v}' for k, v in machine.items())}.\n\n"
        f"Command: `{command}`\n\n" + markdown_table(rows, columns)
    )
    md_path.write_text(text)
    plot(rows, png_path, f"{settings_line(args)} ({machine['cpu'] if args.device == 'cpu' else machine['device']})")
    return [csv_path, md_path, png_path]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma list of model names or fnmatch patterns (default: ours)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bench", default="both", choices=["both", "infer", "train"])
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16 = autocast, fp32 weights")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (compile happens here)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--name", default="models", help="file stem of the outputs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    for key in ("img_size", "batch_size", "iters"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    try:
        check_device(args.device)
        names = resolve_models(args.models)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {settings_line(args)}, {torch.get_num_threads()} threads", flush=True)
    rows = benchmark_models(names, args)
    for row in rows:
        print({k: v for k, v in row.items() if k in ("model", "infer_img_s", "train_img_s", "error")}, flush=True)
    paths = write_outputs(rows, args, argv)
    print(Path(paths[1]).read_text())
    print("wrote", ", ".join(str(p) for p in paths))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
