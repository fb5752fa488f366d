"""Decompression bombs and oversized images: refused from their header (never decoded) as an undecodable file, so
training skips and counts them and evaluation stops or excludes; setup never fails on one; the limit is an argument
that reaches DataLoader workers."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data
from torch.utils.data import DataLoader

from core.errors import ConfigError, DataError
from datamodules.ade20k import ADE20KDataModule
from datamodules.coco import COCODataModule
from datamodules.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodeError,
    ExcludedSample,
    PixelLimitError,
    check_max_image_pixels,
    decode_rgb,
    decode_rgb_image,
)
from datamodules.image_folder import ImageFolderDataset

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _bomb(path: Path, width: int, height: int) -> Path:
    """A white bilevel PNG of ``width x height`` written row by row: a few kB on disk, ``width * height`` pixels."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # NOTE: filter byte 0, then the packed pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def _photo(path: Path, photo: np.ndarray) -> Path:
    Image.fromarray(photo).save(path, "JPEG", quality=90)
    return path


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decoding fails the test: a bomb must be refused from its header."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded {self.size} pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.usefixtures("no_decoding")
@pytest.mark.parametrize("decode", [decode_rgb, decode_rgb_image])
def test_a_bomb_is_a_decode_error_from_its_header_naming_size_limit_and_fix(tmp_path: Path, decode) -> None:
    path = _bomb(tmp_path / "bomb.png", 12000, 8000)  # NOTE: 96 MP, which PIL only warns about
    assert path.stat().st_size < 20_000
    with pytest.raises(PixelLimitError) as info:
        decode(path)
    message = str(info.value)
    assert isinstance(info.value, DecodeError)  # NOTE: so the undecodable policies apply
    assert message.startswith(f"{path}: 12000x8000, 96000000 pixels, above the limit of 89478485 pixels")
    assert "--data.init_args.max_image_pixels N" in message and "\n" not in message


def test_a_bomb_beyond_pils_own_refusal_names_its_pixels_and_the_limit(tmp_path: Path) -> None:
    path = _bomb(tmp_path / "bomb.png", 20000, 10000)  # NOTE: 200 MP: PIL's Image.open itself refuses it
    expected = rf"^{path}: (20000x10000, )?200000000 pixels, above the limit of 1000000 pixels"  # NOTE: size if known
    with pytest.raises(PixelLimitError, match=expected):
        decode_rgb(path, 1_000_000)


def test_the_limit_is_an_argument_not_pils_global(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _photo(tmp_path / "chelsea.jpg", data.chelsea())  # NOTE: 451x300 = 135300 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # NOTE: PIL alone would refuse the photo
    assert decode_rgb(path, 135_300).shape == (300, 451, 3) and decode_rgb(path, None).shape == (300, 451, 3)
    with pytest.raises(DecodeError, match=r"451x300, 135300 pixels, above the limit of 135299 pixels"):
        decode_rgb(path, 135_299)
    assert check_max_image_pixels(0) is None and check_max_image_pixels(None) is None
    assert check_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS) == 89_478_485
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=r"data\.max_image_pixels .* must be a pixel count"):
            check_max_image_pixels(bad)


def test_the_limit_reaches_spawned_workers_and_oversized_images_are_replaced_and_counted(tmp_path: Path) -> None:
    photos = [data.chelsea(), data.coffee(), data.chelsea(), data.astronaut()]  # NOTE: 135k, 240k, 135k, 262k px
    samples = [(str(_photo(tmp_path / f"{i}.jpg", photo)), i) for i, photo in enumerate(photos)]
    dataset = ImageFolderDataset(samples, dict, max_image_pixels=200_000)  # NOTE: dict: the PIL image as is
    loader = DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    labels = [label for _, label in loader]  # NOTE: a spawned worker starts from PIL's defaults: the limit is data
    assert labels == [0, 2, 2, 0]  # NOTE: the next image that decodes stands in (wrapping around)
    assert dataset.skip_counter.skipped == 2 and dataset.skip_counter.requested == 4
    evaluation = ImageFolderDataset(samples, dict, undecodable="error", max_image_pixels=200_000)
    with pytest.raises(DataError, match=r"cannot decode evaluation image .*1\.jpg: 600x400, 240000 pixels, above"):
        evaluation[1]
    excluded = ImageFolderDataset(samples, dict, undecodable="exclude", max_image_pixels=200_000)[1]
    assert isinstance(excluded, ExcludedSample) and "above the limit of 200000 pixels" in excluded.reason


def test_ade20k_setup_survives_a_bomb_and_training_replaces_it(tmp_path: Path) -> None:
    root = tmp_path / "ade"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, photo in enumerate((data.chelsea(), data.coffee())):
            _photo(root / "images" / split / f"ADE_{i}.jpg", photo)
            Image.fromarray(np.ones(photo.shape[:2], np.uint8)).save(root / "annotations" / split / f"ADE_{i}.png")
    (root / "images" / "training" / "ADE_1.jpg").unlink()
    _bomb(root / "images" / "training" / "ADE_1.png", 20000, 10000)  # NOTE: Image.open raises on it
    dm = ADE20KDataModule(root=str(root), crop_size=32, scale=(64, 32), eval_short_side=32, batch_size=2)
    dm.setup("fit")
    dm.train_set.reseed(0)
    assert [tuple(dm.train_set[i][0].shape) for i in range(2)] == [(3, 32, 32)] * 2
    assert dm.train_set.skip_counter.skipped == 1 and dm.train_set.skip_counter.requested == 2
    _bomb(root / "annotations" / "validation" / "ADE_0.png", 20000, 10000)  # NOTE: a bomb mask of a good image
    with pytest.raises(DataError, match=r"^annotation .*validation/ADE_0\.png: (20000x10000, )?200000000 pixels, ab"):
        ADE20KDataModule(root=str(root), crop_size=32, scale=(64, 32), eval_short_side=32).setup("validate")


def test_coco_setup_survives_a_bomb_and_evaluation_excludes_it(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    _photo(root / "images" / "a.jpg", data.chelsea())
    _bomb(root / "images" / "b.png", 20000, 10000)
    images = [dict(id=1, file_name="a.jpg", width=451, height=300), dict(id=2, file_name="b.png", width=2, height=1)]
    anns = [dict(id=i, image_id=i, category_id=1, bbox=[0, 0, 1, 1], area=1.0, iscrowd=0) for i in (1, 2)]
    coco = dict(images=images, annotations=anns, categories=[dict(id=1, name="x")])
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    dm = COCODataModule(
        root=str(root), train_images="images", val_images="images", img_scale=(48, 32), eval_undecodable="exclude"
    )
    dm.setup("fit")
    assert [dm.train_set[i][1]["image_id"] for i in range(2)] == [1, 1] and dm.train_set.skip_counter.skipped == 1
    excluded = dm.val_set[1]
    assert isinstance(excluded, ExcludedSample) and excluded.key == 2 and "200000000 pixels" in excluded.reason
