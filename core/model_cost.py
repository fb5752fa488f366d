"""What a model costs: parameters and multiply-adds as papers count them.

MACs: ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of the matrix products and convolutions
(attention's ``q @ k`` and ``attn @ v`` included) of one forward pass on a ``1 x C x S x S`` input in eval mode; a
multiply-add is two FLOPs, so ``MACs = FLOPs / 2``. Element-wise ops (activations, norms, pooling, gating) are not
counted, as in the papers' tables. A module that defines ``mac_counting()`` (the block contract of
``blocks/factory.py``, e.g. bi-level routing attention switching to its plain gather kernel) runs inside that
context while the count is taken. On CPU ``scaled_dot_product_attention`` dispatches to a kernel the counter does not
see, so callers count on the ``meta`` device where the model allows it (``params_and_macs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params", "params_and_macs"]


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int, in_chans: int = 3, device: torch.device | str | None = None) -> int:
    """Multiply-adds of one forward pass on a ``1 x in_chans x img_size x img_size`` input (FLOPs / 2).

    The input goes on ``device``, by default the device of the model's parameters; the model is left in eval mode.
    """
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    x = torch.randn(1, in_chans, img_size, img_size, device=device)
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if hasattr(module, "mac_counting"):
                stack.enter_context(module.mac_counting())
        with FlopCounterMode(display=False) as counter:
            model.eval()(x)
    return counter.get_total_flops() // 2


def params_and_macs(build: Callable[[], nn.Module], img_size: int) -> tuple[int, int]:
    """Parameter count and MACs of the model ``build()`` returns, built on ``meta`` tensors where it allows it."""
    try:
        with torch.device("meta"):
            model = build()
        return count_params(model), count_macs(model, img_size, getattr(model, "in_chans", 3))
    except (NotImplementedError, RuntimeError):
        model = build()
        return count_params(model), count_macs(model, img_size, getattr(model, "in_chans", 3))
