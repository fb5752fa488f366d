"""Side-by-side comparisons, each in one process, reported as ratios (absolute times do not hold on noisy machines).

Subcommands (each writes ``<out-dir>/compare_<name>.csv`` and ``.md`` with the settings, machine and command):

- ``bra``: the project's bi-level routing attention against the plain gather implementation of the official
  algorithm (``scripts/benchmark_bra.py``: 224/n_win 7, 512/n_win 8, 800x1344/n_win 16): time and peak memory of
  forward + backward. Targets: speedup >= 2, peak ratio <= 0.5.
- ``davit``: ``strata_davit_tiny`` (the DaViT topology built from the project's dual blocks) against timm's
  ``davit_tiny`` holding the same weights (loaded through the checkpoint filter); inference and training step time
  and peak memory. Target: ``timm_ms / ours_ms >= 1.0``.
- ``lightning``: ``Trainer.fit`` against a plain PyTorch loop on the same task and data (``benchmark_loop.py``).
  Target: overhead <= 3%.
- ``data``: JPEG decode + training augmentation, images/s of one worker, the project's pipeline (timm's
  ``create_transform`` behind a per-sample seed) against timm's ``create_transform`` on the same files
  (``benchmark_data.py``); ``max_abs_diff`` 0 means the same tensor under the same seed.
- ``efficiency``: achieved FLOP/s of a training step divided by the fp32 (or bf16) matrix-multiply peak measured on
  the same machine, the two measured in turns. A step's FLOPs are ``6 * MACs * batch`` (forward 2 FLOPs per MAC,
  backward twice the forward), MACs as ``scripts/inspect_models.py`` counts them.

Timings interleave reference and candidate and report medians. ``--device cuda``, ``--precision bf16``
(autocast), ``--channels-last`` and ``--compile`` apply where they make sense, so the same commands run on a GPU.

Usage::

    python scripts/benchmark_compare.py {bra,davit,lightning,data,efficiency} [options] [--out-dir docs/benchmarks]
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from benchmark import _train_step
from benchmark_common import (
    PRECISIONS,
    autocast,
    check_device,
    interleaved_times,
    machine_description,
    markdown_table,
    median,
    peak_memory_bytes,
    write_csv,
)
from inspect_models import params_and_macs
from safetensors.torch import save_file

EFFICIENCY_MODELS = "strata_hybrid_pico:64:64,strata_hybrid_tiny:224:8,biformer_tiny:224:8"


def _prepare(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    model = model.to(args.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    return torch.compile(model, backend=args.compile_backend) if args.compile else model


def _input(args: argparse.Namespace, batch: int, img_size: int) -> torch.Tensor:
    x = torch.randn(batch, 3, img_size, img_size, device=args.device)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def _timm_davit_pair(args: argparse.Namespace, folder: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ref = timm.create_model("davit_tiny")
    with torch.no_grad():  # NOTE: non-trivial norms and biases, so that a mis-mapped weight shows
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.rand_like(p) * 0.2)
    path = Path(folder) / "davit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = timm.create_model("strata_davit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    return ours, ref


def compare_davit(args: argparse.Namespace) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as folder:
        ours, ref = _timm_davit_pair(args, folder)
    x = _input(args, args.batch_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,), device=args.device)
    models = {"timm": ref.to(args.device).eval(), "ours": ours.to(args.device).eval()}
    with torch.no_grad():
        max_diff = (models["ours"](x) - models["timm"](x)).abs().max().item()
    runs = {name: _prepare(m, args) for name, m in models.items()}
    rows = []
    for mode in ("infer", "train"):
        fns = {}
        for name, run in runs.items():
            models[name].train(mode == "train")
            if mode == "infer":

                def fn(run: torch.nn.Module = run) -> None:
                    with torch.no_grad(), autocast(args.device, args.precision):
                        run(x)

            else:
                opt = torch.optim.SGD(models[name].parameters(), lr=1e-6, momentum=0.9)

                def fn(run: torch.nn.Module = run, opt: torch.optim.Optimizer = opt) -> None:
                    _train_step(run, opt, x, y, args.device, args.precision)

            fns[name] = fn
        times = interleaved_times(fns, args.device, args.warmup, args.repeats)
        row: dict[str, object] = dict(mode=mode, img_size=args.img_size, batch=args.batch_size, max_abs_diff=max_diff)
        for name, fn in fns.items():
            row[f"{name}_ms"] = 1e3 * median(times[name])
            row[f"{name}_peak_mib"] = peak_memory_bytes(fn, args.device) / 2**20
        row["speed_ratio"] = row["timm_ms"] / row["ours_ms"]
        row["peak_ratio"] = row["ours_peak_mib"] / row["timm_peak_mib"]
        row["meets_target"] = row["speed_ratio"] >= 1.0
        rows.append(row)
        print(row, flush=True)
    return rows


def compare_efficiency(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    n = args.matmul_size
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=args.device, dtype=dtype)

    def matmul() -> None:
        for _ in range(args.matmul_repeats):
            torch.mm(a, b, out=c)

    for spec in args.models.split(","):
        try:
            name, img, batch = spec.split(":")
            img_size, batch_size = int(img), int(batch)
        except ValueError:
            raise ValueError(f"--models entry {spec!r} must be name:img_size:batch, e.g. biformer_tiny:224:8") from None
        torch.manual_seed(0)
        model = timm.create_model(name)
        _, macs = params_and_macs(name, img_size)
        run = _prepare(model, args)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
        x = _input(args, batch_size, img_size)
        y = torch.randint(0, model.num_classes, (batch_size,), device=args.device)

        def train(run: torch.nn.Module = run, opt: torch.optim.Optimizer = opt, x=x, y=y) -> None:
            _train_step(run, opt, x, y, args.device, args.precision)

        times = interleaved_times({"matmul": matmul, "train": train}, args.device, args.warmup, args.repeats)
        step_flops = 6 * macs * batch_size
        row: dict[str, object] = dict(model=name, img_size=img_size, batch=batch_size, gmacs=macs / 1e9)
        row["train_ms"] = 1e3 * median(times["train"])
        row["achieved_gflops"] = step_flops / median(times["train"]) / 1e9
        row["matmul_peak_gflops"] = 2 * n**3 * args.matmul_repeats / median(times["matmul"]) / 1e9
        row["efficiency"] = row["achieved_gflops"] / row["matmul_peak_gflops"]
        rows.append(row)
        print(row, flush=True)
    return rows


def compare_bra(args: argparse.Namespace) -> list[dict[str, object]]:
    import benchmark_bra

    out = Path(args.out_dir) / f"{args.name or 'compare_bra'}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--shapes", args.shapes, "--device", args.device, "--dtype", args.precision, "--repeats", str(args.repeats)]
    argv += ["--warmup", str(args.warmup), "--max-ref-gib", str(args.max_ref_gib), "--csv", str(out)]
    argv += ["--threads", str(args.threads)] if args.threads else []
    if benchmark_bra.main(argv) != 0:
        raise RuntimeError("benchmark_bra.py: the fast path disagrees with the reference")
    with out.open() as f:
        rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    for row in rows:
        if isinstance(row.get("speedup"), float):
            row["meets_target"] = row["speedup"] >= 2.0 and row["peak_ratio"] <= 0.5
    return rows


def _number(value: str) -> object:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def compare_lightning(args: argparse.Namespace) -> list[dict[str, object]]:
    from benchmark_loop import compare_loops

    row = compare_loops(
        model=args.model, data_root=args.data_root, img_size=args.img_size, batch_size=args.batch_size,
        steps=args.steps, rounds=args.repeats, device=args.device, precision=args.precision,
        channels_last=args.channels_last, compile=args.compile,
    )  # fmt: skip
    row["meets_target"] = row["overhead_pct"] <= 3.0
    return [row]


def compare_data(args: argparse.Namespace) -> list[dict[str, object]]:
    from benchmark_data import compare_pipelines, demo_jpegs, make_jpegs

    rows = []
    for recipe in args.recipes.split(","):
        if recipe == "demo":
            files = demo_jpegs(Path(args.data_root), args.images)
        else:
            files = make_jpegs(Path(args.jpeg_dir), args.images)
        rows.append(compare_pipelines(recipe, files, args.repeats))
        print(rows[-1], flush=True)
    return rows


COLUMNS: dict[str, list[tuple[str, str]]] = {
    "bra": [
        ("setting", "{}"), ("B", "{}"), ("H", "{}"), ("W", "{}"), ("C", "{}"), ("topk", "{}"), ("regions", "{}"),
        ("ref_ms", "{:.1f}"), ("ours_ms", "{:.1f}"), ("speedup", "{:.2f}"), ("ref_peak_mib", "{:.1f}"),
        ("ours_peak_mib", "{:.1f}"), ("peak_ratio", "{:.3f}"), ("saved_ratio", "{:.3f}"), ("err_grad", "{:.1e}"),
        ("meets_target", "{}"),
    ],
    "davit": [
        ("mode", "{}"), ("img_size", "{}"), ("batch", "{}"), ("timm_ms", "{:.1f}"), ("ours_ms", "{:.1f}"),
        ("speed_ratio", "{:.3f}"), ("timm_peak_mib", "{:.1f}"), ("ours_peak_mib", "{:.1f}"), ("peak_ratio", "{:.3f}"),
        ("max_abs_diff", "{:.1e}"), ("meets_target", "{}"),
    ],
    "lightning": [
        ("model", "{}"), ("img_size", "{}"), ("batch", "{}"), ("steps", "{}"), ("rounds", "{}"), ("intervals", "{}"),
        ("plain_ms", "{:.1f}"), ("lightning_ms", "{:.1f}"), ("overhead_pct", "{:+.2f}"), ("plain_wall_s", "{:.2f}"),
        ("lightning_fit_wall_s", "{:.2f}"), ("overhead_pct_per_round", "{}"), ("meets_target", "{}"),
    ],
    "data": [
        ("recipe", "{}"), ("source", "{}"), ("crop", "{}"), ("images", "{}"), ("passes", "{}"),
        ("timm_img_s", "{:.1f}"), ("ours_img_s", "{:.1f}"), ("ratio", "{:.2f}"), ("max_abs_diff", "{:.1e}"),
    ],
    "efficiency": [
        ("model", "{}"), ("img_size", "{}"), ("batch", "{}"), ("gmacs", "{:.3f}"), ("train_ms", "{:.1f}"),
        ("achieved_gflops", "{:.2f}"), ("matmul_peak_gflops", "{:.2f}"), ("efficiency", "{:.3f}"),
    ],
}  # fmt: skip
RUNNERS = {
    "bra": compare_bra,
    "davit": compare_davit,
    "lightning": compare_lightning,
    "data": compare_data,
    "efficiency": compare_efficiency,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    common.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16 = autocast, fp32 weights")
    common.add_argument("--channels-last", action="store_true")
    common.add_argument("--compile", action="store_true", help="torch.compile the models")
    common.add_argument("--compile-backend", default="inductor")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    common.add_argument("--repeats", type=int, default=3, help="timed rounds (passes for data); medians reported")
    common.add_argument("--out-dir", default="docs/benchmarks")
    common.add_argument("--name", default=None, help="file stem of the outputs (default compare_<subcommand>)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bra", parents=[common], help="fast BRA against the gather reference")
    p.add_argument("--shapes", default="tiny224,seg512,det800", help="settings of scripts/benchmark_bra.py")
    p.add_argument("--max-ref-gib", type=float, default=16.0, help="skip stages whose reference needs more")
    p = sub.add_parser("davit", parents=[common], help="strata_davit_tiny against timm davit_tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p = sub.add_parser("lightning", parents=[common], help="Lightning Trainer.fit against a plain loop")
    p.add_argument("--model", default="strata_hybrid_pico")
    p.add_argument("--data-root", default="data/demo/imagenet")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="steps per loop per round (the first is warmup)")
    p = sub.add_parser("data", parents=[common], help="decode + augmentation images/s, ours against timm")
    p.add_argument("--recipes", default="demo,basic,deit", help="comma list of benchmark_data.RECIPES")
    p.add_argument("--data-root", default="data/demo/imagenet/train", help="folder of the demo JPEGs")
    p.add_argument("--jpeg-dir", default=str(Path(tempfile.gettempdir()) / "strata_bench_jpegs"))
    p.add_argument("--images", type=int, default=100, help="images per pass")
    p = sub.add_parser("efficiency", parents=[common], help="training FLOP/s over the measured matmul peak")
    p.add_argument("--models", default=EFFICIENCY_MODELS, help="comma list of name:img_size:batch")
    p.add_argument("--matmul-size", type=int, default=1024, help="side of the square fp32 matmul for the peak")
    p.add_argument("--matmul-repeats", type=int, default=5, help="matmuls per timed call")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}")
    try:
        check_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = RUNNERS[args.command](args)
    columns = COLUMNS[args.command]
    out, stem = Path(args.out_dir), args.name or f"compare_{args.command}"
    write_csv(out / f"{stem}.csv", rows, list(dict.fromkeys([k for k, _ in columns] + [k for r in rows for k in r])))
    flags = [args.device, args.precision] + (["channels_last"] if args.channels_last else [])
    flags += [f"compile({args.compile_backend})"] if args.compile else []
    machine = machine_description(args.device)
    command = "python scripts/benchmark_compare.py " + " ".join(shlex.quote(a) for a in argv)
    text = (
        f"Settings: {', '.join(flags)}; medians of {args.repeats} interleaved rounds after {args.warmup} warmup.\n\n"
        f"Machine: {', '.join(f'{k} {v}' for k, v in machine.items())}.\n\n"
        f"Command: `{command}`\n\n" + markdown_table(rows, columns)
    )
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
