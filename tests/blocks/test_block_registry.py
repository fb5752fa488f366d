"""The block registry's contract: declared keyword arguments, kinds, checks, plugin failures and MAC counting."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import blocks
from blocks import factory
from blocks.dual import ChannelBlock, SpatialBlock
from blocks.routing import BiFormerBlock, BiLevelRoutingAttention
from core.model_cost import count_macs


def _named(fn) -> set[str]:
    return {p.name for p in list(inspect.signature(fn).parameters.values())[1:] if p.kind is not p.VAR_KEYWORD}


def test_forwarded_kwargs_are_those_of_the_declared_targets() -> None:
    assert set(blocks.block_spec("bra").parameters()) == _named(BiFormerBlock)
    assert set(blocks.block_spec("dual").parameters()) == _named(SpatialBlock) | _named(ChannelBlock)
    assert set(blocks.block_spec("se").parameters()) == {"reduction", "rd_channels"}


def test_every_registered_block_declares_its_kwargs_and_a_kind() -> None:
    for name in blocks.list_blocks():
        spec = blocks.block_spec(name)
        assert spec.kind in factory.BLOCK_KINDS
        assert spec.parameters() is not None, f"{name} forwards **kwargs without accepts="
        if spec.kind == "block":
            assert "drop_path" in spec.parameters(), name


def test_the_kinds_split_gates_from_stage_blocks() -> None:
    assert set(blocks.list_blocks("attention")) >= {"se", "eca", "ca"}
    assert {"mbconv", "bra", "dual"} <= set(blocks.list_blocks("block"))
    assert not set(blocks.list_blocks("attention")) & set(blocks.list_blocks("block"))


@pytest.mark.parametrize(
    ("name", "dim", "kwargs", "expected"),
    [
        ("bra", 64, {"topkk": 4}, "block 'bra' takes no argument 'topkk' (closest: topk)"),
        ("dual", 48, {"num_heads": 5}, "width 48 is not divisible by num_heads=5"),
        ("mbconv", 32, {"attn": "sx"}, "mbconv attn: unknown block 'sx'"),
        ("mbconv", 32, {"attn": "se", "attn_kwargs": {"ratio": 4}}, "mbconv attn_kwargs: block 'se' takes no"),
    ],
)
def test_check_block_kwargs_names_the_problem(name: str, dim: int, kwargs: dict, expected: str) -> None:
    problems = blocks.check_block_kwargs(name, dim, kwargs)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize(("name", "dim", "kwargs"), [("bra", 64, {"topk": 2}), ("dual", 48, {"num_heads": 3})])
def test_kwargs_that_pass_the_check_build(name: str, dim: int, kwargs: dict) -> None:
    assert blocks.check_block_kwargs(name, dim, kwargs) == []
    assert blocks.create_block(name, dim, **kwargs)(torch.randn(1, dim, 5, 3)).shape == (1, dim, 5, 3)


class _BrokenPoint:
    name, value, dist = "broken", "broken_pkg:thing", None

    def load(self) -> None:
        raise ImportError("No module named 'torch_scatter'")


def test_a_failing_plugin_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "_plugins_loaded", False)
    monkeypatch.setattr(
        factory, "entry_points", lambda group: [_BrokenPoint()] if group == factory.PLUGIN_GROUP else []
    )
    with pytest.raises(blocks.BlockPluginError) as info:
        blocks.list_blocks()
    message = str(info.value)
    assert "block plugin 'broken'" in message and "torch_scatter" in message and "\n" not in message


class _Doubling(nn.Module):
    """A module that multiplies twice as much outside ``mac_counting``: the count must see the counting path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        self.counting = False

    @contextlib.contextmanager
    def mac_counting(self) -> Iterator[None]:
        self.counting = True
        try:
            yield
        finally:
            self.counting = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).mean(-1)
        return self.fc(x) if self.counting else self.fc(self.fc(x))


def test_count_macs_runs_each_module_inside_its_mac_counting() -> None:
    module = _Doubling()
    assert count_macs(module, 3, in_chans=4) == 16 and not module.counting


def test_routing_attention_is_counted_with_its_gather_kernel() -> None:
    attn = BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=1)
    with attn.mac_counting():
        assert attn.impl == "reference"
    assert attn.impl == "fast"
