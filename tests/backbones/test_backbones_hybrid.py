"""The project's hybrids: conv + coordinate attention early, routing then dual attention late.

The generic timm-API checks run on them in ``test_backbones_paper.py``; this file checks what makes them hybrids.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models._efficientnet_blocks import InvertedResidual

import backbones  # noqa: F401  (registers the models)
from blocks import create_block
from blocks.coordinate import CoordinateAttention
from blocks.dual import DualAttentionBlock
from blocks.routing import BiFormerBlock, BiLevelRoutingAttention


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["strata_hybrid_pico", "strata_hybrid_tiny", "strata_hybrid_small"])
def test_stage_block_types(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    for i in (0, 1):
        for block in model.stages[i].blocks:
            assert isinstance(block, InvertedResidual) and isinstance(block.se, CoordinateAttention)
            assert block.has_skip
    assert all(
        isinstance(b, BiFormerBlock) and isinstance(b.attn, BiLevelRoutingAttention) for b in model.stages[2].blocks
    )
    assert all(isinstance(b, DualAttentionBlock) for b in model.stages[3].blocks)


@pytest.mark.parametrize(
    ("name", "reference"), [("strata_hybrid_tiny", "biformer_tiny"), ("strata_hybrid_small", "biformer_small")]
)
def test_parameter_budget_matches_biformer(name: str, reference: str) -> None:
    with torch.device("meta"):
        ours, ref = timm.create_model(name), timm.create_model(reference)
    assert abs(_n_params(ours) / _n_params(ref) - 1) < 0.03


def test_mbconv_puts_attention_after_the_depthwise_conv() -> None:
    torch.manual_seed(0)
    block = create_block("mbconv", 32, expand_ratio=4, attn="ca").eval()
    plain = create_block("mbconv", 32, expand_ratio=4, attn=None).eval()
    assert _n_params(block) == _n_params(plain) + _n_params(CoordinateAttention(128))
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("se.")})
    x = torch.randn(2, 32, 9, 11)
    seen = {}
    block.se.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    with torch.no_grad():
        y = block(x)
        hidden = plain.bn2(plain.conv_dw(plain.bn1(plain.conv_pw(x))))
        torch.testing.assert_close(seen["inp"], hidden)
        expected = x + plain.bn3(plain.conv_pwl(seen["out"]))
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, plain(x))  # the attention changes the output


def test_dense_task_kwargs_reach_the_attention_stages() -> None:
    with torch.device("meta"):
        model = timm.create_model("strata_hybrid_tiny", n_win=16, topk=8, window_size=12)
    attn = model.stages[2].blocks[0].attn
    assert (attn.n_win, attn.topk) == (16, 8)
    assert model.stages[3].blocks[0][0].window_size == (12, 12)  # the spatial half of the dual block
