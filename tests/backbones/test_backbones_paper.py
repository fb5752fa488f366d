"""Backbones on the hierarchical assembler: BiFormer (arXiv 2303.08810), DaViT (arXiv 2204.03645), the hybrids.

Sizes are small: 64 x 64 inputs give stage maps 16/8/4/2, so BiFormer runs with ``n_win=2`` and DaViT with
``window_size=2`` where a test needs windows that divide every map (no padding); 67 x 93 checks odd sizes. Apart
from the parameter counts and the 224 comparison, the tiny models run at half width (same layout and code paths).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import _registry

import backbones
from backbones import biformer, dual_attention_vit
from tests.support.official_names import biformer_name_to_official

PARAMS = {
    "biformer_tiny": 13_142_760,
    "biformer_small": 25_536_232,
    "biformer_base": 56_804_968,
    "strata_davit_tiny": 28_360_168,
    "strata_davit_small": 49_745_896,
    "strata_davit_base": 87_954_408,
}
HYBRIDS = ["strata_hybrid_pico", "strata_hybrid_tiny", "strata_hybrid_small"]
TINY = ["biformer_tiny", "strata_davit_tiny", "strata_hybrid_pico"]
NARROW = dict(embed_dims=(32, 64, 128, 256))
SMALL = {
    "biformer": dict(NARROW, n_win=2),
    "strata_davit": dict(NARROW, num_heads=(1, 2, 4, 8), window_size=2),
    "davit": dict(NARROW, num_heads=(1, 2, 4, 8)),
    "strata_hybrid": dict(NARROW, n_win=2, window_size=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _create(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A small (half-width, small-window) instance of a registered model."""
    torch.manual_seed(seed)
    return timm.create_model(name, **{**SMALL[name.rsplit("_", 1)[0]], **kwargs})


def _image(*size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(PARAMS))
def test_exact_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list(PARAMS) + HYBRIDS)
def test_forward_backward_features_and_intermediates(name: str) -> None:
    model = _create(name).eval()
    x = _image(64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)
    final, inter = model.forward_intermediates(x, norm=True)
    assert torch.allclose(final, feats, atol=1e-6)
    assert [t.shape[-1] for t in inter] == [16, 8, 4, 2]
    assert torch.allclose(inter[-1], feats, atol=1e-6)  # the final norm applied to the last stage
    assert torch.allclose(inter[-1], final, atol=1e-6)

    fnet = _create(name, features_only=True).eval()  # same seed -> same weights
    assert fnet.feature_info.reduction() == [4, 8, 16, 32]
    assert fnet.feature_info.channels() == [f["num_chs"] for f in model.feature_info]
    outs = fnet(x)
    raw = model.forward_intermediates(x, intermediates_only=True)
    for out, ref, ch in zip(outs, raw, fnet.feature_info.channels()):
        assert out.shape[1] == ch
        assert torch.allclose(out, ref, atol=1e-6)

    model.train()
    logits = model(x)
    assert logits.shape == (2, 1000)
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_odd_input_size(name: str) -> None:
    model = _create(name, num_classes=7).eval()
    x = _image(67, 93, batch=1)
    assert model(x).shape == (1, 7)
    inter = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(t.shape[-2:]) for t in inter] == [(17, 24), (9, 12), (5, 6), (3, 3)]


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_pooled_features_and_reset_classifier(name: str) -> None:
    model = _create(name).eval()
    x = _image(64, 64)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, model.num_features) and model.head_hidden_size == model.num_features
    headless = _create(name, num_classes=0).eval()
    headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.")})
    assert torch.allclose(headless(x), pooled, atol=1e-6)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert torch.allclose(model(x), pooled, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_matches(name: str) -> None:
    model = _create(name, num_classes=10).train()
    x = _image(64, 64)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out0, g0), (out1, g1) = results
    assert torch.allclose(out0, out1, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g0, g1))


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_safetensors_pretrained_round_trip(name: str, tmp_path: Path) -> None:
    model = _create(name, num_classes=3).eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = _create(
        name, seed=1, num_classes=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=3)
    ).eval()
    x = _image(64, 64)
    assert torch.equal(loaded(x), model(x))


def _biformer_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our BiFormer keys renamed back to the official ``models/biformer.py`` names."""
    return {biformer_name_to_official(k): v for k, v in sd.items()}


def test_biformer_checkpoint_filter_loads_official_keys_strictly() -> None:
    model = _create("biformer_tiny")
    native = model.state_dict()
    assert biformer.checkpoint_filter_fn(native, model) is native
    official = _biformer_to_official(native)
    # a sample of the official names (rayleizhu/BiFormer models/biformer.py, ops/bra_legacy.py); 264 keys in all
    expected = {"downsample_layers.0.3.weight", "downsample_layers.2.1.running_var", "stages.0.1.attn.qkv.qkv.weight"}
    expected |= {"stages.2.7.attn.wo.bias", "stages.1.0.mlp.3.weight", "stages.3.1.attn.proj.weight"}
    expected |= {"stages.3.0.attn.lepe.weight", "stages.0.0.pos_embed.bias", "norm.num_batches_tracked", "head.weight"}
    assert expected <= set(official) and len(official) == 264
    fresh = _create("biformer_tiny", seed=3)
    fresh.load_state_dict(biformer.checkpoint_filter_fn({"model": official}, fresh), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), native.values()))


def test_davit_checkpoint_filter_loads_official_keys_strictly() -> None:
    model = _create("strata_davit_tiny")
    native = model.state_dict()
    assert dual_attention_vit.checkpoint_filter_fn(native, model) is native
    official = {}
    for k, v in native.items():  # dingmyu/davit names, as read in timm's davit.py conversion
        k = re.sub(r"^stem\.(conv|norm)\.", lambda m: f"patch_embeds.0.{'proj' if m[1] == 'conv' else 'norm'}.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.conv\.", r"patch_embeds.\1.proj.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.norm\.", r"patch_embeds.\1.norm.", k)
        k = (
            re.sub(r"^stages\.(\d)\.blocks\.", r"main_blocks.\1.", k)
            .replace(".cpe1.", ".cpe.0.")
            .replace(".cpe2.", ".cpe.1.")
        )
        official[k.replace("head.norm.", "norms.").replace("head.fc.", "head.")] = v
    assert {"patch_embeds.0.proj.weight", "main_blocks.2.1.0.cpe.1.proj.weight", "norms.bias", "head.weight"} <= set(
        official
    )
    fresh = _create("strata_davit_tiny", seed=3)
    fresh.load_state_dict(dual_attention_vit.checkpoint_filter_fn(official, fresh), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), native.values()))


def _timm_davit_pair(tmp_path: Path, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ref = timm.create_model("davit_tiny", **kwargs).eval()
    assert type(ref).__module__ == "timm.models.davit"
    with torch.no_grad():  # non-trivial norms and biases
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.rand_like(p) * 0.2)
    path = tmp_path / "davit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = timm.create_model(
        "strata_davit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
    )
    return ours.eval(), ref


@pytest.mark.parametrize(
    ("window", "size"),
    [(2, (64, 64)), (1, (67, 93))],  # windows divide every map: 16/8/4/2, and 17x24/9x12/5x6/3x3
    ids=["64x64-window2", "67x93-window1"],
)
@torch.no_grad()
def test_strata_davit_equals_timm_davit(tmp_path: Path, window: int, size: tuple[int, int]) -> None:
    ours, ref = _timm_davit_pair(tmp_path, window_size=window, **SMALL["davit"])
    x = _image(*size)
    assert (ours(x) - ref(x)).abs().max() <= 1e-4


@torch.no_grad()
def test_strata_davit_equals_timm_davit_at_224(tmp_path: Path) -> None:
    ours, ref = _timm_davit_pair(tmp_path)  # window 7: maps 56/28/14/7, no padding
    x = _image(224, 224, batch=1)
    assert (ours(x) - ref(x)).abs().max() <= 1e-4


def test_no_name_shadows_timm() -> None:
    timm_dir = Path(timm.models.__file__).parent
    timm_modules = {p.stem for p in timm_dir.glob("*.py") if not p.stem.startswith("_")}
    ours = {p.stem for p in Path(backbones.__file__).parent.glob("*.py") if p.stem != "__init__"}
    assert not ours & timm_modules
    our_models = {n for n, fn in _registry._model_entrypoints.items() if fn.__module__.startswith("backbones.")}
    assert set(PARAMS) | set(HYBRIDS) <= our_models
    timm_models = set().union(*(_registry._module_to_models.get(m, set()) for m in timm_modules))
    assert not our_models & timm_models
    assert all(_registry._model_to_module[n] in ours for n in our_models)


def test_group_matcher_covers_every_parameter() -> None:
    with torch.device("meta"):
        model = timm.create_model("strata_davit_tiny")
    groups = timm.models.group_parameters(model, model.group_matcher())
    group_of = {n: g for g, names in groups.items() for n in names}
    assert sorted(group_of) == sorted(n for n, _ in model.named_parameters())
    assert group_of["stem.conv.weight"] == min(groups) and group_of["head.fc.weight"] == max(groups)
    assert group_of["stages.0.blocks.0.0.attn.qkv.weight"] < group_of["stages.1.downsample.conv.weight"]
    assert group_of["stages.2.blocks.0.0.attn.qkv.weight"] < group_of["stages.2.blocks.1.0.attn.qkv.weight"]


def test_bad_block_kwargs_length_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="block_kwargs has 2 entries"):
        timm.create_model("strata_davit_tiny", num_heads=(3, 6))


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_stop_early_and_prune_intermediate_layers(name: str) -> None:
    model = _create(name).eval()
    x = _image(64, 64)
    full = model.forward_intermediates(x, intermediates_only=True)
    early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(early, full[:2]))
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(model.stages) == 2 and model.num_features == model.feature_info[1]["num_chs"]
    assert torch.allclose(model(x), full[1], atol=1e-6)  # as timm: the pruned head neither pools nor classifies
