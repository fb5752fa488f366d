"""The attention plug-in backbones (CA-MobileNetV2, ECA / CA ResNet-50) and ``scripts/inspect_models.py``.

Parameter counts and block placement are checked against the official code's structure; the timm API (features,
intermediates, classifier reset, checkpointing, pretrained loading) on small inputs.
"""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.resnet import Bottleneck, ResNet

import backbones  # noqa: F401  (registers the models)
from backbones import attention_resnets, mobilenetv2_ca
from blocks.channel import EfficientChannelAttention, SqueezeExcite
from blocks.coordinate import CoordinateAttention
from tests.support.scripts import load_script

inspect_models = load_script("inspect_models")

MODELS = ["mobilenetv2_100_ca", "strata_resnet50_ca", "resnet50_eca_k3557"]
NUM_CLASSES = 7


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs.setdefault("num_classes", NUM_CLASSES)
    return timm.create_model(name, drop_rate=0.0, **kwargs)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ca_params(channels: int) -> int:
    mid = max(8, channels // 32)
    return (channels * mid + mid) + 2 * mid + 2 * (mid * channels + channels)


@pytest.mark.parametrize("name", MODELS)
def test_registered_not_shadowing_timm(name: str) -> None:
    assert timm.models.model_entrypoint(name).__module__.startswith("backbones.")
    assert timm.models.get_pretrained_cfg(name).first_conv in ("conv1", "conv_stem")


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str) -> None:
    model = _create(name).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [(64, 64), (67, 45)])
def test_features_only_match_feature_info(name: str, size: tuple[int, int]) -> None:
    model = _create(name, features_only=True).eval()
    info = model.feature_info
    assert info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    for f, chs, red in zip(feats, info.channels(), info.reduction(), strict=True):
        assert f.shape == (1, chs, math.ceil(size[0] / red), math.ceil(size[1] / red))


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_equal_forward_features(name: str) -> None:
    model = _create(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        features = model.forward_features(x)
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    assert [t.shape[1] for t in intermediates] == [f["num_chs"] for f in model.feature_info]
    assert [64 // t.shape[-1] for t in intermediates] == [f["reduction"] for f in model.feature_info]


@pytest.mark.parametrize("name", MODELS)
def test_features_getter_equals_intermediates(name: str) -> None:
    # feature_cls='getter' wraps the full model around forward_intermediates (the path timm's own tests use)
    getter = _create(name, features_only=True, feature_cls="getter").eval()
    model = _create(name).eval()
    missing, unexpected = model.load_state_dict(getter.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("conv_head", "bn2", "classifier", "fc")) for k in missing)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(getter(x), model.forward_intermediates(x, intermediates_only=True), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_odd_input_pooled_features_and_reset_classifier(name: str) -> None:
    model = _create(name, num_classes=0).eval()
    x = torch.randn(2, 3, 67, 45)
    with torch.no_grad():
        pooled = model(x)
        assert pooled.shape == (2, model.num_features)
        torch.testing.assert_close(pooled, model.forward_head(model.forward_features(x), pre_logits=True))
        model.reset_classifier(5)
        assert model.get_classifier().out_features == 5
        assert model(x).shape == (2, 5)


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_equal(name: str) -> None:
    model = _create(name).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    ref = model(x)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    model.set_grad_checkpointing(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("name", MODELS)
def test_safetensors_pretrained_round_trip(name: str, tmp_path) -> None:
    model = _create(name, num_classes=5).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a load that skips buffers would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5), num_classes=5
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _record_calls(parent: torch.nn.Module, names: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Hook ``parent``'s sub-modules ``names``: the returned dict fills, in call order, with ``name -> (input,
    output)`` of each one's first call, copied before any in-place op downstream can change them."""
    calls: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            calls.setdefault(name, (inputs[0].clone(), output.clone()))

        return record

    for name in names:
        parent.get_submodule(name).register_forward_hook(hook(name))
    return calls


def test_mobilenetv2_ca_parameter_count() -> None:
    # official mbv2_ca.py (houqb/CoordAttention) at 1000 classes; timm's mobilenetv2_100 is the plain baseline
    model = timm.create_model("mobilenetv2_100_ca")
    assert _n_params(model) == 3_950_648
    base = _n_params(timm.create_model("mobilenetv2_100"))
    assert base == 3_504_872
    mids = [b.conv_pwl.in_channels for stage in model.blocks for b in stage if isinstance(b, InvertedResidual)]
    assert base + sum(_ca_params(c) for c in mids) == 3_950_648
    assert model.drop_rate == 0.1  # official head: Dropout(0.1) -> Linear(1280, classes)
    assert model.num_features == 1280


def test_mobilenetv2_ca_placement() -> None:
    model = _create("mobilenetv2_100_ca").eval()
    blocks = [b for stage in model.blocks for b in stage]
    expanding = [b for b in blocks if isinstance(b, InvertedResidual)]
    assert len(expanding) == 16 and all(b.conv_pw.out_channels == 6 * b.conv_pw.in_channels for b in expanding)
    assert all(isinstance(b, DepthwiseSeparableConv) and isinstance(b.se, torch.nn.Identity) for b in blocks[:1])
    cas = [m for m in model.modules() if isinstance(m, CoordinateAttention)]
    assert len(cas) == len(expanding) and all(b.se in cas for b in expanding)
    for block in (expanding[0], expanding[-1]):
        calls = _record_calls(block, ("conv_pw", "conv_dw", "bn2", "se", "conv_pwl"))
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        assert list(calls) == ["conv_pw", "conv_dw", "bn2", "se", "conv_pwl"]
        assert torch.equal(
            calls["se"][0], calls["bn2"][1]
        )  # on the expanded channels, right after the depthwise conv's BN-ReLU6
        assert block.se.conv1.in_channels == block.conv_dw.out_channels


def _official_mbv2_ca_state_dict() -> dict[str, torch.Tensor]:
    """Keys and shapes of the official ``mbv2_ca.py`` MBV2_CA(1000) model, with distinct random values."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> None:
        shapes[f"{prefix}.weight"] = (cout, cin // groups, k, k)
        bn = prefix.rsplit(".", 1)[0] + f".{int(prefix.rsplit('.', 1)[1]) + 1}"
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{leaf}"] = (cout,)
        shapes[f"{bn}.num_batches_tracked"] = ()

    conv_bn("features.0.0", 3, 32, 3)
    cin, idx = 32, 1
    official_cfgs = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]  # t, c, n
    for t, c, n in official_cfgs:
        for _ in range(n):
            p, hid = f"features.{idx}.conv", cin * t
            if t == 1:
                conv_bn(f"{p}.0", hid, hid, 3, groups=hid)
                conv_bn(f"{p}.3", hid, c, 1)
            else:
                conv_bn(f"{p}.0", cin, hid, 1)
                conv_bn(f"{p}.3", hid, hid, 3, groups=hid)
                mip = max(8, hid // 32)
                shapes |= {f"{p}.6.conv1.weight": (mip, hid, 1, 1), f"{p}.6.conv1.bias": (mip,)}
                shapes |= {f"{p}.6.bn1.{leaf}": (mip,) for leaf in ("weight", "bias", "running_mean", "running_var")}
                shapes[f"{p}.6.bn1.num_batches_tracked"] = ()
                for conv in ("conv2", "conv3"):
                    shapes |= {f"{p}.6.{conv}.weight": (hid, mip, 1, 1), f"{p}.6.{conv}.bias": (hid,)}
                conv_bn(f"{p}.7", hid, c, 1)
            cin, idx = c, idx + 1
    conv_bn("conv.0", 320, 1280, 1)
    shapes |= {"classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)}
    g = torch.Generator().manual_seed(0)
    return {
        "module." + k: torch.randn(s, generator=g) if s else torch.tensor(3, dtype=torch.long)
        for k, s in shapes.items()
    }


def test_mobilenetv2_ca_checkpoint_filter_maps_official_keys_strictly() -> None:
    official = _official_mbv2_ca_state_dict()
    model = timm.create_model("mobilenetv2_100_ca")
    mapped = mobilenetv2_ca.checkpoint_filter_fn(official, model)
    model.load_state_dict(mapped, strict=True)  # every key present, every shape right
    sd = model.state_dict()
    expected = {
        "features.0.0.weight": "conv_stem.weight",
        "features.1.conv.3.weight": "blocks.0.0.conv_pw.weight",
        "features.2.conv.3.weight": "blocks.1.0.conv_dw.weight",
        "features.2.conv.6.conv2.weight": "blocks.1.0.se.conv_h.weight",  # conv2 acts on the H-pooled branch
        "features.2.conv.6.conv3.weight": "blocks.1.0.se.conv_w.weight",
        "features.17.conv.8.running_var": "blocks.6.0.bn3.running_var",
        "conv.1.weight": "bn2.weight",
        "classifier.1.weight": "classifier.weight",
    }
    for official_key, key in expected.items():
        assert torch.equal(sd[key], official["module." + official_key]), official_key
    assert set(mobilenetv2_ca.checkpoint_filter_fn(sd, model)) == set(sd)  # native keys pass through
    with pytest.raises(ValueError, match="state_dict key"):
        mobilenetv2_ca.checkpoint_filter_fn(
            {"features.0.0.weight": sd["conv_stem.weight"], "head.w": sd["bn1.bias"]}, model
        )


def test_resnet_parameter_counts() -> None:
    base = _n_params(timm.create_model("resnet50"))
    eca = timm.create_model("resnet50_eca_k3557")
    assert _n_params(eca) == base + 3 * 3 + 4 * 5 + 6 * 5 + 3 * 7  # the only additions: one k-tap conv per block
    assert [layer[0].se.conv.kernel_size[0] for layer in (eca.layer1, eca.layer2, eca.layer3, eca.layer4)] == [
        3,
        5,
        5,
        7,
    ]
    assert eca.conv1.kernel_size == (7, 7)  # plain ResNet-50 stem, not -D
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert _n_params(timm.create_model("strata_resnet50_ca")) == base + sum(_ca_params(c) for c in widths)
    # SENet's SE-ResNet-50 (r = 16, C // 16) is exactly timm's seresnet50, which is why it is not re-registered
    se = ResNet(block=Bottleneck, layers=(3, 4, 6, 3), block_args=dict(attn_layer=lambda c, **_: SqueezeExcite(c)))
    assert _n_params(se) == _n_params(timm.create_model("seresnet50")) == 28_088_024


@pytest.mark.parametrize(
    ("name", "attn"), [("strata_resnet50_ca", CoordinateAttention), ("resnet50_eca_k3557", EfficientChannelAttention)]
)
def test_resnet_attention_after_bn3_before_residual(name: str, attn: type) -> None:
    model = _create(name).eval()
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16 and all(isinstance(b.se, attn) for b in blocks)
    block = model.layer2[0]
    calls = _record_calls(block, ("conv3", "bn3", "se", "downsample", "act3"))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert list(calls) == ["conv3", "bn3", "se", "downsample", "act3"]
    assert torch.equal(calls["se"][0], calls["bn3"][1])
    torch.testing.assert_close(calls["act3"][1], torch.relu(calls["se"][1] + calls["downsample"][1]))


def test_eca_checkpoint_filter_maps_official_keys_strictly() -> None:
    # official ECA-Net names are torchvision's ResNet names plus ``layerX.Y.eca.conv.weight``
    g = torch.Generator().manual_seed(0)
    official = {
        f"module.{k}": torch.randn(v.shape, generator=g) for k, v in timm.create_model("resnet50").state_dict().items()
    }
    for stage, (n, k) in enumerate(zip((3, 4, 6, 3), (3, 5, 5, 7)), start=1):
        for i in range(n):
            official[f"module.layer{stage}.{i}.eca.conv.weight"] = torch.randn(1, 1, k, generator=g)
    model = timm.create_model("resnet50_eca_k3557")
    model.load_state_dict(attention_resnets.checkpoint_filter_fn(official, model), strict=True)
    assert torch.equal(model.layer4[2].se.conv.weight, official["module.layer4.2.eca.conv.weight"])


def test_stage_kernel_eca_rejects_unknown_width() -> None:
    with pytest.raises(ValueError, match="kernel_sizes"):
        attention_resnets.eca_stage_layer(128, attention_resnets.ECA_K3557)


def test_inspect_list_and_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect_models.main(["list", "--filter", "*_ca", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mobilenetv2_100_ca\s+3,950,648", out)
    assert re.search(rf"strata_resnet50_ca\s+{_n_params(timm.create_model('strata_resnet50_ca')):,}", out)
    assert "resnet50_eca_k3557" not in out  # the filter applies

    assert inspect_models.main(["shapes", "mobilenetv2_100_ca", "--img-size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = [line.split() for line in lines[2:7]]
    assert [s[1] for s in stages] == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert [int(s[2]) for s in stages] == [2, 4, 8, 16, 32]
    assert stages[-1][4:8] == ["[1,", "320,", "2,", "2]"]
    per_stage = [int(s[-1].replace(",", "")) for s in stages] + [int(lines[7].split()[-1].replace(",", ""))]
    assert sum(per_stage) == 3_950_648  # every parameter is attributed to exactly one stage or the head


class _TokenAttention(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2).transpose(1, 2)[:, None]  # (B, 1, N, C)
        return F.scaled_dot_product_attention(t, t, t)


def test_inspect_macs_count_convs_and_attention_matmuls() -> None:
    assert inspect_models.count_macs(torch.nn.Conv2d(8, 8, 1, bias=False), 4, in_chans=8) == 16 * 8 * 8
    n, d = 16, 8  # q @ k^T and attn @ v; torch's CPU attention kernel would count 0, hence the meta device
    assert inspect_models.count_macs(_TokenAttention(), 4, in_chans=d, device="meta") == 2 * n * n * d


@pytest.mark.parametrize(("name", "paper_gmacs"), [("biformer_tiny", 2.228), ("biformer_small", 4.487)])
def test_biformer_macs_match_the_paper(name: str, paper_gmacs: float) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    macs = inspect_models.count_macs(model, 224)
    assert abs(macs / (paper_gmacs * 1e9) - 1) < 0.01
    assert all(m.impl == "fast" for m in model.modules() if hasattr(m, "impl"))  # counting leaves the model as it was
