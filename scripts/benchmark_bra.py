"""Benchmark the fast bi-level routing attention against the plain gather reference, in one process.

For every stage of every chosen setting both implementations of ``blocks.routing.BiLevelRoutingAttention`` are built
on the same weights; the script checks that outputs and input gradients agree, times forward + backward (warmup,
then the median of the repeats, the two implementations interleaved), measures memory and prints a table with
``speedup = ref_ms / ours_ms`` and ``mem_ratio = ours / ref``.

Memory, per implementation, for one forward + backward (inputs and weights excluded):

- ``peak``: on CUDA ``torch.cuda.max_memory_allocated`` above the start; on CPU the peak of the running sum of the
  allocations and frees recorded by ``torch.profiler`` (``profile_memory=True``) - the CPU counterpart of it.
- ``saved``: bytes of the tensors autograd keeps for backward (``saved_tensors_hooks``, each storage once) plus the
  output - the activation memory a training step holds per block between forward and backward.

Usage::

    python scripts/benchmark_bra.py [--shapes tiny224,seg512,det800] [--device cpu|cuda] [--dtype fp32|bf16]
                                    [--batch N] [--repeats N] [--warmup N] [--csv PATH]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from benchmark_common import peak_memory_bytes, sync

from blocks.routing import BiLevelRoutingAttention, region_grid

# setting -> (n_win, default batch, stages as (H, W, C, heads, topk)); biformer_tiny's BRA stages
SETTINGS: dict[str, tuple[int, int, list[tuple[int, int, int, int, int]]]] = {
    "tiny224": (7, 4, [(56, 56, 64, 2, 1), (28, 28, 128, 4, 4), (14, 14, 256, 8, 16)]),
    "seg512": (8, 1, [(128, 128, 64, 2, 1), (64, 64, 128, 4, 4), (32, 32, 256, 8, 16)]),
    "det800": (16, 1, [(200, 336, 64, 2, 1), (100, 168, 128, 4, 4), (50, 84, 256, 8, 16)]),
    "smoke": (3, 1, [(7, 8, 32, 2, 2)]),  # tiny and non-divisible, for the test-suite
}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # max |ours - ref| / max |ref|


def _autocast(device: str, dtype: str):
    return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def _fwd_bwd(model: BiLevelRoutingAttention, x: torch.Tensor, gy: torch.Tensor, device: str, dtype: str):
    with _autocast(device, dtype):
        y = model(x)
    grads = torch.autograd.grad(y, [x, *model.parameters()], gy)
    return y, grads[0]


def _saved_bytes(model: BiLevelRoutingAttention, x: torch.Tensor, device: str, dtype: str) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in (x.data_ptr(), *(p.data_ptr() for p in model.parameters())):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device, dtype):
        y = model(x)
    return sum(storages.values()) + y.untyped_storage().nbytes()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def run_stage(
    setting: str, n_win: int, stage: tuple[int, int, int, int, int], args: argparse.Namespace, batch: int
) -> dict[str, object]:
    H, W, C, heads, topk = stage
    torch.manual_seed(0)
    ours = BiLevelRoutingAttention(C, heads, n_win, topk, impl="fast").to(args.device)
    ref = BiLevelRoutingAttention(C, heads, n_win, topk, impl="reference").to(args.device)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(batch, H, W, C, device=args.device, requires_grad=True)
    gy = torch.randn(batch, H, W, C, device=args.device)
    rh, rw, nh, nw = region_grid(H, W, n_win)
    row: dict[str, object] = dict(
        setting=setting, B=batch, H=H, W=W, C=C, heads=heads, topk=min(topk, nh * nw), regions=nh * nw, tokens=rh * rw
    )
    # the reference's gather backward allocates a (B, R, R, w2, 2C) gradient
    ref_gib = batch * (nh * nw) ** 2 * rh * rw * 2 * C * (2 if args.dtype == "bf16" else 4) / 2**30
    if ref_gib > args.max_ref_gib:
        print(f"skip {setting} {H}x{W}: the reference would allocate {ref_gib:.1f} GiB (> --max-ref-gib)")
        return row

    y_o, g_o = _fwd_bwd(ours, x, gy, args.device, args.dtype)
    y_r, g_r = _fwd_bwd(ref, x, gy, args.device, args.dtype)
    row["err_out"], row["err_grad"] = _rel_err(y_o, y_r), _rel_err(g_o, g_r)
    row["ok"] = max(row["err_out"], row["err_grad"]) <= TOLERANCE[args.dtype]
    del y_o, g_o, y_r, g_r

    times: dict[str, list[float]] = {"ref": [], "ours": []}
    warmup = max(0, args.warmup - 1)  # NOTE: the agreement check above was the first warmup iteration
    for i in range(warmup + args.repeats):
        for name, model in (("ref", ref), ("ours", ours)):
            sync(args.device)
            t0 = time.perf_counter()
            _fwd_bwd(model, x, gy, args.device, args.dtype)
            sync(args.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    for name, model in (("ref", ref), ("ours", ours)):
        row[f"{name}_ms"] = 1e3 * statistics.median(times[name])
        row[f"{name}_peak_mib"] = peak_memory_bytes(
            lambda m=model: _fwd_bwd(m, x, gy, args.device, args.dtype), args.device
        )
        row[f"{name}_peak_mib"] /= 2**20
        row[f"{name}_saved_mib"] = _saved_bytes(model, x, args.device, args.dtype) / 2**20
    row["speedup"] = row["ref_ms"] / row["ours_ms"]
    row["peak_ratio"] = row["ours_peak_mib"] / row["ref_peak_mib"]
    row["saved_ratio"] = row["ours_saved_mib"] / row["ref_saved_mib"]
    return row


COLUMNS = [
    ("setting", "{}"),
    ("B", "{}"),
    ("H", "{}"),
    ("W", "{}"),
    ("C", "{}"),
    ("heads", "{}"),
    ("topk", "{}"),
    ("regions", "{}"),
    ("tokens", "{}"),
    ("ref_ms", "{:.1f}"),
    ("ours_ms", "{:.1f}"),
    ("speedup", "{:.2f}"),
    ("ref_peak_mib", "{:.1f}"),
    ("ours_peak_mib", "{:.1f}"),
    ("peak_ratio", "{:.3f}"),
    ("ref_saved_mib", "{:.1f}"),
    ("ours_saved_mib", "{:.1f}"),
    ("saved_ratio", "{:.3f}"),
    ("err_out", "{:.1e}"),
    ("err_grad", "{:.1e}"),
    ("ok", "{}"),
]


def _print_table(rows: list[dict[str, object]]) -> None:
    cells = [[name for name, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[name]) if name in row else "-" for name, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny224,seg512,det800", help=f"comma list of {sorted(SETTINGS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default per setting: tiny224 4, else 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations (the agreement check is the first)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-ref-gib", type=float, default=16.0, help="skip stages whose reference needs more")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown --shapes {unknown}; choose from {sorted(SETTINGS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA build and a GPU; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    mem = "CUDA max_memory_allocated" if args.device == "cuda" else "CPU profiler allocation peak"
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, dtype {args.dtype}")
    print(f"time: median of {args.repeats} forward+backward (after {args.warmup} warmup); peak: {mem}; ", end="")
    print("saved: autograd saved tensors + output")
    rows = []
    for name in names:
        n_win, batch, stages = SETTINGS[name]
        for stage in stages:
            rows.append(run_stage(name, n_win, stage, args, args.batch or batch))
            print("  done", {k: rows[-1][k] for k in ("setting", "H", "W") if k in rows[-1]}, flush=True)
    _print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[name for name, _ in COLUMNS])
            writer.writeheader()
            writer.writerows(rows)
    if not all(row.get("ok", True) for row in rows):
        print("MISMATCH: the fast path disagrees with the reference beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
