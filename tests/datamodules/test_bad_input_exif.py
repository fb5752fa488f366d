"""Phone photos carry an EXIF orientation: images decode upright, as PIL's ``exif_transpose`` shows them, and COCO
boxes and masks and ADE20K masks drawn on the stored pixels follow the image; sizes that fit neither frame fail at
setup."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from skimage import data

from core.errors import DataError
from datamodules.ade20k import ADE20KDataset
from datamodules.coco import COCODataModule, COCODetectionDataset
from datamodules.decode import decode_rgb, decode_rgb_image, read_header

# NOTE: EXIF orientation -> the PIL transpose that displays it (the EXIF table exif_transpose follows)
TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
ORIENTATIONS = range(1, 9)
# NOTE: (orientation, frame the annotations are drawn in): a stored frame is told apart by its size for 5..8 only
FRAMES = [(o, "upright") for o in ORIENTATIONS] + [(o, "stored") for o in (5, 6, 7, 8)]
PHOTO = data.chelsea()  # NOTE: 451x300, so an orientation of 5..8 swaps its sides
BOX = (180, 60, 260, 140)  # NOTE: x0, y0, x1, y1 around the cat's face, in the stored frame


def _photo(path: Path, orientation: int) -> Path:
    """The photo saved as a JPEG whose EXIF orientation is ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(PHOTO).save(path, "JPEG", quality=90, exif=exif)
    return path


def _upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """``array`` as PIL displays an image of EXIF ``orientation`` (the reference, independent of the project)."""
    image = Image.fromarray(array)
    return np.asarray(image.transpose(TRANSPOSES[orientation]) if orientation != 1 else image)


def _stored(path: Path) -> np.ndarray:
    """The file's pixels as stored (no orientation applied)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _triangle() -> np.ndarray:
    """An instance mask in the stored frame: the lower-left half of ``BOX``, so that any wrong flip shows."""
    x0, y0, x1, y1 = BOX
    rows, cols = np.mgrid[y0:y1, x0:x1]
    mask = np.zeros(PHOTO.shape[:2], np.uint8)
    mask[y0:y1, x0:x1] = (cols - x0) <= (rows - y0)
    return mask


def _box_in(frame: str, orientation: int) -> tuple[int, int, int, int]:
    """``BOX`` in ``frame``: as is in the stored frame, else the box PIL gives the upright rectangle."""
    if frame == "stored":
        return BOX
    rectangle = np.zeros(PHOTO.shape[:2], np.uint8)
    rectangle[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 255
    return Image.fromarray(_upright(rectangle, orientation)).getbbox()


def _uint8(image: torch.Tensor) -> np.ndarray:
    """A dataset's ``(3, H, W)`` float image in [0, 1] back to ``(H, W, 3)`` uint8."""
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_decode_applies_the_exif_orientation_as_pil_exif_transpose(tmp_path: Path, orientation: int) -> None:
    path = _photo(tmp_path / "photo.jpg", orientation)
    with Image.open(path) as image:
        reference = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.array_equal(decode_rgb(path), reference)
    assert np.array_equal(np.asarray(decode_rgb_image(path)), reference)
    stored = decode_rgb(path, apply_exif_orientation=False)
    assert np.array_equal(stored, _stored(path))
    assert (orientation == 1) == np.array_equal(stored, reference)  # NOTE: not vacuous: the tag changes the pixels
    assert read_header(path) == (451, 300, orientation)
    assert read_header(path).oriented_size == reference.shape[1::-1]


def _coco(root: Path, orientation: int, frame: str, stated: tuple[int, int] | None = None) -> Path:
    """One photo of EXIF ``orientation`` with one instance (``BOX``, ``_triangle``) drawn in ``frame``; the JSON
    states that frame's size, or ``stated`` (w, h)."""
    (root / "images").mkdir(parents=True)
    _photo(root / "images" / "photo.jpg", orientation)
    mask = _triangle() if frame == "stored" else _upright(_triangle(), orientation)
    x0, y0, x1, y1 = _box_in(frame, orientation)
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    width, height = stated or mask.shape[::-1]
    annotation = dict(id=1, image_id=1, category_id=1, iscrowd=0, area=float(mask.sum()), segmentation=rle)
    annotation["bbox"] = [x0, y0, x1 - x0, y1 - y0]
    image = dict(id=1, file_name="photo.jpg", width=width, height=height)
    coco = dict(images=[image], annotations=[annotation], categories=[dict(id=1, name="cat")])
    (root / "annotations" / "instances_train2017.json").parent.mkdir()
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


@pytest.mark.parametrize(("orientation", "frame"), FRAMES)
def test_coco_boxes_and_masks_crop_the_same_pixels_in_every_orientation(
    tmp_path: Path, orientation: int, frame: str
) -> None:
    root = _coco(tmp_path / "coco", orientation, frame)
    dataset = COCODetectionDataset(root / "annotations" / "instances_train2017.json", root / "images", with_masks=True)
    image, target = dataset[0]
    decoded = _uint8(image)
    stored = _stored(root / "images" / "photo.jpg")
    assert np.array_equal(decoded, _upright(stored, orientation))  # NOTE: upright, as displayed
    x0, y0, x1, y1 = (int(v) for v in target["boxes"][0].tolist())
    face = stored[BOX[1] : BOX[3], BOX[0] : BOX[2]]
    assert np.array_equal(decoded[y0:y1, x0:x1], _upright(face, orientation))
    assert np.array_equal(target["masks"][0].numpy(), _upright(_triangle(), orientation))
    assert tuple(target["orig_size"]) == decoded.shape[:2]
    assert dataset.counts["stored_frame_images"] == (frame == "stored")


@pytest.mark.parametrize("orientation", [6, 8])
def test_coco_evaluation_keeps_stored_frame_annotations_in_the_json_frame(tmp_path: Path, orientation: int) -> None:
    root = _coco(tmp_path / "coco", orientation, "stored")
    dm = COCODataModule(root=str(root), train_images="images", val_images="images", with_masks=True)
    dm.setup("validate")
    dm.val_set.transform = None  # NOTE: no resize, to compare pixels
    image, target = dm.val_set[0]
    stored = _stored(root / "images" / "photo.jpg")
    assert np.array_equal(_uint8(image), stored)  # NOTE: predictions stay in the frame COCOeval's ground truth is in
    assert target["boxes"][0].tolist() == list(BOX) and tuple(target["orig_size"]) == (300, 451)
    assert np.array_equal(target["masks"][0].numpy(), _triangle())


def test_coco_size_fitting_neither_frame_fails_at_setup_naming_both(tmp_path: Path) -> None:
    root = _coco(tmp_path / "coco", 6, "stored", stated=(400, 300))
    dm = COCODataModule(root=str(root), train_images="images", val_images="images", skip_empty_train=False)
    with pytest.raises(DataError, match=r"photo\.jpg is 451x300 \(300x451 upright, EXIF orientation 6\) but ") as e:
        dm.setup("fit")
    message = str(e.value)
    assert "instances_train2017.json says 400x300 (1 of the 1 images differ)" in message and "\n" not in message
    assert "fix the image or its width/height entry" in message


def _ade20k(root: Path, orientation: int, frame: str, mask_size: tuple[int, int] | None = None) -> ADE20KDataset:
    """A one-pair ADE20K split: the photo of EXIF ``orientation``, its mask (class 1 on ``_triangle``, 2 elsewhere)
    drawn in ``frame`` (or a blank one of ``mask_size``)."""
    for folder in ("images", "annotations"):
        (root / folder).mkdir(parents=True)
    _photo(root / "images" / "ADE_1.jpg", orientation)
    mask = 2 - _triangle() if frame == "stored" else _upright(2 - _triangle(), orientation)
    if mask_size is not None:
        mask = np.zeros(mask_size[::-1], np.uint8)
    Image.fromarray(mask).save(root / "annotations" / "ADE_1.png")
    return ADE20KDataset(
        root / "images", root / "annotations", A.Compose([]), train=True, reduce_zero_label=False, num_classes=3
    )


@pytest.mark.parametrize(("orientation", "frame"), FRAMES)
def test_ade20k_mask_follows_the_image_in_every_orientation(tmp_path: Path, orientation: int, frame: str) -> None:
    dataset = _ade20k(tmp_path / "ade", orientation, frame)  # NOTE: the setup check passes in either frame
    image, mask = dataset[0]
    stored = _stored(tmp_path / "ade" / "images" / "ADE_1.jpg")
    upright = _upright(stored, orientation)
    assert np.array_equal(image.permute(1, 2, 0).numpy().astype(np.uint8), upright)
    assert np.array_equal(mask.numpy(), _upright(2 - _triangle(), orientation))
    face = _upright(stored * _triangle()[..., None], orientation)
    assert np.array_equal(upright * (mask.numpy() == 1)[..., None], face)  # NOTE: class 1 covers the same pixels


def test_ade20k_mask_fitting_neither_frame_fails_at_setup_naming_both(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"annotation .*ADE_1\.png is 300x300 but .*ADE_1\.jpg is 451x300 \(300x") as e:
        _ade20k(tmp_path / "ade", 6, "upright", mask_size=(300, 300))
    assert str(e.value).endswith("upright): an annotation must match its image") and "\n" not in str(e.value)
