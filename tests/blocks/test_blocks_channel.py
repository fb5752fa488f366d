"""SE, ECA and coordinate attention against their papers' formulas, recomputed here from the modules' own weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocks import create_block
from blocks.channel import EfficientChannelAttention, SqueezeExcite, eca_kernel_size
from blocks.coordinate import CoordinateAttention


def _randomize_(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)


@pytest.mark.parametrize(("channels", "k"), [(64, 3), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_adaptive_kernel_size(channels: int, k: int) -> None:
    assert eca_kernel_size(channels) == k
    eca = create_block("eca", channels)
    assert eca.conv.kernel_size == (k,)
    assert eca.conv.padding == ((k - 1) // 2,)
    assert eca.conv.bias is None


def test_eca_fixed_kernel_size_honoured() -> None:
    eca = create_block("eca", 2048, kernel_size=3)
    assert eca.conv.kernel_size == (3,)
    assert sum(p.numel() for p in eca.parameters()) == 3
    with pytest.raises(ValueError, match="kernel_size"):
        EfficientChannelAttention(64, kernel_size=4)


def test_eca_equals_formula() -> None:
    eca = EfficientChannelAttention(256)
    _randomize_(eca)
    x = torch.randn(2, 256, 5, 6)
    w = eca.conv.weight  # (1, 1, k)
    k = w.shape[-1]
    pooled = F.pad(x.mean((2, 3)), ((k - 1) // 2, (k - 1) // 2))  # (B, C + k - 1)
    logits = torch.stack([(pooled[:, c : c + k] * w[0, 0]).sum(-1) for c in range(256)], dim=1)
    expected = x * logits.sigmoid()[:, :, None, None]
    torch.testing.assert_close(eca(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("channels", "hidden"), [(64, 4), (256, 16), (8, 1)])
def test_se_equals_formula(channels: int, hidden: int) -> None:
    se = SqueezeExcite(channels)
    assert se.fc1.out_channels == hidden  # SENet's C // 16, not rounded to a multiple of 8
    _randomize_(se)
    x = torch.randn(2, channels, 5, 7)
    z = x.mean((2, 3))
    s = torch.sigmoid(
        F.linear(torch.relu(F.linear(z, se.fc1.weight.flatten(1), se.fc1.bias)), se.fc2.weight.flatten(1), se.fc2.bias)
    )
    torch.testing.assert_close(se(x), x * s[:, :, None, None], rtol=1e-5, atol=1e-6)


def _coordinate_attention_reference(m: CoordinateAttention, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode formula of Hou et al. (official coordatt.py), written out from the module's weights."""
    H = x.shape[2]
    z = torch.cat([x.mean(3), x.mean(2)], dim=2)  # (B, C, H + W): pooled along W, then along H
    f = torch.einsum("mc,bcl->bml", m.conv1.weight.flatten(1), z) + m.conv1.bias[:, None]
    bn = m.bn1
    f = (f - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps) * bn.weight[:, None]
    f = f + bn.bias[:, None]
    f = f * torch.clamp(f + 3, 0, 6) / 6
    f_h, f_w = f[:, :, :H], f[:, :, H:]
    a_h = torch.sigmoid(torch.einsum("cm,bml->bcl", m.conv_h.weight.flatten(1), f_h) + m.conv_h.bias[:, None])
    a_w = torch.sigmoid(torch.einsum("cm,bml->bcl", m.conv_w.weight.flatten(1), f_w) + m.conv_w.bias[:, None])
    return x * a_w[:, :, None, :] * a_h[:, :, :, None]


@pytest.mark.parametrize("size", [(6, 9), (1, 1), (13, 4)])
def test_coordinate_attention_equals_formula(size: tuple[int, int]) -> None:
    ca = create_block("ca", 48).eval()
    _randomize_(ca)
    x = torch.randn(2, 48, *size)
    torch.testing.assert_close(ca(x), _coordinate_attention_reference(ca, x), rtol=1e-5, atol=1e-5)


def test_coordinate_attention_parameter_count_and_names() -> None:
    ca = CoordinateAttention(96)
    assert sum(p.numel() for p in ca.parameters()) == 2520
    expected = {f"{m}.{t}" for m in ("conv1", "conv_h", "conv_w") for t in ("weight", "bias")}
    expected |= {f"bn1.{t}" for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(ca.state_dict()) == expected  # the official CoordAtt's keys


@pytest.mark.parametrize(("channels", "mid"), [(16, 8), (96, 8), (256, 8), (512, 16), (1024, 32)])
def test_coordinate_attention_mid_channels(channels: int, mid: int) -> None:
    ca = CoordinateAttention(channels)
    assert ca.conv1.out_channels == ca.bn1.num_features == ca.conv_h.in_channels == ca.conv_w.in_channels == mid
