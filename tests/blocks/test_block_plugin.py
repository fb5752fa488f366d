"""The ``strata.blocks`` plugin route end to end, with the FLatten block plugin in ``tests/plugins``.

(a) The plugin package is pip-installed into a temporary folder and a fresh interpreter with that folder on
``PYTHONPATH`` finds its block through the entry point, builds it and composes it into a backbone.
(b) The plugin's Focused Linear Attention is checked against a direct quadratic-form computation of the paper's
formula (Han et al., ICCV 2023, arXiv 2308.00442).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from blocks import factory

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "tests" / "plugins" / "strata_focused_linear"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin pip-installed (from a copy, so the source tree gets no build/ or egg-info) into a temp folder."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    pip += ["--disable-pip-version-check", "--target", str(target), str(source)]
    result = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pip install failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return target


def _run_with_plugin(site: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_installed_plugin_registers_and_composes(installed_plugin: Path) -> None:
    result = _run_with_plugin(
        installed_plugin,
        """
        import timm, torch
        import blocks, backbones
        torch.manual_seed(0)
        assert "focused_linear" in blocks.list_blocks(), blocks.list_blocks()
        assert "focused_linear" in blocks.list_blocks("block")
        spec = blocks.block_spec("focused_linear")
        assert spec.source == "strata-focused-linear", spec.source
        block = blocks.create_block("focused_linear", 64, num_heads=2).eval()
        with torch.no_grad():
            y = block(torch.randn(2, 64, 7, 5))
        assert y.shape == (2, 64, 7, 5), y.shape
        problems = blocks.check_block_kwargs("focused_linear", 64, {"focusing": 3})
        assert len(problems) == 1 and "'focusing'" in problems[0] and "focusing_factor" in problems[0], problems
        assert blocks.check_block_kwargs("focused_linear", 64, {"num_heads": 2, "focusing_factor": 2}) == []
        model = timm.create_model(
            "composed_backbone",
            depths=[1, 1, 1, 1],
            embed_dims=[16, 32, 64, 64],
            block=["mbconv", "mbconv", "focused_linear", "dual"],
            block_kwargs=[{}, {}, {"num_heads": 2}, {"window_size": 2}],
            num_classes=3,
        ).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64))
        assert out.shape == (1, 3), out.shape
        print("plugin ok")
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plugin ok" in result.stdout


def test_install_leaves_the_source_tree_clean(installed_plugin: Path) -> None:
    assert (installed_plugin / "strata_focused_linear" / "__init__.py").is_file()
    leftovers = [p.name for p in PLUGIN.iterdir() if p.name == "build" or p.name.endswith(".egg-info")]
    assert leftovers == []


@pytest.fixture(scope="module")
def plugin() -> Iterator[ModuleType]:
    """The plugin module imported by file path; the block it registers here is removed again afterwards."""
    before = set(factory._BLOCKS)
    spec = importlib.util.spec_from_file_location(
        "_strata_focused_linear_under_test", PLUGIN / "strata_focused_linear" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for key in set(factory._BLOCKS) - before:
        del factory._BLOCKS[key]


def _focus(x: torch.Tensor, p: float) -> torch.Tensor:
    """f_p(x) = ||r|| / ||r^p|| r^p, r = ReLU(x) + 1e-6, written out plainly."""
    r = torch.relu(x) + 1e-6
    return r.norm(dim=-1, keepdim=True) / (r**p).norm(dim=-1, keepdim=True) * r**p


def _reference(attn: torch.nn.Module, x: torch.Tensor, with_dwc: bool = True) -> torch.Tensor:
    """The paper's formula computed head by head in its quadratic form: O_i = sum_j (q_i.k_j) v_j / sum_j q_i.k_j."""
    B, H, W, C = x.shape
    h, d = attn.num_heads, C // attn.num_heads
    tokens = x.reshape(B, H * W, C)
    wq, wk, wv = attn.qkv.weight.chunk(3, dim=0)
    bq, bk, bv = attn.qkv.bias.chunk(3, dim=0)
    scale = F.softplus(attn.scale)
    q = (tokens @ wq.T + bq) / scale
    k = (tokens @ wk.T + bk) / scale
    v = tokens @ wv.T + bv
    heads = []
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        fq, fk, vh = _focus(q[..., sl], attn.focusing_factor), _focus(k[..., sl], attn.focusing_factor), v[..., sl]
        similarity = torch.einsum("bnd,bmd->bnm", fq, fk)
        out = torch.einsum("bnm,bmd->bnd", similarity, vh) / similarity.sum(dim=-1, keepdim=True)
        if with_dwc:
            v_map = vh.transpose(1, 2).reshape(B, d, H, W)
            conv = F.conv2d(v_map, attn.dwc.weight, attn.dwc.bias, padding=attn.dwc.padding, groups=d)
            out = out + conv.reshape(B, d, H * W).transpose(1, 2)
        heads.append(out)
    out = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    return out.reshape(B, H, W, C)


def _randomized_attention(plugin: ModuleType, dim: int = 64, num_heads: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    attn = plugin.FocusedLinearAttention(dim, num_heads=num_heads)
    with torch.no_grad():
        attn.scale.normal_(0.0, 0.5)  # a non-uniform per-channel scale, so the test sees it
        attn.dwc.bias.normal_()
    return attn


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_attention_matches_the_formula(plugin: ModuleType, dtype: torch.dtype, tol: float) -> None:
    attn = _randomized_attention(plugin).to(dtype)
    x = torch.randn(2, 6, 5, 64, dtype=dtype)
    with torch.no_grad():
        got = attn(x)
        want = _reference(attn.double(), x.double()).to(dtype)
    assert got.shape == x.shape
    diff = (got - want).abs().max().item()
    assert diff < tol, diff


def test_zero_dwc_is_plain_normalized_linear_attention(plugin: ModuleType) -> None:
    attn = _randomized_attention(plugin, dim=32, num_heads=4).double()
    with torch.no_grad():
        attn.dwc.weight.zero_()
        attn.dwc.bias.zero_()
    x = torch.randn(1, 4, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        got = attn(x)
        want = _reference(attn, x, with_dwc=False)
    assert (got - want).abs().max().item() < 1e-10


def test_default_heads_and_validation(plugin: ModuleType) -> None:
    assert plugin.FocusedLinearAttention(16).num_heads == 1
    assert plugin.FocusedLinearAttention(128).num_heads == 4
    with pytest.raises(ValueError, match="divisible"):
        plugin.FocusedLinearAttention(64, num_heads=3)
    with pytest.raises(ValueError, match="odd"):
        plugin.FocusedLinearAttention(64, kernel_size=4)
    assert plugin._check(100, {}) is not None  # default heads 100 // 32 = 3 do not divide 100
    assert plugin._check(64, {"kernel_size": 4}) is not None
    assert plugin._check(64, {"num_heads": 2}) is None


def test_gradient_reaches_every_parameter(plugin: ModuleType) -> None:
    torch.manual_seed(0)
    block = plugin.FLattenBlock(32, num_heads=2)
    block(torch.randn(2, 32, 5, 6)).square().mean().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [(1, 1), (3, 7)])
def test_block_keeps_shape_with_drop_path(plugin: ModuleType, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    block = plugin.FLattenBlock(32, drop_path=0.2, kernel_size=5)
    x = torch.randn(2, 32, *size)
    block.train()
    assert block(x).shape == x.shape
    block.eval()
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
