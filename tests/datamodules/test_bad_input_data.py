"""Bad image files: odd modes decode to the right RGB, broken files are skipped, counted and bounded (issue 9, data)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from core.errors import DataError
from datamodules.decode import DecodeError, SkipCounter, decode_or_replace, decode_rgb
from datamodules.image_folder import ImageFolderDataset
from tests.support.cli import TINY_CLASSIFY, train_args
from train import main


def _colour_image(h: int = 16, w: int = 24) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 10 % 256, y * 15 % 256, (x + y) * 5 % 256], axis=-1).astype(np.uint8)


def _save(image: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    image.save(path, fmt, **kwargs)
    return path


def test_cmyk_jpeg_decodes_to_the_rgb_it_encodes(tmp_path: Path) -> None:
    rgb = _colour_image()
    path = _save(Image.fromarray(rgb).convert("CMYK"), tmp_path / "cmyk.JPEG", "JPEG", quality=100)
    with Image.open(path) as f:
        assert f.mode == "CMYK" and "adobe" in f.info  # NOTE: Pillow writes Adobe (inverted) CMYK
    out = decode_rgb(path)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 4  # JPEG loss only: an un-inverted decode is off by ~128
    # the black channel darkens: C=0, M=0, Y=0, K=128 is mid grey, not white and not black
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[..., 3] = 128
    grey = decode_rgb(_save(Image.fromarray(cmyk, "CMYK"), tmp_path / "k.jpg", "JPEG", quality=100))
    assert np.all(np.abs(grey.astype(int) - 127) <= 2)


def test_grayscale_jpeg_and_png_named_jpeg_decode_exactly(tmp_path: Path) -> None:
    gray = _colour_image()[..., 0]
    out = decode_rgb(_save(Image.fromarray(gray), tmp_path / "gray.JPEG", "JPEG", quality=100))
    assert out.shape == (*gray.shape, 3) and np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 1].astype(int) - gray).max() <= 3
    rgb = _colour_image()
    png_named_jpeg = _save(Image.fromarray(rgb), tmp_path / "n02105855_2933.JPEG", "PNG")
    assert png_named_jpeg.read_bytes()[:4] == b"\x89PNG"
    assert np.array_equal(decode_rgb(png_named_jpeg), rgb)  # lossless: the content decides, not the extension


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    path = _save(Image.fromarray(values), tmp_path / "depth16.png", "PNG")
    with Image.open(path) as f:
        assert f.mode.startswith("I")
    out = decode_rgb(path)
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 1], expected)
    assert len(np.unique(out)) > 32  # Pillow's own convert("RGB") clips all but the darkest to 255


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "1"])
def test_palette_alpha_and_bilevel_modes_keep_their_colours(tmp_path: Path, mode: str) -> None:
    rgb = _colour_image()
    image = Image.fromarray(rgb).convert(mode)
    out = decode_rgb(_save(image, tmp_path / f"{mode}.png", "PNG"))
    assert np.array_equal(out, np.asarray(image.convert("RGB")))


def _broken_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = io.BytesIO()
    Image.fromarray(_colour_image(64, 64)).save(jpeg, "JPEG", quality=95)
    png = io.BytesIO()
    Image.fromarray(_colour_image(64, 64)).save(png, "PNG")
    files = {
        "zero_byte.JPEG": b"",
        "truncated.JPEG": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "random.JPEG": np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "notes.JPEG": b"this is a text file that got an image extension\n",
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    return paths


def test_broken_files_raise_a_decode_error_naming_the_file(tmp_path: Path) -> None:
    for name, path in _broken_files(tmp_path).items():
        with pytest.raises(DecodeError, match=name) as info:
            decode_rgb(path)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        decode_rgb(tmp_path / "absent.JPEG")


def test_skipped_samples_are_replaced_with_their_own_label_and_counted_across_workers(tmp_path: Path) -> None:
    good = []
    for i in range(6):
        good.append((str(_save(Image.fromarray(_colour_image()), tmp_path / f"good{i}.png", "PNG")), 100 + i))
    bad = [(str(p), -1) for p in _broken_files(tmp_path / "bad").values()]
    samples = [good[0], bad[0], bad[1], good[1], bad[2], good[2], good[3], bad[3], good[4], bad[4], good[5]]

    def transform(image: Image.Image) -> dict:
        return {"image": torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()}

    dataset = ImageFolderDataset(samples, transform)
    labels = [label for batch in DataLoader(dataset, batch_size=3, num_workers=2) for label in batch[1].tolist()]
    assert len(labels) == len(samples) and -1 not in labels  # never a broken file's label
    # the next decodable sample stands in, deterministically
    assert labels == [100, 101, 101, 101, 102, 102, 103, 104, 104, 105, 105]
    assert dataset.skip_counter.skipped == len(bad) and dataset.skip_counter.requested == len(samples)


def test_a_run_of_undecodable_samples_is_a_data_error() -> None:
    def load(index: int) -> int:
        raise DecodeError(f"file{index}.JPEG: broken")

    with pytest.raises(DataError, match=r"consecutive samples from index 3 fail to decode \(first: file3.JPEG"):
        decode_or_replace(load, 3, 100, SkipCounter())


def _cli(data: Path, out: Path, *extra: str) -> list[str]:
    """``sys.argv`` of a one-epoch fit of the tiny classification config."""
    quick = ["--data.init_args.batch_size", "16", "--model.init_args.ema_decay", "null", "--trainer.max_epochs", "1"]
    return ["train.py", *train_args("fit", TINY_CLASSIFY, data, out, "bad", *quick, *extra)]


def _with_broken_training_files(tiny_imagenet: Path, root: Path, count: int) -> Path:
    shutil.copytree(tiny_imagenet, root)
    broken = _broken_files(root / "scratch")
    victims = sorted((root / "train").rglob("*.*"))[::9][:count]
    for victim, source in zip(victims, list(broken.values()) * 2, strict=False):
        victim.write_bytes(source.read_bytes())  # NOTE: same name and extension, broken content
    shutil.rmtree(root / "scratch")
    return root


def test_fit_skips_broken_files_and_reports_them_in_summary(
    tiny_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _with_broken_training_files(tiny_imagenet, tmp_path / "ds", count=2)
    monkeypatch.setattr(sys, "argv", _cli(data, tmp_path / "runs", "--data.init_args.max_skipped_fraction", "0.05"))
    main()
    summary = json.loads((tmp_path / "runs" / "bad" / "summary.json").read_text())
    assert summary["skipped_samples"] == 2  # one epoch: each broken training file requested once
    assert summary["global_step"] == 64 // 16 and summary["nonfinite_steps"] == 0


def test_fit_stops_when_too_many_samples_fail(
    tiny_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    data = _with_broken_training_files(tiny_imagenet, tmp_path / "ds", count=4)
    monkeypatch.setattr(sys, "argv", _cli(data, tmp_path / "runs", "--data.init_args.max_skipped_fraction", "0.01"))
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "failed to decode" in errors[0] and "max_skipped_fraction=0.01" in errors[0]
    assert not (tmp_path / "runs" / "bad" / "summary.json").exists()
