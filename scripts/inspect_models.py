"""Inspect registered models: parameters and multiply-adds, or per-stage output shapes and parameters.

MACs are multiply-adds as papers count them (``core/model_cost.py``): ``FlopCounterMode`` counts the FLOPs of the
matrix products and convolutions (attention's ``q @ k`` and ``attn @ v`` included) of one forward pass on a 1x3xSxS
input in eval mode, and ``MACs = FLOPs / 2``. Element-wise ops are not counted, as in the papers' tables. The model
runs on the ``meta`` device where it can (no data, fast; on CPU ``scaled_dot_product_attention`` dispatches to a
kernel the counter does not see) and falls back to CPU. A block with a ``mac_counting()`` context (the block contract
of ``blocks/factory.py``) is counted inside it: bi-level routing attention then runs its plain gather kernel, since
the fast path's block-masked dense attention for tiny regions multiplies more zeros than the algorithm needs.

Usage::

    python scripts/inspect_models.py list [--filter PATTERN] [--img-size 224] [--all]
    python scripts/inspect_models.py shapes MODEL [--img-size 224]

``list`` shows the models registered by this project (those whose entrypoint lives in ``backbones.*``); with
``--all`` it shows every timm model matching ``--filter``. ``shapes`` works for any timm model that supports
``features_only``.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Sequence

import timm
import torch
from torch import nn

import backbones  # noqa: F401  (registers the project's models)
from core import model_cost
from core.model_cost import count_macs, count_params  # noqa: F401  (the benchmark scripts import them from here)


def project_models(pattern: str = "*") -> list[str]:
    """Names of the timm models whose entrypoint is defined in the ``backbones`` package, matching ``pattern``."""
    names = timm.list_models()
    return [
        n
        for n in names
        if fnmatch.fnmatch(n, pattern) and timm.models.model_entrypoint(n).__module__.startswith("backbones.")
    ]


def params_and_macs(name: str, img_size: int) -> tuple[int, int]:
    """Parameter count and MACs of ``timm.create_model(name)`` (``core.model_cost.params_and_macs``)."""
    return model_cost.params_and_macs(lambda: timm.create_model(name), img_size)


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def cmd_list(pattern: str, img_size: int, include_timm: bool) -> int:
    names = timm.list_models(pattern) if include_timm else project_models(pattern)
    if not names:
        print(f"no model matches {pattern!r}", file=sys.stderr)
        return 1
    print(f"{'model':<32} {'params':>12} {'params (M)':>10} {f'MACs @{img_size}':>12}")
    for name in names:
        params, macs = params_and_macs(name, img_size)
        print(f"{name:<32} {params:>12,} {params / 1e6:>10.2f} {_fmt(macs):>12}")
    return 0


def _params_per_stage(model: nn.Module, modules: Sequence[str], img_size: int) -> list[int]:
    """Parameters per stage: a leaf module belongs to the stage whose output it precedes in the forward pass.

    Returns ``len(modules) + 1`` counts; the last one is what runs after the last stage (the head).
    """
    done, order, hooks = [0], [], []
    named = dict(model.named_modules())
    for name in modules:
        hooks.append(named[name].register_forward_hook(lambda *_: done.__setitem__(0, done[0] + 1)))
    for mod in model.modules():
        if any(True for _ in mod.parameters(recurse=False)):
            hooks.append(mod.register_forward_pre_hook(lambda m, _: order.append((m, done[0]))))
    with torch.no_grad():
        model.eval()(torch.randn(1, getattr(model, "in_chans", 3), img_size, img_size))
    for h in hooks:
        h.remove()
    counts = [0] * (len(modules) + 1)
    seen: set[int] = set()
    for mod, stage in order:
        if id(mod) not in seen:
            seen.add(id(mod))
            counts[min(stage, len(modules))] += sum(p.numel() for p in mod.parameters(recurse=False))
    return counts


def cmd_shapes(name: str, img_size: int) -> int:
    model = timm.create_model(name)
    features = timm.create_model(name, features_only=True).eval()
    info = features.feature_info
    with torch.no_grad():
        outs = features(torch.randn(1, getattr(model, "in_chans", 3), img_size, img_size))
    if isinstance(outs, torch.Tensor):
        outs = [outs]
    full_info = model.feature_info if isinstance(model.feature_info, list) else model.feature_info.get_dicts()
    params = _params_per_stage(model, [f["module"] for f in full_info][-len(outs) :], img_size)
    print(f"{name} @{img_size}: {count_params(model):,} parameters")
    print(f"{'stage':>5} {'module':<16} {'stride':>6} {'channels':>8} {'shape':<22} {'params':>12}")
    for i, (out, mod, red, chs) in enumerate(zip(outs, info.module_name(), info.reduction(), info.channels())):
        print(f"{i:>5} {mod:<16} {red:>6} {chs:>8} {list(out.shape)!s:<22} {params[i]:>12,}")
    print(f"{'':>5} {'(head)':<16} {'':>6} {'':>8} {'':<22} {params[-1]:>12,}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="parameters and MACs (FlopCounterMode FLOPs / 2) of registered models")
    p_list.add_argument("--filter", default="*", help="fnmatch pattern on model names (default: all)")
    p_list.add_argument("--img-size", type=int, default=224, help="square input side for the MAC count")
    p_list.add_argument("--all", action="store_true", help="list every timm model matching --filter, not only ours")
    p_shapes = sub.add_parser("shapes", help="per-stage output shapes (features_only) and parameters of one model")
    p_shapes.add_argument("model", help="any timm model name")
    p_shapes.add_argument("--img-size", type=int, default=224, help="square input side")
    args = parser.parse_args(argv)
    if args.img_size < 1:
        parser.error(f"--img-size must be a positive integer, got {args.img_size}")
    if args.command == "list":
        return cmd_list(args.filter, args.img_size, args.all)
    if args.model not in timm.list_models():
        parser.error(f"unknown model {args.model!r}; see `python scripts/inspect_models.py list --all --filter '*'`")
    return cmd_shapes(args.model, args.img_size)


if __name__ == "__main__":
    sys.exit(main())
