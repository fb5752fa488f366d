"""Attention capture and pictures (visualization/): captured tensors reproduce the blocks' outputs, the routing
picture highlights exactly the model's top-k regions, capture off leaves outputs bit-identical, and every picture
is a valid PNG of the expected size."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import backbones  # noqa: F401  (registers the project's models)
from blocks.channel import EfficientChannelAttention, SqueezeExcite
from blocks.coordinate import CoordinateAttention
from blocks.dual import ChannelBlock, SpatialBlock
from blocks.routing import BiLevelRoutingAttention, region_grid, use_masked_dense
from visualization.attention_maps import (
    QUERY_COLOR,
    ROUTING_CAPTION_HEIGHT,
    render_attention_maps,
    render_routing,
    routing_zoom,
)
from visualization.capture import (
    AttentionCapture,
    ChannelGroupRecord,
    ChannelWeightsRecord,
    CoordinateGatesRecord,
    RoutingRecord,
    WindowRecord,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    assert image.format == "PNG"
    return image


def _noise_image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _pico(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("strata_hybrid_pico", **kwargs).eval()


def _hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_off_leaves_outputs_bit_identical() -> None:
    model = _pico(topk=4)
    untouched = copy.deepcopy(model)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        reference = untouched(x)
        with AttentionCapture(model) as capture:
            during = model(x)
        after = model(x)
    assert capture.records, "the demo model has capturable blocks"
    assert torch.equal(during, reference) and torch.equal(after, reference)
    assert _hooks_left(model) == 0
    assert all(m.capture is None for m in model.modules() if isinstance(m, BiLevelRoutingAttention))


def test_capture_records_every_block_of_the_demo_model() -> None:
    model = _pico(topk=4)
    with torch.no_grad(), AttentionCapture(model, index=1) as capture:
        model(torch.randn(2, 3, 128, 128))
    kinds = {type(r) for r in capture.records.values()}
    assert kinds == {CoordinateGatesRecord, RoutingRecord, WindowRecord, ChannelGroupRecord}
    routing = capture.of_type(RoutingRecord)[0]
    assert routing.idx.shape == (16, 4) and routing.size == (8, 8)  # 128 / 16 = 8 tokens, 4x4 regions of 2x2


def test_nested_capture_of_one_model_is_refused() -> None:
    model = _pico()
    with AttentionCapture(model), pytest.raises(ValueError, match="already being captured"):
        AttentionCapture(model).attach()


@pytest.mark.parametrize(
    ("h", "w", "n_win", "topk", "impl", "dense"),
    [
        (8, 8, 4, 4, "fast", True),  # masked dense kernel
        (7, 6, 4, 4, "fast", True),  # masked dense, padded
        (13, 11, 3, 2, "fast", False),  # routed kernel, padded
        (20, 20, 4, 2, "fast", False),
        (13, 11, 3, 2, "reference", False),
    ],
)
def test_bra_token_attention_reproduces_the_block(
    h: int, w: int, n_win: int, topk: int, impl: str, dense: bool
) -> None:
    """The captured routing yields attention weights whose weighted V is the block's own routed output."""
    torch.manual_seed(0)
    block = BiLevelRoutingAttention(32, num_heads=2, n_win=n_win, topk=topk, impl=impl).eval()
    rh, rw, nh, nw = region_grid(h, w, n_win)
    assert use_masked_dense(nh * rh * nw * rw, min(topk, nh * nw)) == dense
    seen = {}
    block.proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("proj_in", args[0]))
    block.lepe.register_forward_hook(lambda _m, _a, out: seen.__setitem__("lepe", out))
    block.router.register_forward_hook(lambda _m, _a, out: seen.__setitem__("idx", out))
    with torch.no_grad(), AttentionCapture(block, index=1) as capture:
        block(torch.randn(2, h, w, 32))
    record = capture.records[""]
    assert torch.equal(record.idx, seen["idx"][1])
    routed_out = seen["proj_in"][1] - seen["lepe"][1].permute(1, 2, 0)
    for row, col in [(0, 0), (h // 2, w // 3), (h - 1, w - 1)]:
        attn = record.token_attention(row, col)
        assert torch.allclose(attn.sum((1, 2)), torch.ones(2), atol=1e-5)
        outside = ~record.region_mask(record.routed_regions(record.region_of(row, col)))
        assert attn[:, outside].abs().max() == 0
        torch.testing.assert_close(record.token_output(row, col), routed_out[row, col], atol=1e-5, rtol=1e-4)


def test_routing_picture_highlights_exactly_the_routed_regions(tmp_path: Path) -> None:
    model = _pico(topk=4)
    image = _noise_image(128)
    attn = model.stages[2].blocks[0].attn
    seen = {}
    attn.router.register_forward_hook(lambda _m, _a, out: seen.__setitem__("idx", out[0].clone()))
    with torch.no_grad(), AttentionCapture(model) as capture:
        model(torch.randn(1, 3, 128, 128))
    record = capture.of_type(RoutingRecord)[0]
    query = (100.0, 37.0)
    path = render_routing(record, image, query, tmp_path / "routing.png")
    picture = np.asarray(_png(path).convert("RGB"))
    zoom = routing_zoom((128, 128))
    assert picture.shape == (128 * zoom + ROUTING_CAPTION_HEIGHT, 128 * zoom, 3)

    # independent geometry: token map 8x8, regions of rh x rw tokens, query token under pixel (100, 37)
    H, W = record.size
    rh, rw, _, nw = region_grid(H, W, attn.n_win)
    query_region = (37 * H // 128 // rh) * nw + (100 * W // 128) // rw
    routed = set(seen["idx"][query_region].tolist())
    assert len(routed) == 4
    area = picture[ROUTING_CAPTION_HEIGHT:]
    rows = np.arange(area.shape[0]) * H // area.shape[0]
    cols = np.arange(area.shape[1]) * W // area.shape[1]
    region = (rows[:, None] // rh) * nw + cols[None, :] // rw
    expected = np.isin(region, list(routed))
    drawn = area[..., 0] >= 140
    marks = np.all(area == np.array(QUERY_COLOR), axis=-1)  # the query outline and dot
    assert marks.any()
    assert np.array_equal(drawn[~marks], expected[~marks])


def test_window_attention_reproduces_the_block() -> None:
    torch.manual_seed(0)
    block = SpatialBlock(32, num_heads=2, window_size=4).eval()
    seen = {}
    block.attn.proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("proj_in", args[0]))
    H, W = 6, 7  # padded to 8x8: 4 windows per image
    with torch.no_grad(), AttentionCapture(block, index=1) as capture:
        block(torch.randn(2, H, W, 32))
    record = capture.records[""]
    for row, col in [(0, 0), (5, 6), (2, 5)]:
        attn = record.token_attention(row, col)
        assert torch.allclose(attn.sum((1, 2)), torch.ones(2), atol=1e-5)
        top, left, bottom, right = record.window_bounds(row, col)
        inside = torch.zeros(H, W, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert attn[:, ~inside].abs().max() == 0
        window = 4 + (row // 4) * 2 + col // 4  # image 1 comes after image 0's 4 windows
        expected = seen["proj_in"][window, (row % 4) * 4 + col % 4]
        torch.testing.assert_close(record.token_output(row, col), expected, atol=1e-5, rtol=1e-4)


def test_channel_group_matrices_reproduce_the_block() -> None:
    torch.manual_seed(0)
    block = ChannelBlock(64, num_heads=2).eval()
    seen = {}
    block.attn.qkv.register_forward_hook(lambda _m, _a, out: seen.__setitem__("qkv", out))
    block.attn.proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("proj_in", args[0]))
    with torch.no_grad(), AttentionCapture(block) as capture:
        block(torch.randn(1, 5, 6, 64))
    attn = capture.records[""].attn
    assert attn.shape == (2, 32, 32) and torch.allclose(attn.sum(-1), torch.ones(2, 32), atol=1e-5)
    q = seen["qkv"][0].view(30, 3, 2, 32)[:, 0].transpose(0, 1)  # (groups, N, d)
    torch.testing.assert_close((q @ attn.transpose(-1, -2)).transpose(0, 1).reshape(30, 64), seen["proj_in"][0])


def test_gates_and_channel_weights_reproduce_the_blocks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(CoordinateAttention(16), SqueezeExcite(16, reduction=4), EfficientChannelAttention(16)).eval()
    x = torch.randn(1, 16, 5, 7)
    with torch.no_grad(), AttentionCapture(model) as capture:
        y_ca = model[0](x)
        y_se = model[1](y_ca)
        y_eca = model[2](y_se)
    gates = capture.records["0"]
    assert gates.h_gate.shape == (16, 5) and gates.w_gate.shape == (16, 7)
    torch.testing.assert_close(y_ca[0], x[0] * gates.product())
    for name, before, after in (("1", y_ca, y_se), ("2", y_se, y_eca)):
        weights = capture.records[name].weights
        assert weights.shape == (16,)
        torch.testing.assert_close(after[0], before[0] * weights.view(16, 1, 1))
    assert [r.kind for r in capture.of_type(ChannelWeightsRecord)] == ["se", "eca"]


def test_attention_maps_of_the_demo_model_are_pngs_of_the_expected_size(tmp_path: Path) -> None:
    written = render_attention_maps(_pico(), _noise_image(64), tmp_path, MEAN, STD, query=(10, 50))
    sizes = {p.name: _png(p).size for p in written}
    zoom = routing_zoom((64, 64))
    # figures are figsize * 100 dpi: CA 2 blocks; BRA 3 heads; DaViT 6 heads (4 drawn), 6 groups in 2 rows of 4
    assert sizes == {
        "coordinate_attention.png": (840, 520),
        "routing_stages_2_blocks_0_attn.png": (64 * zoom, 64 * zoom + ROUTING_CAPTION_HEIGHT),
        "token_attention_stages_2_blocks_0_attn.png": (960, 270),
        "window_attention_stages_3_blocks_0_0.png": (1200, 270),
        "channel_groups_stages_3_blocks_0_1.png": (920, 540),
    }


def test_channel_weight_bars_for_se_and_eca(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), SqueezeExcite(16, reduction=4), EfficientChannelAttention(16))
    written = render_attention_maps(model, _noise_image(32), tmp_path, MEAN, STD)
    assert [p.name for p in written] == ["channel_weights.png"]
    assert _png(written[0]).size == (700, 290)  # 7.0 x (1.3 * 2 + 0.3) inches at 100 dpi


def test_bad_query_or_view_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="query"):
        render_attention_maps(_pico(), _noise_image(64), tmp_path, MEAN, STD, query=(64, 3))
    with pytest.raises(ValueError, match="views"):
        render_attention_maps(_pico(), _noise_image(64), tmp_path, MEAN, STD, views=["routing", "attention"])
