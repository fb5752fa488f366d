"""Bi-level routing attention (blocks/routing.py): shapes, equivalences, masking, gradients, options, benchmark."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blocks import create_block, list_blocks, routing
from blocks.routing import AttentionLePE, BiFormerBlock, BiLevelRoutingAttention, region_grid, use_masked_dense
from tests.support.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _pair(dim: int, heads: int, n_win: int, topk: int, **kwargs) -> tuple[BiLevelRoutingAttention, ...]:
    torch.manual_seed(0)
    fast = BiLevelRoutingAttention(dim, heads, n_win, topk, impl="fast", **kwargs)
    ref = BiLevelRoutingAttention(dim, heads, n_win, topk, impl="reference", **kwargs)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _grads(m: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_()
    y = m(x)
    grads = torch.autograd.grad(y, [x, *m.parameters()], gy)
    return y, list(grads)


def _dense_bra(m: BiLevelRoutingAttention, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain multi-head attention over all tokens + LePE(v) + proj, straight from the module's weights."""
    B, H, W, C = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).split([m.qk_dim, m.qk_dim, m.dim], dim=-1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, H * W, m.num_heads, -1).transpose(1, 2)

    attn = (heads(q) @ heads(k).transpose(-1, -2) * scale).softmax(-1)
    out = (attn @ heads(v)).transpose(1, 2).reshape(B, H, W, C)
    lepe = F.conv2d(v.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias, padding=m.lepe.padding, groups=C)
    return F.linear(out + lepe.permute(0, 2, 3, 1), m.proj.weight, m.proj.bias)


def _official_pair(
    dim: int, heads: int, n_win: int, topk: int, impl: str = "fast"
) -> tuple[BiLevelRoutingAttention, ...]:
    torch.manual_seed(0)
    official = BiLevelRoutingAttention(dim, heads, n_win, topk, impl=impl, pad_mode="official")
    mask = BiLevelRoutingAttention(dim, heads, n_win, topk, impl=impl)
    mask.load_state_dict(official.state_dict())
    return official, mask


def _pad_to(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """Zero-pad an NHWC map at the bottom/right to multiples of ``n_win`` (official ``auto_pad``)."""
    return F.pad(x, (0, 0, 0, -x.shape[2] % n_win, 0, -x.shape[1] % n_win))


class _PadCrop(torch.nn.Module):
    """``m`` run on the explicitly zero-padded map (divisible, so nothing is padded or masked inside), cropped."""

    def __init__(self, m: BiLevelRoutingAttention) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(_pad_to(x, self.m.n_win))[:, : x.shape[1], : x.shape[2]]


def _tokens_topk(h: int, w: int, n_win: int, topk: int) -> tuple[int, int]:
    rh, rw, nh, nw = region_grid(h, w, n_win)
    return nh * rh * nw * rw, min(topk, nh * nw)


def test_region_grid_covers_map_without_empty_regions() -> None:
    for H, W, n_win in [(1, 1, 7), (5, 3, 7), (13, 17, 7), (50, 84, 16), (200, 336, 16), (56, 56, 7)]:
        rh, rw, nh, nw = region_grid(H, W, n_win)
        assert nh <= n_win and nw <= n_win
        assert (nh - 1) * rh < H <= nh * rh and (nw - 1) * rw < W <= nw * rw  # last region holds real tokens
    assert region_grid(56, 56, 7) == (8, 8, 7, 7)


@pytest.mark.parametrize("name", ["bra", "bra_full"])
@pytest.mark.parametrize("size", [(1, 1), (7, 7), (13, 17), (56, 56), (64, 96)])
def test_registered_blocks_keep_shape(name: str, size: tuple[int, int]) -> None:
    assert name in list_blocks()
    block = create_block(name, 32, n_win=7, topk=4).eval()
    x = torch.randn(1, 32, *size)
    with torch.no_grad():
        y = block(x)
        y_cl = block(x.to(memory_format=torch.channels_last))
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y_cl, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["bra", "full"])
def test_every_parameter_gets_a_gradient(attn: str) -> None:
    torch.manual_seed(0)
    block = BiFormerBlock(32, attn=attn, n_win=3, topk=2, layer_scale_init_value=1e-2)
    block(torch.randn(2, 32, 13, 17)).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_state_dict_maps_to_official_keys_by_rename() -> None:
    official = {"pos_embed", "norm1", "attn.qkv.qkv", "attn.wo", "attn.lepe", "norm2", "mlp.0", "mlp.3"}
    rename = {"attn.qkv.qkv": "attn.qkv", "attn.wo": "attn.proj", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    ours = {k.rsplit(".", 1)[0] for k in create_block("bra", 64).state_dict()}
    assert ours == {rename.get(k, k) for k in official}
    full = create_block("bra_full", 64)
    assert {k.rsplit(".", 1)[0] for k in full.state_dict()} == ours
    assert full.attn.qkv.bias is None and full.attn.num_heads == 8


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize(
    ("h", "w", "n_win"),
    [(14, 14, 7), (13, 17, 7), (30, 45, 3), (29, 44, 3)],  # dense-kernel / routed-kernel sizes, (non-)divisible
)
def test_all_regions_routed_equals_dense_attention(impl: str, h: int, w: int, n_win: int) -> None:
    fast, ref = _pair(32, 2, n_win, n_win * n_win)
    m = fast if impl == "fast" else ref
    x = torch.randn(2, h, w, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _dense_bra(m, x, m.scale), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("h", "w", "n_win", "topk", "dense_kernel"),
    [
        (28, 28, 7, 4, False),
        (27, 30, 7, 3, False),  # padded: 28 x 30
        (14, 14, 7, 16, True),
        (11, 13, 7, 16, True),  # padded: 12 x 14
        (3, 5, 7, 4, True),  # smaller than n_win: 1-token regions
        (40, 52, 4, 1, False),
    ],
)
def test_fast_equals_reference_fp32(h: int, w: int, n_win: int, topk: int, dense_kernel: bool) -> None:
    assert use_masked_dense(*_tokens_topk(h, w, n_win, topk)) == dense_kernel
    fast, ref = _pair(64, 2, n_win, topk)
    x, gy = torch.randn(2, h, w, 64), torch.randn(2, h, w, 64)
    y_f, g_f = _grads(fast, x, gy)
    y_r, g_r = _grads(ref, x, gy)
    torch.testing.assert_close(y_f, y_r, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_region_descriptors_average_real_tokens_only(impl: str) -> None:
    m = BiLevelRoutingAttention(32, 2, 7, 3, impl=impl)
    seen = {}
    m.router.register_forward_hook(lambda mod, args, out: seen.update(args=args))
    x = torch.randn(1, 13, 17, 32)  # regions 2 x 3 -> padded to 14 x 18, 7 x 6 regions
    with torch.no_grad():
        m(x)
        q, k, _ = F.linear(x, m.qkv.weight, m.qkv.bias).split(32, dim=-1)
    for got, t in zip(seen["args"], (q, k)):
        expected = [t[0, i : i + 2, j : j + 3].mean((0, 1)) for i in range(0, 13, 2) for j in range(0, 17, 3)]
        torch.testing.assert_close(got[0], torch.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_official_padding_region_descriptors_average_padded_regions(impl: str) -> None:
    m = BiLevelRoutingAttention(32, 2, 7, 3, impl=impl, pad_mode="official")
    seen = {}
    m.router.register_forward_hook(lambda mod, args, out: seen.update(args=args))
    x = torch.randn(1, 13, 17, 32)  # zero-padded to 14 x 21: 7 x 7 regions of 2 x 3, padding included in the means
    with torch.no_grad():
        m(x)
        q, k, _ = F.linear(_pad_to(x, 7), m.qkv.weight, m.qkv.bias).split(32, dim=-1)
    for got, t in zip(seen["args"], (q, k)):
        expected = [t[0, i : i + 2, j : j + 3].mean((0, 1)) for i in range(0, 14, 2) for j in range(0, 21, 3)]
        torch.testing.assert_close(got[0], torch.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize(
    ("h", "w", "n_win", "topk"),
    [
        (13, 17, 7, 3),  # both sides padded (14 x 21), routed kernel
        (14, 17, 7, 3),  # W only
        (13, 14, 7, 3),  # H only
        (11, 13, 7, 16),  # masked-dense kernel (14 x 14)
        (12, 12, 7, 4),  # unpadded in "mask" mode (6 x 6 regions of 2 x 2), 14 x 14 in "official"
    ],
)
def test_official_padding_equals_bra_on_explicitly_padded_map(impl: str, h: int, w: int, n_win: int, topk: int) -> None:
    official, plain = _official_pair(32, 2, n_win, topk, impl)
    x, gy = torch.randn(2, h, w, 32), torch.randn(2, h, w, 32)
    y, g = _grads(official, x, gy)
    y_ref, g_ref = _grads(_PadCrop(plain), x, gy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, g_ref):  # input, then every parameter
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize(("h", "w", "n_win"), [(13, 17, 7), (29, 44, 3), (5, 3, 7)])
def test_official_padding_with_all_regions_is_dense_attention_over_padded_map(
    impl: str, h: int, w: int, n_win: int
) -> None:
    """topk = n_win**2: attention over all tokens of the zero-padded map (padded keys too), LePE on it, cropped."""
    m, _ = _official_pair(32, 2, n_win, n_win * n_win, impl)
    x = torch.randn(2, h, w, 32)
    with torch.no_grad():
        expected = _dense_bra(m, _pad_to(x, n_win), m.scale)[:, :h, :w]
        torch.testing.assert_close(m(x), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("path", ["routed", "masked_dense", "reference"])
def test_pad_modes_agree_on_multiples_of_n_win_and_differ_otherwise(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path != "reference":
        monkeypatch.setattr(routing, "use_masked_dense", lambda tokens, topk: path == "masked_dense")
    official, mask = _official_pair(32, 2, 7, 4, "reference" if path == "reference" else "fast")
    for h, w in [(14, 21), (7, 7)]:
        x, gy = torch.randn(2, h, w, 32), torch.randn(2, h, w, 32)
        (y_o, g_o), (y_m, g_m) = _grads(official, x, gy), _grads(mask, x, gy)
        assert torch.equal(y_o, y_m) and all(torch.equal(a, b) for a, b in zip(g_o, g_m))
    for h, w in [(13, 21), (14, 20), (12, 12)]:
        x = torch.randn(2, h, w, 32)
        with torch.no_grad():
            assert (official(x) - mask(x)).abs().max() > 1e-2, (h, w)


def test_block_passes_pad_mode() -> None:
    assert create_block("bra", 32, n_win=7, topk=4, pad_mode="official").attn.pad_mode == "official"
    assert create_block("bra", 32).attn.pad_mode == "mask"


@pytest.mark.parametrize(("h", "w", "topk"), [(28, 28, 4), (14, 14, 16), (27, 30, 3)])
def test_fast_equals_reference_bf16_autocast(h: int, w: int, topk: int) -> None:
    fast, ref = _pair(64, 2, 7, topk)
    x = torch.randn(2, h, w, 64, requires_grad=True)
    outs = []
    for m in (fast, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        (g,) = torch.autograd.grad(y.float().square().sum(), x)
        outs.append((y.float(), g))
    (y_f, g_f), (y_r, g_r) = outs
    assert (y_f - y_r).abs().max() <= 3e-2 * y_r.abs().max()
    assert (g_f - g_r).abs().max() <= 3e-2 * g_r.abs().max()


def test_routing_is_not_differentiated() -> None:
    m = BiLevelRoutingAttention(32, 2, 7, 4)
    seen = {}
    m.router.register_forward_hook(lambda mod, args, out: seen.update(args=args, out=out))
    x = torch.randn(1, 14, 14, 32, requires_grad=True)
    m(x).sum().backward()
    assert not any(t.requires_grad for t in seen["args"])
    assert seen["out"].dtype == torch.int64 and seen["out"].grad_fn is None
    assert x.grad is not None


def test_attention_lepe_equals_direct_recomputation() -> None:
    torch.manual_seed(0)
    m = AttentionLePE(64)
    x = torch.randn(2, 5, 7, 64)
    B, H, W, C = x.shape
    q, k, v = (t.reshape(B, H * W, 8, 8).transpose(1, 2) for t in F.linear(x, m.qkv.weight).chunk(3, dim=-1))
    attn = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(B, H, W, C)
    lepe = F.conv2d(x.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias, padding=2, groups=C).permute(0, 2, 3, 1)
    expected = F.linear(out + lepe, m.proj.weight, m.proj.bias)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-4)


def test_scale_mode_changes_the_scale() -> None:
    fast, _ = _pair(64, 4, 3, 9)
    head = BiLevelRoutingAttention(64, 4, 3, 9, scale_mode="head")
    head.load_state_dict(fast.state_dict())
    assert fast.scale == 64**-0.5 and head.scale == 16**-0.5
    x = torch.randn(1, 9, 12, 64)
    with torch.no_grad():
        torch.testing.assert_close(head(x), _dense_bra(head, x, 16**-0.5), atol=2e-5, rtol=1e-4)
        assert not torch.allclose(head(x), fast(x), atol=1e-3)
    assert BiLevelRoutingAttention(64, 4, qk_scale=0.3).scale == 0.3


def test_checkpoint_and_channels_last_match_eager() -> None:
    torch.manual_seed(0)
    block = BiFormerBlock(32, n_win=3, topk=2)
    x = torch.randn(2, 32, 13, 17)
    x1 = x.clone().requires_grad_()
    block(x1).square().sum().backward()
    x2 = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    torch.utils.checkpoint.checkpoint(block, x2, use_reentrant=False).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pad_mode", ["mask", "official"])
def test_no_graph_breaks_under_dynamo(pad_mode: str) -> None:
    m = BiLevelRoutingAttention(32, 2, 7, 4, pad_mode=pad_mode)
    for size in [(28, 28), (27, 30)]:
        explanation = torch._dynamo.explain(m)(torch.randn(1, *size, 32))
        assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_compiled_forward_backward_matches_eager() -> None:
    torch.manual_seed(0)
    block = BiFormerBlock(32, n_win=3, topk=2)
    x = torch.randn(2, 32, 13, 17)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = block(x1)
    y1.square().sum().backward()
    y2 = torch.compile(block, fullgraph=True)(x2)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        BiLevelRoutingAttention(64, num_heads=5)
    with pytest.raises(ValueError, match="scale_mode"):
        BiLevelRoutingAttention(64, scale_mode="bogus")
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttention(64, topk=0)
    with pytest.raises(ValueError, match="attn"):
        BiFormerBlock(64, attn="bogus")
    with pytest.raises(ValueError, match="pad_mode='auto' must be one of"):
        BiFormerBlock(64, pad_mode="auto")
    m = BiLevelRoutingAttention(64, impl="bogus")
    with pytest.raises(ValueError, match="impl"):
        m(torch.randn(1, 7, 7, 64))


def test_benchmark_script_runs_and_writes_csv(tmp_path: Path) -> None:
    bench = load_script("benchmark_bra")
    out = tmp_path / "bra.csv"
    assert bench.main(["--shapes", "smoke", "--repeats", "1", "--warmup", "0", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["ok"] == "True"
    assert float(rows[0]["speedup"]) > 0 and float(rows[0]["ref_peak_mib"]) > 0
