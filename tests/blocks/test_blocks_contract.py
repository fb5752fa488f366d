"""The factory contract, checked for every registered block (blocks registered later are covered automatically)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from blocks import create_block, list_blocks

DIM = 64  # accepted by every block: divisible by 32 (DaViT head dim) and >= 16 (SE reduction)
BATCH = 2
GRAD_SIZE = (13, 17)  # not a multiple of a 7-window: padding/masking paths run
BLOCKS = list_blocks()


def _make(name: str, train: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_block(name, DIM).train(train)


def _input(*size: int) -> torch.Tensor:
    return torch.randn(BATCH, DIM, *size, generator=torch.Generator().manual_seed(1))


def test_blocks_registered() -> None:
    assert {"se", "eca", "ca", "dual", "davit_spatial", "davit_channel"} <= set(BLOCKS)


@pytest.mark.parametrize("size", [(1, 1), (7, 7), (13, 17), (56, 56), (64, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", BLOCKS)
def test_shape_kept(name: str, size: tuple[int, int]) -> None:
    block = _make(name, train=True)
    x = _input(*size)
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", BLOCKS)
def test_every_parameter_gets_gradient(name: str) -> None:
    block = _make(name, train=True)
    x = _input(*GRAD_SIZE)
    weight = torch.randn_like(x)
    (block(x) * weight).sum().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", BLOCKS)
def test_channels_last_input_same_output(name: str) -> None:
    block = _make(name, train=False)
    x = _input(*GRAD_SIZE)
    with torch.no_grad():
        ref = block(x)
        out = block(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BLOCKS)
def test_activation_checkpointing_same_output_and_grads(name: str) -> None:
    block = _make(name, train=True)
    x = _input(*GRAD_SIZE).requires_grad_()
    weight = torch.randn_like(x)

    def run(use_checkpoint: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        block.zero_grad(set_to_none=True)
        x.grad = None
        y = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        (y * weight).sum().backward()
        return y.detach(), [x.grad, *(p.grad for p in block.parameters())]

    y_ref, g_ref = run(False)
    y_ckpt, g_ckpt = run(True)
    torch.testing.assert_close(y_ckpt, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ckpt, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BLOCKS)
def test_bf16_cpu_autocast_close_to_fp32(name: str) -> None:
    block = _make(name, train=False)
    x = _input(*GRAD_SIZE)
    with torch.no_grad():
        ref = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
    assert out.shape == ref.shape
    err = (out.float() - ref).abs()
    scale = ref.abs().max()
    assert err.max() <= 5e-2 * scale, f"max error {err.max():.4g} vs output scale {scale:.4g}"
    assert err.mean() <= 1e-2 * ref.abs().mean()


def _compile_all(backend: str, dynamic: bool | None) -> None:
    for name in BLOCKS:
        torch._dynamo.reset()
        block = _make(name, train=True)
        compiled = torch.compile(block, backend=backend, fullgraph=True, dynamic=dynamic)
        for size in [(7, 7), (9, 11)]:  # divisible and padded paths
            x = _input(*size)
            torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_compile_fullgraph_no_graph_breaks() -> None:
    """Dynamo captures every block as one graph (fullgraph=True raises on a graph break); AOT autograd traces it."""
    _compile_all("aot_eager", dynamic=False)


@pytest.mark.slow
def test_compile_fullgraph_dynamic_shapes() -> None:
    _compile_all("aot_eager", dynamic=None)


@pytest.mark.slow
def test_compile_fullgraph_inductor() -> None:
    # NOTE static shapes: inductor's dynamic-shape training graph of the DaViT blocks (timm's too) hits pytorch#185510.
    _compile_all("inductor", dynamic=False)
