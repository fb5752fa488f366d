"""Bad checkpoints: truncated or corrupt files are named, another model's checkpoint lists its mismatched keys, and
foreign files load with ``weights_only=True`` (issue 9, checkpoints)."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.checkpoint_files import load_checkpoint_file
from core.errors import CheckpointError
from runs.checkpoint_io import CheckedCheckpointIO
from tasks.classification import ClassificationTask
from train import main

REPO = Path(__file__).resolve().parents[2]


class NotATensor:
    """A pickled object ``weights_only=True`` refuses (it could run code on load)."""


@pytest.fixture(scope="module")
def task() -> ClassificationTask:
    return ClassificationTask(backbone="test_resnet", num_classes=8, ema_decay=None)


@pytest.fixture(scope="module")
def good_ckpt(task: ClassificationTask, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    torch.save({"state_dict": task.state_dict(), "global_step": 3}, path)
    return path


def _broken(good: Path, folder: Path) -> dict[str, Path]:
    data = good.read_bytes()
    safetensors = folder / "weights.safetensors"
    save_file({"w": torch.zeros(64, 64)}, safetensors)
    files = {
        "zero.ckpt": b"",
        "truncated.ckpt": data[: len(data) // 2],
        "garbage.ckpt": bytes(range(256)) * 8,
        "truncated.safetensors": safetensors.read_bytes()[:200],
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {name: folder / name for name in files}


def test_truncated_and_corrupt_files_are_named(good_ckpt: Path, tmp_path: Path) -> None:
    for name, path in _broken(good_ckpt, tmp_path).items():
        with pytest.raises(CheckpointError, match=rf"checkpoint .*{name} is truncated or corrupt \(\d+ bytes") as info:
            load_checkpoint_file(path)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"checkpoint .*absent.ckpt does not exist"):
        load_checkpoint_file(tmp_path / "absent.ckpt")
    assert load_checkpoint_file(good_ckpt)["global_step"] == 3


def test_pickled_objects_are_refused_by_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": collections.OrderedDict(w=torch.zeros(2)), "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"foreign.pth holds Python objects that weights_only=True refuses"):
        load_checkpoint_file(path)


def test_another_models_checkpoint_lists_the_mismatched_keys(task: ClassificationTask, tmp_path: Path) -> None:
    other = ClassificationTask(backbone="test_efficientnet", num_classes=8, ema_decay=None)
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        CheckedCheckpointIO(task).load_checkpoint(path)
    message = str(info.value)
    assert f"checkpoint {path} is not a checkpoint of this model" in message and "\n" not in message
    assert "missing keys: model.conv1.0.weight" in message and "unexpected keys: model.conv_stem.weight" in message
    wider = ClassificationTask(backbone="test_resnet", num_classes=5, ema_decay=None)
    torch.save({"state_dict": wider.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(checkpoint vs model\): model.fc.weight \(5, "):
        CheckedCheckpointIO(task).load_checkpoint(path)


def test_pretrained_file_errors_name_the_file_and_list_keys(good_ckpt: Path, tmp_path: Path) -> None:
    truncated = _broken(good_ckpt, tmp_path)["truncated.safetensors"]
    with pytest.raises(CheckpointError, match=r"truncated.safetensors is truncated or corrupt"):
        ClassificationTask(backbone="test_resnet", num_classes=8, pretrained_file=str(truncated))
    efficientnet = ClassificationTask(backbone="test_efficientnet", num_classes=8, ema_decay=None).model
    weights = tmp_path / "efficientnet.safetensors"
    save_file({k: v.contiguous() for k, v in efficientnet.state_dict().items()}, weights)
    with pytest.raises(CheckpointError) as info:
        ClassificationTask(backbone="test_resnet", num_classes=8, pretrained_file=str(weights))
    message = str(info.value)
    assert f"checkpoint {weights} does not fit model.backbone" in message and "\n" not in message
    assert "shape mismatches (checkpoint vs model): bn1.weight torch.Size([24]) vs torch.Size([32])" in message
    # no shared names: timm's non-strict load (num_classes 8 != 1000) would load nothing, silently
    renamed = tmp_path / "renamed.safetensors"
    save_file({f"other.{k}": v.contiguous() for k, v in efficientnet.state_dict().items()}, renamed)
    with pytest.raises(CheckpointError) as info:
        ClassificationTask(backbone="test_resnet", num_classes=8, pretrained_file=str(renamed))
    message = str(info.value)
    resnet = ClassificationTask(backbone="test_resnet", num_classes=8, ema_decay=None).model.state_dict()
    resnet_keys = sum(not k.endswith("num_batches_tracked") for k in resnet)  # BatchNorm fills those in itself
    # every key mismatches, except the classifier (fc.weight, fc.bias) timm drops for another num_classes
    assert "missing keys: conv1.0.weight, conv1.1.weight, conv1.1.bias, " in message
    assert f"({resnet_keys - 2} in all); unexpected keys: other." in message
    assert f"({len(efficientnet.state_dict())} in all)" in message and "fc.weight" not in message


@pytest.mark.parametrize("which", ["truncated", "other_model"])
def test_cli_ckpt_path_errors_are_one_line(
    which: str,
    good_ckpt: Path,
    tiny_imagenet: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    if which == "truncated":
        ckpt, expected = _broken(good_ckpt, tmp_path)["truncated.ckpt"], "is truncated or corrupt"
    else:
        ckpt, expected = good_ckpt, "is not a checkpoint of this model (ClassificationTask); missing keys: model.conv_"
    argv = [
        "train.py",
        "validate",
        "--config",
        str(REPO / "configs" / "demo" / "classify.yaml"),
        "--out_dir",
        str(tmp_path / "runs"),
        "--data.init_args.root",
        str(tiny_imagenet),
        "--data.init_args.img_size",
        "32",
        "--data.init_args.num_workers",
        "0",
        "--model.init_args.backbone",
        "test_resnet" if which == "truncated" else "test_efficientnet",
        "--model.init_args.ema_decay",
        "null",
        "--trainer.enable_progress_bar",
        "false",
        "--ckpt_path",
        str(ckpt),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"checkpoint {ckpt} {expected}" in errors[0]
