"""Every config under configs/ parses, and (slow) trains a step on tiny data of its dataset's layout.

The paper recipes keep their model and their optimiser and schedule; only what a CPU test cannot run is shrunk:
one device, fp32, a batch of two, small images, one training step and no validation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runs.cli import cli_main
from tests.support.cli import QUIET, REPO, run_train

# NOTE: ablation files (a grid over run configs, runs/ablation_grid.py) are checked in tests/runs/test_ablation.py
CONFIGS = sorted(c for c in (REPO / "configs").rglob("*.yaml") if "grid" not in (yaml.safe_load(c.read_text()) or {}))
IMAGENET_MODELS = {"biformer_tiny.yaml", "biformer_small.yaml", "biformer_base.yaml"}  # merged into deit_300e.yaml
# NOTE: fragments are merged after the configs they complete (composed backbones go on the classification demo)
FRAGMENT_BASES = {
    "ablate_base.yaml": ["demo/classify.yaml"],
    "ablate_biformer_tiny_base.yaml": ["imagenet/deit_300e.yaml", "composed/biformer_tiny.yaml"],
}
CPU_STEP = [
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.num_nodes", "1",
    "--trainer.strategy", "auto",
    "--trainer.precision", "32-true",
    "--trainer.sync_batchnorm", "false",
    "--trainer.max_steps", "1",
    "--trainer.max_epochs", "1",
    "--trainer.limit_val_batches", "0",
    "--trainer.val_check_interval", "null",
    "--trainer.check_val_every_n_epoch", "1",
    "--save_every_n_steps", "0",
    "--val_overlays", "0",
    "--data.init_args.num_workers", "0",
    "--data.init_args.batch_size", "2",
    *QUIET,
]  # fmt: skip
TINY_DATA = {
    "imagenet": ["--data.init_args.img_size", "64"],
    "coco": ["--data.init_args.img_scale", "[128, 96]"],
    "ade20k": [
        "--data.init_args.crop_size", "64",
        "--data.init_args.scale", "[128, 64]",
        "--data.init_args.eval_short_side", "64",
    ],
}  # fmt: skip


def _config_args(config: Path) -> list[str]:
    bases = FRAGMENT_BASES.get(config.name, ["demo/classify.yaml"] if config.parent.name == "composed" else [])
    if bases:
        return [arg for base in bases for arg in ("--config", str(REPO / "configs" / base))] + ["--config", str(config)]
    if config.name in IMAGENET_MODELS:
        return ["--config", str(REPO / "configs" / "imagenet" / "deit_300e.yaml"), "--config", str(config)]
    return ["--config", str(config)]


def _layout(config: Path) -> str:
    text = config.read_text()
    if "COCODataModule" in text:
        return "coco"
    if "ADE20KDataModule" in text:
        return "ade20k"
    return "imagenet"


def _data_root(layout: str, tiny_imagenet: Path, tiny_coco: Path, tiny_ade20k: Path) -> Path:
    return {"imagenet": tiny_imagenet, "coco": tiny_coco, "ade20k": tiny_ade20k}[layout]


def test_every_config_is_found() -> None:
    names = {str(c.relative_to(REPO / "configs")) for c in CONFIGS}
    assert {"demo/classify.yaml", "imagenet/deit_300e.yaml", "coco/maskrcnn_biformer_small_1x.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c.relative_to(REPO / "configs")))
def test_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as printed:  # --print_config validates every key against the classes, then exits
        cli_main(["fit", *_config_args(config), "--print_config"])
    assert printed.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: tasks." in out and "class_path: datamodules." in out


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c.relative_to(REPO / "configs")))
def test_config_trains_a_step(
    config: Path, tiny_imagenet: Path, tiny_coco: Path, tiny_ade20k: Path, tmp_path: Path
) -> None:
    layout = _layout(config)
    args = [
        "fit",
        *_config_args(config),
        "--name", "step",
        "--out_dir", str(tmp_path),
        "--data.init_args.root", str(_data_root(layout, tiny_imagenet, tiny_coco, tiny_ade20k)),
        *CPU_STEP,
        *TINY_DATA[layout],
    ]  # fmt: skip
    if layout == "ade20k":
        args += ["--data.init_args.num_classes", "8"]  # the shapes scenes: 8 classes + "other"
    if config.name == "segment.yaml":
        args += ["--model.init_args.pretrained_file", "null"]  # the classification demo's weights are not there
    result = run_train(args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "step" / "last.ckpt").is_file()
