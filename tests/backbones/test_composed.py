"""``composed_backbone``: YAML rebuilds of the registered models, checks before building, export and features.

The rebuilds are compared with the registered entrypoints themselves (same parameters, keys and, from the same seed,
bit-equal outputs); the bad compositions go through ``train.py`` and must end in one line with exit code 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import backbones  # noqa: F401  (registers the models)
from backbones.composed import CompositionError
from tests.support.cli import REPO, TINY_CLASSIFY, TINY_DETECT, TINY_SEGMENT, main_error_line, run_train, train_args

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    depths=[1, 1, 1, 1],
    embed_dims=[16, 32, 64, 64],
    block=["mbconv", "mbconv", "bra", "dual"],
    block_kwargs=[{"attn": "se"}, {"attn": "eca"}, {"n_win": 2, "topk": 2, "num_heads": 2}, {"window_size": 2}],
)


def _yaml_kwargs(name: str) -> dict:
    config = yaml.safe_load((REPO / "configs" / "composed" / f"{name}.yaml").read_text())
    assert config["model"]["init_args"]["backbone"] == "composed_backbone"
    return config["model"]["init_args"]["backbone_kwargs"]


@pytest.mark.parametrize("name", ["biformer_tiny", "strata_hybrid_tiny"])
def test_the_yaml_rebuild_equals_the_registered_model(name: str) -> None:
    torch.manual_seed(0)
    registered = timm.create_model(name).eval()
    torch.manual_seed(0)
    composed = timm.create_model("composed_backbone", **_yaml_kwargs(name)).eval()
    assert sum(p.numel() for p in composed.parameters()) == sum(p.numel() for p in registered.parameters())
    assert list(composed.state_dict()) == list(registered.state_dict())
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        assert torch.equal(composed(x), registered(x))  # NOTE: same modules built in the same order from one seed
        composed.load_state_dict(timm.create_model(name).state_dict())  # strict: the weights of one load in the other


def test_a_composed_backbone_gives_four_feature_levels() -> None:
    model = timm.create_model("composed_backbone", features_only=True, **TINY)
    features = model(torch.randn(1, 3, 64, 48))
    assert [f.shape[1] for f in features] == TINY["embed_dims"]
    assert [f.shape[-2:] for f in features] == [(16, 12), (8, 6), (4, 3), (2, 2)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            dict(block=["mbconv", "mbconv", "brx", "dual"]),
            "backbone_kwargs.block[2]: unknown block 'brx'. Did you mean",
        ),
        (dict(block=["mbconv", "bra", "dual"]), "backbone_kwargs.block has 3 entries but depths has 4 stages"),
        (dict(block_kwargs=[{}, {}, {"topkk": 2}, {}]), "takes no argument 'topkk' (closest: topk)"),
        (dict(block_kwargs=[{}, {}, {}, {"num_heads": 3}]), "width 64 is not divisible by num_heads=3 of block 'dual'"),
        (dict(block_kwargs=[{"attn": "bra"}, {}, {}, {}]), "mbconv attn 'bra' is a block, not an attention gate"),
        (dict(embed_dims=[16, 32, 64]), "backbone_kwargs.embed_dims has 3 entries but depths has 4 stages"),
    ],
)
def test_a_bad_composition_is_refused_before_building(change: dict, expected: str) -> None:
    with pytest.raises(CompositionError, match=None) as info:
        timm.create_model("composed_backbone", **{**TINY, **change})
    assert expected in str(info.value) and "\n" not in str(info.value)


def _composed_args(kwargs: dict) -> list[str]:
    return ["--model.init_args.backbone", "composed_backbone", "--model.init_args.backbone_kwargs", json.dumps(kwargs)]


@pytest.mark.parametrize(
    ("change", "extra", "expected"),
    [
        (dict(block="brx"), [], "error: model.backbone_kwargs.block: unknown block 'brx'. Did you mean: bra"),
        (dict(block=["mbconv"] * 3), [], "error: model.backbone_kwargs.block has 3 entries but depths has 4 stages"),
        (dict(block_kwargs=[{}, {"expand": 2}, {}, {}]), [], "block 'mbconv' takes no argument 'expand'"),
        (dict(block_kwargs=[{}, {}, {}, {"num_heads": 5}]), [], "width 64 is not divisible by num_heads=5"),
        ({}, ["--data.init_args.img_size", "16"], "data.img_size 16 is smaller than the total stride 32"),
    ],
    ids=["unknown-block", "stage-count", "kwarg", "heads", "size-below-stride"],
)
def test_a_bad_composition_on_the_command_line_is_one_line_and_exit_2(
    change: dict, extra: list[str], expected: str, tiny_imagenet: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    args = train_args("fit", TINY_CLASSIFY, tiny_imagenet, tmp_path, "bad", *_composed_args({**TINY, **change}), *extra)
    line = main_error_line(args, capsys, monkeypatch)
    assert line.startswith(expected) or expected in line, line
    assert not (tmp_path / "bad" / "last.ckpt").exists()


def test_a_composed_backbone_trained_from_yaml_reloads_from_its_run_in_a_fresh_process(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    fit = run_train(
        train_args(
            "fit", TINY_CLASSIFY, tiny_imagenet, tmp_path, "composed",
            *_composed_args(TINY), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        )
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "composed"
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"] == "composed_backbone" and {k: config["model_args"].get(k) for k in TINY} == TINY
    state = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    reference = timm.create_model("composed_backbone", num_classes=config["num_classes"], **TINY).eval()
    reference.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, timm, torch, backbones\n"
        f"model = timm.create_model('local-dir:{run}', pretrained=True).eval()\n"
        f"torch.save(model(torch.load('{tmp_path / 'x.pt'}')).detach(), '{tmp_path / 'y.pt'}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, text=True
    )
    assert done.returncode == 0
    with torch.no_grad():
        # NOTE: another process may pick other CPU kernels: equal up to float32 rounding
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), reference(x), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_composed_backbone_serves_the_dense_tasks_as_features_only(
    task: str, tiny_coco: Path, tiny_ade20k: Path, tmp_path: Path
) -> None:
    flags, data = (TINY_DETECT, tiny_coco) if task == "detect" else (TINY_SEGMENT, tiny_ade20k)
    fit = run_train(
        train_args(
            "fit", flags, data, tmp_path, task, *_composed_args(TINY),
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        )
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    config = json.loads((tmp_path / task / "config.json").read_text())
    assert config["architecture"] == "composed_backbone" and {k: config["model_args"].get(k) for k in TINY} == TINY
    exported = timm.create_model(f"local-dir:{tmp_path / task}", pretrained=True, features_only=True)
    assert exported.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize(("attn", "reference"), [("se", "seresnet50"), ("ca", "strata_resnet50_ca")])
def test_a_composed_resnet_with_one_gate_equals_the_registered_attention_resnet(attn: str, reference: str) -> None:
    torch.manual_seed(0)
    registered = timm.create_model(reference).eval()
    torch.manual_seed(0)
    composed = timm.create_model("composed_resnet", attn=attn).eval()
    assert list(composed.state_dict()) == list(registered.state_dict())
    assert sum(p.numel() for p in composed.parameters()) == sum(p.numel() for p in registered.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(composed(x), registered(x))


def test_a_composed_resnet_takes_a_gate_per_stage() -> None:
    from blocks.channel import EfficientChannelAttention, SqueezeExcite
    from blocks.coordinate import CoordinateAttention

    model = timm.create_model("composed_resnet", layers=[1, 1, 1, 1], block="basic", attn=["se", None, "eca", "ca"])
    gates = [type(stage[0].se) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)]
    assert gates == [SqueezeExcite, torch.nn.Identity, EfficientChannelAttention, CoordinateAttention]
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(attn="bra"), "backbone_kwargs.attn[0]='bra' is a block, not an attention gate"),
        (dict(attn="sse"), "backbone_kwargs.attn[0]: unknown block 'sse'"),
        (dict(attn=["se", "se"]), "backbone_kwargs.attn has 2 entries but layers has 4 stages"),
        (dict(attn="se", attn_kwargs={"ratio": 8}), "block 'se' takes no argument 'ratio'"),
    ],
)
def test_a_bad_composed_resnet_is_refused_before_building(kwargs: dict, expected: str) -> None:
    with pytest.raises(CompositionError) as info:
        timm.create_model("composed_resnet", **kwargs)
    assert expected in str(info.value)
