"""DaViT dual attention blocks: timm equivalence (same weights), masked window padding, gradients, weight names."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import davit as timm_davit
from torch import nn

from blocks import create_block
from blocks.dual import ChannelBlock2d, DualAttentionBlock2d, SpatialBlock2d, WindowAttention

DIM, HEADS = 96, 3  # davit_tiny stage 1


def _randomize_(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _input(*size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, DIM, *size, generator=torch.Generator().manual_seed(seed))


def _pair(ours: type[nn.Module], theirs: type[nn.Module], **kwargs) -> tuple[nn.Module, nn.Module]:
    ref = theirs(DIM, num_heads=HEADS, qkv_bias=True, **kwargs).eval()
    _randomize_(ref)
    mine = ours(DIM, **kwargs).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    return mine, ref


@torch.no_grad()
def test_spatial_block_equals_timm_at_divisible_size() -> None:
    mine, ref = _pair(SpatialBlock2d, timm_davit.SpatialBlock)
    x = _input(56, 56)
    assert (mine(x) - ref(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [(56, 56), (13, 17)], ids=str)
@torch.no_grad()
def test_channel_block_equals_timm(size: tuple[int, int]) -> None:
    mine, ref = _pair(ChannelBlock2d, timm_davit.ChannelBlock)
    x = _input(*size)
    assert (mine(x) - ref(x)).abs().max() <= 1e-5


@torch.no_grad()
def test_dual_block_equals_timm_dual_block() -> None:
    ref = nn.Sequential(
        timm_davit.SpatialBlock(DIM, num_heads=HEADS, qkv_bias=True),
        timm_davit.ChannelBlock(DIM, num_heads=HEADS, qkv_bias=True),
    ).eval()
    _randomize_(ref)
    mine = create_block("dual", DIM).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = _input(56, 56)
    assert (mine(x) - ref(x)).abs().max() <= 1e-5


@pytest.mark.parametrize(("stage", "dim"), [(0, 96), (2, 384)])
def test_timm_davit_tiny_dual_block_weights_load_one_to_one(stage: int, dim: int) -> None:
    model = timm.create_model("davit_tiny", pretrained=False)
    prefix = f"stages.{stage}.blocks.0."
    state = {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    block = DualAttentionBlock2d(dim)
    block.load_state_dict(state, strict=True)
    assert block[0].attn.num_heads == block[1].attn.num_heads == dim // 32


def _spatial_block_reference(block: SpatialBlock2d, x: torch.Tensor) -> torch.Tensor:
    """DaViT spatial block where each window attends over its valid (unpadded) tokens only, window by window."""
    B, C, H, W = x.shape
    wh, ww = block.window_size
    heads = block.attn.num_heads
    d = C // heads

    def cpe(t: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:  # (B, H, W, C)
        t = t.permute(0, 3, 1, 2)
        return (t + F.conv2d(t, conv.weight, conv.bias, padding=1, groups=C)).permute(0, 2, 3, 1)

    def norm(t: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        return F.layer_norm(t, (C,), ln.weight, ln.bias, ln.eps)

    shortcut = cpe(x.permute(0, 2, 3, 1), block.cpe1.proj)
    y = norm(shortcut, block.norm1)
    attn_out = torch.zeros_like(y)
    for i in range(0, H, wh):
        for j in range(0, W, ww):
            tokens = y[:, i : i + wh, j : j + ww]  # slicing the unpadded map keeps only valid tokens
            h, w = tokens.shape[1:3]
            qkv = F.linear(tokens.reshape(B, h * w, C), block.attn.qkv.weight, block.attn.qkv.bias)
            q, k, v = qkv.reshape(B, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)
            o = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ v
            o = F.linear(o.transpose(1, 2).reshape(B, h * w, C), block.attn.proj.weight, block.attn.proj.bias)
            attn_out[:, i : i + wh, j : j + ww] = o.reshape(B, h, w, C)
    x = cpe(shortcut + attn_out, block.cpe2.proj)
    hidden = F.gelu(F.linear(norm(x, block.norm2), block.mlp.fc1.weight, block.mlp.fc1.bias))
    x = x + F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)
    return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize(("size", "window"), [((13, 17), 7), ((1, 1), 7), ((8, 15), 7), ((10, 9), (4, 6))], ids=str)
@torch.no_grad()
def test_spatial_block_masks_padded_keys(size: tuple[int, int], window: int | tuple[int, int]) -> None:
    mine, ref = _pair(SpatialBlock2d, timm_davit.SpatialBlock, window_size=window)
    x = _input(*size)
    out = mine(x)
    assert (out - ref(x)).abs().max() > 1e-3  # timm lets padded (zero) keys take attention weight
    assert (out - _spatial_block_reference(mine, x)).abs().max() <= 1e-5


@torch.no_grad()
def test_window_attention_ignores_masked_keys() -> None:
    torch.manual_seed(0)
    attn = WindowAttention(64, num_heads=2)
    x = torch.randn(6, 49, 64)
    valid = torch.rand(6, 49) < 0.6
    valid[:, 0] = True
    key_mask = valid[:, None, None, :]
    changed = torch.where(valid[..., None], x, torch.randn_like(x) * 10)
    out, out_changed = attn(x, key_mask), attn(changed, key_mask)
    torch.testing.assert_close(out_changed[valid], out[valid], rtol=1e-5, atol=1e-5)  # valid queries unaffected
    assert not torch.allclose(attn(changed)[valid], attn(x)[valid], atol=1e-3)


@pytest.mark.parametrize("name", ["dual", "davit_spatial", "davit_channel"])
def test_gradient_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    block = create_block(name, DIM, drop_path=0.1).train()
    x = _input(13, 17, batch=4)
    (block(x) * torch.randn_like(x)).sum().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_paper_defaults() -> None:
    block = create_block("dual", 192)
    spatial, channel = block[0], block[1]
    assert spatial.window_size == (7, 7)
    assert spatial.attn.num_heads == channel.attn.num_heads == 6  # head dim / group size 32
    assert spatial.mlp.fc1.out_features == channel.mlp.fc1.out_features == 4 * 192
    assert spatial.attn.qkv.bias is not None and channel.attn.qkv.bias is not None


def test_bad_heads_raise_clear_error() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        create_block("dual", 96, num_heads=5)
