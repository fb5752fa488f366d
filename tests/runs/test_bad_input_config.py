"""Config mistakes: unknown names list the closest ones, class counts and image sizes are checked before any data is
read (issue 9, config)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import datamodules.image_folder
from blocks import create_block
from core.errors import ConfigError
from runs.config_checks import check_model_fits_data
from tasks.backbone import backbone_errors
from tasks.classification import ClassificationTask
from train import main

REPO = Path(__file__).resolve().parents[2]


def test_unknown_backbone_lists_the_closest_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'strata_hybrid_pic' .*closest registered names: .*"):
        ClassificationTask(backbone="strata_hybrid_pic", num_classes=4)
    with pytest.raises(ConfigError) as info:
        ClassificationTask(backbone="strata_hybrid_pic", num_classes=4)
    assert "strata_hybrid_pico" in str(info.value)


def test_unknown_block_lists_the_closest_names() -> None:
    match = r"unknown block 'dula'\. Did you mean: dual.*\(model\.backbone_kwargs\)"
    with pytest.raises(ConfigError, match=match), backbone_errors("strata_hybrid_pico"):
        create_block("dula", 16)


def test_a_keyword_the_backbone_does_not_take_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.backbone_kwargs do not fit strata_hybrid_pico .*'block'"):
        ClassificationTask(backbone="strata_hybrid_pico", num_classes=4, backbone_kwargs={"block": "dual"})


def _datamodule(img_size: int, num_classes: int = 8) -> SimpleNamespace:
    """What ``check_model_fits_data`` reads of a datamodule (the data contract, ``datamodules/base.py``)."""
    return SimpleNamespace(
        num_classes=num_classes, input_sizes=lambda: {"data.img_size": img_size}, describe=lambda: "data/x"
    )


def test_num_classes_that_disagrees_with_the_dataset_is_a_config_error() -> None:
    task = ClassificationTask(backbone="test_resnet", num_classes=10, ema_decay=None)
    with pytest.raises(ConfigError, match=r"model\.num_classes 10 does not match the 8 classes of the data \(data/x\)"):
        check_model_fits_data(task, _datamodule(img_size=64))
    check_model_fits_data(task, _datamodule(img_size=64, num_classes=10))


def test_image_size_below_the_total_stride_is_a_config_error() -> None:
    task = ClassificationTask(backbone="test_resnet", num_classes=8, ema_decay=None)
    with pytest.raises(ConfigError, match=r"data\.img_size 16 is smaller than the total stride 32 of test_resnet"):
        check_model_fits_data(task, _datamodule(img_size=16))
    check_model_fits_data(task, _datamodule(img_size=32))


def test_fixed_size_model_rejects_another_image_size() -> None:
    task = ClassificationTask(backbone="test_vit", num_classes=8, ema_decay=None)  # 160x160 only
    with pytest.raises(ConfigError, match=r"test_vit takes only 160x160 inputs but data\.img_size is 64"):
        check_model_fits_data(task, _datamodule(img_size=64))
    check_model_fits_data(task, _datamodule(img_size=160))


def test_cli_reports_a_too_small_image_before_reading_any_image(
    tiny_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_reading(path: str) -> None:
        raise AssertionError(f"read {path} before the config check")

    monkeypatch.setattr(datamodules.image_folder, "decode_rgb_image", no_reading)
    argv = [
        "train.py",
        "fit",
        "--config",
        str(REPO / "configs" / "demo" / "classify.yaml"),
        "--out_dir",
        str(tmp_path),
        "--data.init_args.root",
        str(tiny_imagenet),
        "--data.init_args.img_size",
        "16",
        "--data.init_args.num_workers",
        "0",
        "--model.init_args.backbone",
        "test_resnet",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.img_size 16 is smaller than the total stride 32 of test_resnet")
