"""Benchmark: does attention capture cost anything when it is off?

Times the forward pass of three copies of one model (same weights, same input) in one process, interleaved
(``never``, ``off``, ``on``, ``never``, ``off``, ...), and prints median milliseconds and ratios:

* ``never``: a model no capture ever touched;
* ``off``:   a model that was captured once and detached (``with AttentionCapture(model): ...`` has exited), i.e.
  the state of a model whose visualisation is switched off; the only capture code left on its path is the
  routing blocks' ``if self.capture is not None``;
* ``on``:    the same model inside ``with AttentionCapture(model)`` (for reference: the price of recording).

It also checks that ``off`` and ``on`` produce outputs bit-identical to ``never``, and times the one statement the
capture adds to a routing block's forward (``self.capture is not None``) to bound its share of a forward pass: a
``never`` model runs that check too, so ``off / never`` measures the noise floor and the bound measures the rest.

Usage::

    python scripts/benchmark_capture.py [--model strata_hybrid_pico] [--size 224] [--batch 8] [--repeats 30]
                                        [--warmup 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import timeit

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="strata_hybrid_pico")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda needs a GPU; use --device cpu")

    import timm

    import backbones  # noqa: F401  (registers the project's models)
    from visualization.capture import AttentionCapture

    torch.manual_seed(0)
    never = timm.create_model(args.model).eval().to(args.device)
    off = copy.deepcopy(never)
    on = copy.deepcopy(never)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    capture_on = AttentionCapture(on)
    with torch.no_grad():
        reference = never(x)
        with AttentionCapture(off):
            off(x)
        capture_on.attach()
        same = torch.equal(off(x), reference) and torch.equal(on(x), reference)
        times: dict[str, list[float]] = {"never": [], "off": [], "on": []}
        models = {"never": never, "off": off, "on": on}
        for i in range(args.warmup + args.repeats):
            for name, model in models.items():
                _sync(args.device)
                start = time.perf_counter()
                model(x)
                _sync(args.device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        capture_on.detach()
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    from blocks.routing import BiLevelRoutingAttention

    routing = [m for m in never.modules() if isinstance(m, BiLevelRoutingAttention)]
    check_s = 0.0
    if routing:
        block = routing[0]
        check_s = min(timeit.repeat("block.capture is not None", globals={"block": block}, number=100_000, repeat=5))
        check_s = check_s / 100_000 * len(routing)
    share = check_s / (median["never"] / 1e3)
    # NOTE: paired per-iteration ratios are robust to slow moments of a shared machine
    ratio_off = statistics.median(o / n for o, n in zip(times["off"], times["never"]))
    ratio_on = statistics.median(o / n for o, n in zip(times["on"], times["never"]))
    print(f"{args.model} {args.batch}x3x{args.size}x{args.size} on {args.device}, {args.repeats} interleaved repeats")
    print(f"never {median['never']:.2f} ms | off {median['off']:.2f} ms | on {median['on']:.2f} ms (medians)")
    print(f"off / never = {ratio_off:.4f}   on / never = {ratio_on:.4f}   (median of paired ratios)")
    print(f"outputs bit-identical to never: {same}")
    print(f"off-path check: {check_s * 1e9:.0f} ns per forward ({len(routing)} routing blocks) = {share:.1e} of it")
    return {"ratio_off": ratio_off, "ratio_on": ratio_on, "identical": float(same), "check_share": share}


if __name__ == "__main__":
    main()
