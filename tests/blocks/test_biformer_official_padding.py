"""BiFormer's official padding (``pad_mode="official"`` / ``bra_pad_mode="official"``) against the official code.

The official code (rayleizhu/BiFormer, commit 1697bbb: ``ops/bra_legacy.py`` with ``auto_pad=True``,
``models/biformer.py``) is not needed here: its outputs and input gradients for seeded weights and inputs are stored
as compact summaries in ``tests/fixtures/biformer_official_padding.safetensors``, written by
``tests/fixtures/make_biformer_official_padding.py`` (provenance in ``tests/fixtures/README.md``). Weights are drawn
here from generators seeded by the state-dict key, independent of module construction order, init and the other keys
(so the ``features_only`` model draws the same weights as the full model).
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

import backbones  # noqa: F401  (registers the models)
from blocks import routing
from blocks.routing import BiLevelRoutingAttention

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "biformer_official_padding.safetensors"
BRA = dict(dim=64, num_heads=2, n_win=16, topk=4)
BRA_CASES = {"bra_25x42": (25, 42), "bra_32x42": (32, 42), "bra_25x48": (25, 48)}  # both / W only / H only padded
BACKBONE = dict(name="biformer_tiny", n_win=16, input_size=(2, 3, 100, 168))  # stage maps 25x42 13x21 7x11 4x6
SAMPLES = 256
# NOTE: fp32 "routed" runs the CPU flash autograd kernel, fp64 "routed" falls back to SDPA
KERNELS = [pytest.param(p, torch.float32, id=f"{p}-fp32") for p in ("routed", "masked_dense", "reference")]
KERNELS += [pytest.param(p, torch.float64, id=f"{p}-fp64") for p in ("routed", "reference")]


pytestmark = pytest.mark.usefixtures("one_thread")


def seeded_state(state: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Every float entry redrawn (norm weights ~1, biases ~0.1, BN variances in [0.5, 1.5], weights ~fan_in^-0.5)."""
    out = {}
    for key, t in state.items():
        name = re.sub(r"^stages_(\d+)\.", r"stages.\1.", key)  # NOTE: features_only flattens "stages.i"
        g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        if not t.is_floating_point():
            out[key] = t.clone()
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(t.shape, generator=g)
        elif key.endswith("running_mean") or (t.ndim == 1 and not key.endswith("weight")):
            out[key] = 0.1 * torch.randn(t.shape, generator=g)
        elif t.ndim == 1:
            out[key] = 1 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            out[key] = torch.randn(t.shape, generator=g) * t[0].numel() ** -0.5
    return out


def bra_module(pad_mode: str = "official", impl: str = "fast") -> BiLevelRoutingAttention:
    m = BiLevelRoutingAttention(**BRA, pad_mode=pad_mode, impl=impl)
    m.load_state_dict(seeded_state(m.state_dict(), 1))
    return m


def bra_inputs(size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Input and output cotangent of a BRA case, ``(2, H, W, 64)`` each."""
    g = torch.Generator().manual_seed(2)
    shape = (2, *size, BRA["dim"])
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def backbone(pad_mode: str = "official", **kwargs) -> nn.Module:
    """Seeded ``biformer_tiny`` with ``n_win=16``; the dense tasks build it with ``features_only=True``."""
    model = timm.create_model(BACKBONE["name"], n_win=BACKBONE["n_win"], bra_pad_mode=pad_mode, **kwargs).eval()
    model.load_state_dict(seeded_state(model.state_dict(), 1))
    return model


def backbone_inputs() -> tuple[Tensor, list[Tensor]]:
    """Input image and the cotangents of the four feature maps (stride 4 * 2**i, ceil)."""
    g = torch.Generator().manual_seed(2)
    B, _, H, W = BACKBONE["input_size"]
    shapes = [(B, 64 * 2**i, -(-H // 2 ** (i + 2)), -(-W // 2 ** (i + 2))) for i in range(4)]
    return torch.randn(BACKBONE["input_size"], generator=g), [torch.randn(s, generator=g) for s in shapes]


def summarize(t: Tensor, spatial: tuple[int, int], channel: int, seed: int) -> dict[str, Tensor]:
    """Row / column / channel sums and ``SAMPLES`` values at seeded flat indices (float64)."""
    t = t.detach().double()
    dims = set(range(t.ndim))
    idx = torch.randint(t.numel(), (SAMPLES,), generator=torch.Generator().manual_seed(seed))
    out = {name: t.sum(tuple(dims - {d})) for name, d in zip(("rows", "cols", "chans"), (*spatial, channel))}
    return dict(out, samples=t.flatten()[idx], checksum=torch.stack([t.sum(), t.abs().sum()]))


def run_bra(m: nn.Module, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Output and input gradient of a BRA (NHWC) for the seeded case ``size``."""
    x, gy = (t.to(dtype) for t in bra_inputs(size))
    x.requires_grad_()
    y = m.to(dtype)(x)
    return y, torch.autograd.grad(y, x, gy)[0]


def bra_summaries(y: Tensor, gx: Tensor) -> dict[str, Tensor]:
    out = {f"out.{k}": v for k, v in summarize(y, (1, 2), 3, 3).items()}
    return out | {f"grad_x.{k}": v for k, v in summarize(gx, (1, 2), 3, 4).items()}


def run_backbone(model: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[list[Tensor], Tensor]:
    """The four feature maps and the input gradient for the seeded image and cotangents."""
    x, cotangents = backbone_inputs()
    x = x.to(dtype).requires_grad_()
    features = model.to(dtype)(x)
    return features, torch.autograd.grad(features, x, [c.to(dtype) for c in cotangents])[0]


def backbone_summaries(features: list[Tensor], gx: Tensor) -> dict[str, Tensor]:
    out = {}
    for i, f in enumerate(features):
        out |= {f"stage{i}.{k}": v for k, v in summarize(f, (2, 3), 1, 10 + i).items()}
    return out | {f"grad_x.{k}": v for k, v in summarize(gx, (2, 3), 1, 20).items()}


def _fixture(prefix: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
    tensors = load_file(FIXTURE)
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}, meta


def _assert_matches(got: dict[str, Tensor], expected: dict[str, Tensor], tol: float) -> None:
    """Every summary within ``tol`` times its largest entry (padding errors move border sums by O(1) of it)."""
    assert set(got) == set(expected)
    for key in sorted(expected):
        ref = expected[key]
        torch.testing.assert_close(got[key], ref, rtol=0, atol=tol * ref.abs().max().item(), msg=key)


def test_fixture_provenance_and_seeded_inputs() -> None:
    _, meta = _fixture("bra_25x42")
    assert meta["commit"] == "1697bbbeafb8680524898f1dcaac10defd0604be"
    assert "ops/bra_legacy.py" in meta["files"] and "make_biformer_official_padding.py" in meta["command"]
    assert FIXTURE.stat().st_size < 300_000
    checksums = json.loads(meta["seed_checksums"])  # NOTE: fails first (and clearly) if torch's CPU RNG ever drifts
    x, _ = bra_inputs(BRA_CASES["bra_25x42"])
    assert abs(x.double().sum().item() - checksums["bra_25x42.x"]) < 1e-6
    weights = seeded_state(BiLevelRoutingAttention(**BRA).state_dict(), 1)
    assert abs(sum(v.double().sum().item() for v in weights.values()) - checksums["bra.weights"]) < 1e-6


@pytest.mark.parametrize(("path", "dtype"), KERNELS)
@pytest.mark.parametrize("case", list(BRA_CASES))
def test_official_mode_bra_matches_official_code(
    case: str, path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path != "reference":
        monkeypatch.setattr(routing, "use_masked_dense", lambda tokens, topk: path == "masked_dense")
    m = bra_module(impl="reference" if path == "reference" else "fast")
    expected, _ = _fixture(case)
    _assert_matches(
        bra_summaries(*run_bra(m, BRA_CASES[case], dtype)), expected, 1e-5 if dtype == torch.float32 else 1e-12
    )


def test_official_mode_backbone_matches_official_code() -> None:
    """``timm.create_model(..., features_only=True, n_win=16, bra_pad_mode="official")`` at 100 x 168, float64.

    float64 because routing decisions are discrete: among the ~4k top-k choices of the 12 BRA blocks the closest
    call is ~5e-7 of the logit range (fixture metadata), too close for fp32 rounding across machines.
    """
    model = backbone(features_only=True, out_indices=(0, 1, 2, 3))
    bras = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    assert len(bras) == 12 and all(m.pad_mode == "official" for m in bras)
    expected, _ = _fixture("backbone")
    _assert_matches(backbone_summaries(*run_backbone(model, torch.float64)), expected, 1e-10)


def test_mask_mode_differs_from_official_code() -> None:
    expected, _ = _fixture("bra_25x42")
    got = bra_summaries(*run_bra(bra_module(pad_mode="mask"), BRA_CASES["bra_25x42"]))
    assert (got["out.rows"][-1] - expected["out.rows"][-1]).abs() > 1e-2 * expected["out.rows"].abs().max()
    assert not torch.allclose(got["out.samples"], expected["out.samples"], atol=1e-3)


def test_pad_mode_survives_timm_export(tmp_path: Path) -> None:
    from runs.export import export_for_timm
    from tasks.backbone import backbone_from_features

    kwargs = dict(n_win=16, bra_pad_mode="official", embed_dims=(32, 64, 128, 256))
    features = timm.create_model("biformer_tiny", features_only=True, out_indices=(0, 1, 2, 3), **kwargs)
    full = backbone_from_features("biformer_tiny", features, **kwargs)
    export_for_timm(full, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"]["bra_pad_mode"] == "official" and config["model_args"]["n_win"] == 16
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    bras = [m for m in loaded.modules() if isinstance(m, BiLevelRoutingAttention)]
    assert bras and all(m.pad_mode == "official" and m.n_win == 16 for m in bras)


def test_bad_pad_mode_raises_value_error() -> None:
    with pytest.raises(ValueError, match="bra_pad_mode='auto' must be one of"):
        timm.create_model("biformer_tiny", bra_pad_mode="auto")
    with pytest.raises(ValueError, match="pad_mode='zeros' must be one of"):
        BiLevelRoutingAttention(64, pad_mode="zeros")
