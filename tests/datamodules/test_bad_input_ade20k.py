"""Broken ADE20K data: missing, mis-sized or out-of-range masks fail at setup naming the file; undecodable images
are skipped and counted (issue 9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import DataError
from datamodules.ade20k import ADE20KDataModule
from datamodules.samplers import UnpaddedDistributedSampler

STEMS = ("ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000003")


def _write(root: Path, label_values: tuple[int, ...] = (0, 1, 150)) -> Path:
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, stem in enumerate(STEMS):
            Image.fromarray(np.full((24, 32, 3), 60 * i, np.uint8)).save(root / "images" / split / f"{stem}.jpg")
            label = np.zeros((24, 32), np.uint8)
            label[:, 16:] = label_values[i]
            Image.fromarray(label).save(root / "annotations" / split / f"{stem}.png")
    return root


def _setup(root: Path) -> ADE20KDataModule:
    dm = ADE20KDataModule(root=str(root), crop_size=32, scale=(64, 32), eval_short_side=32, batch_size=2, num_workers=0)
    dm.setup("fit")
    return dm


def _raises(root: Path, match: str) -> str:
    with pytest.raises(DataError, match=match) as info:
        _setup(root)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_labels_up_to_num_classes_and_255_pass(tmp_path: Path) -> None:
    root = _write(tmp_path / "ade", label_values=(0, 150, 255))
    dm = _setup(root)
    assert len(dm.train_set) == 3 and len(dm.val_set) == 3


def test_a_missing_mask_fails_at_setup_naming_it(tmp_path: Path) -> None:
    root = _write(tmp_path / "ade")
    (root / "annotations" / "training" / f"{STEMS[1]}.png").unlink()
    message = _raises(root, rf"missing annotation .*annotations/training/{STEMS[1]}\.png for .*{STEMS[1]}\.jpg")
    assert "restore the masks" in message


def test_a_mask_of_another_size_fails_at_setup_naming_both_files(tmp_path: Path) -> None:
    root = _write(tmp_path / "ade")
    Image.fromarray(np.zeros((24, 30), np.uint8)).save(root / "annotations" / "validation" / f"{STEMS[2]}.png")
    _raises(root, rf"annotation .*validation/{STEMS[2]}\.png is 30x24 but .*validation/{STEMS[2]}\.jpg is 32x24")


def test_a_label_above_150_fails_at_setup_naming_the_mask(tmp_path: Path) -> None:
    root = _write(tmp_path / "ade", label_values=(0, 151, 3))
    message = _raises(root, rf"annotation .*training/{STEMS[1]}\.png holds label 151, above the 150")
    assert "num_classes" in message


def test_an_rgb_mask_fails_at_setup(tmp_path: Path) -> None:
    root = _write(tmp_path / "ade")
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / "annotations" / "training" / f"{STEMS[0]}.png")
    _raises(root, rf"annotation .*{STEMS[0]}\.png is a RGB image: save it as a single-channel")


def test_an_undecodable_training_image_is_skipped_and_counted(tmp_path: Path) -> None:
    root = _write(tmp_path / "ade")
    (root / "images" / "training" / f"{STEMS[0]}.jpg").write_bytes(b"")  # zero-byte
    dm = _setup(root)
    masks = []
    for i in range(len(dm.train_set)):
        dm.train_set.reseed(0)  # NOTE: the same random crop for every draw
        masks.append(dm.train_set[i][1])
    assert len(masks) == 3 and torch.equal(masks[0], masks[1])  # the next pair stands in, with its own mask
    assert dm.train_set.skip_counter.skipped == 1 and dm.train_set.skip_counter.requested == 3


def test_an_undecodable_val_image_is_never_replaced(tmp_path: Path) -> None:
    root = _write(tmp_path / "ade")
    bad = root / "images" / "validation" / f"{STEMS[0]}.jpg"
    bad.write_bytes(b"")
    dm = _setup(root)
    assert dm.val_set.skip_counter is None  # evaluation never substitutes, so it has nothing to count
    with pytest.raises(DataError, match=rf"cannot decode evaluation image {bad} \(0 bytes\)") as info:
        dm.val_set[0]
    assert "eval_undecodable exclude" in str(info.value) and "\n" not in str(info.value)
    dm = ADE20KDataModule(root=str(root), crop_size=32, scale=(64, 32), eval_short_side=32, eval_undecodable="exclude")
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert len(batch[0]) == 0 and [(e.index, e.key) for e in batch[3]] == [(0, STEMS[0])]
    assert dm.val_set[1][2]["name"] == STEMS[1]  # the others keep their own pairs


def _palette_masks(root: Path, palettes: tuple[list[int], ...]) -> None:
    """Re-save the training masks as mode P, mask ``i`` with palette ``palettes[i]`` (the indices stay the labels)."""
    for stem, palette in zip(STEMS, palettes, strict=True):
        path = root / "annotations" / "training" / f"{stem}.png"
        with Image.open(path) as f:
            mask = f.copy()
        mask.putpalette(palette)
        mask.save(path)
        with Image.open(path) as f:
            assert f.mode == "P" and np.array_equal(np.asarray(f), np.asarray(mask))


def _colours(seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, 256 * 3).tolist()


def test_p_masks_sharing_the_palette_over_their_indices_pass(tmp_path: Path) -> None:
    root = _write(tmp_path / "ade", label_values=(0, 1, 150))
    other = _colours(0)
    other[3 * 7 : 3 * 8] = [1, 2, 3]  # NOTE: index 7 is used by no mask
    _palette_masks(root, (_colours(0), other, _colours(0)))
    dm = _setup(root)
    assert len(dm.train_set) == 3


def test_a_p_mask_with_another_palette_fails_at_setup_naming_both_masks(tmp_path: Path) -> None:
    root = _write(tmp_path / "ade", label_values=(0, 1, 150))
    recoloured = _colours(0)
    recoloured[3 * 150 : 3 * 151] = [9, 9, 9]  # NOTE: the colour of index 150, which the third mask uses
    _palette_masks(root, (_colours(0), _colours(0), recoloured))
    message = _raises(
        root, rf"annotation .*training/{STEMS[2]}\.png has another palette than .*training/{STEMS[0]}\.png over the"
    )
    assert message.endswith("re-save it as a mode L PNG of class indices")


def test_an_evaluation_split_smaller_than_the_ranks_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fix = r"evaluate on at most 3 ranks \(--trainer.devices, --trainer.num_nodes\) or add samples to it$"
    with pytest.raises(DataError, match=rf"^val x has 3 samples, fewer than the 4 DDP ranks \(.*\): {fix}"):
        UnpaddedDistributedSampler(list(range(3)), num_replicas=4, rank=0, name="val x")
    with pytest.raises(DataError, match=r"^val x has 0 samples, fewer than the 2 DDP ranks \(.*\): add samples to it$"):
        UnpaddedDistributedSampler([], num_replicas=2, rank=1, name="val x")
    assert [len(UnpaddedDistributedSampler(list(range(3)), num_replicas=3, rank=r)) for r in range(3)] == [1, 1, 1]
    dm = _setup(_write(tmp_path / "ade"))  # NOTE: 3 validation pairs
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 3)
    with pytest.raises(DataError, match=r"^val split .*/validation has 3 samples, fewer than the 4 DDP ranks") as e:
        dm.val_dataloader()
    assert "evaluate on at most 3 ranks (--trainer.devices, --trainer.num_nodes)" in str(e.value)
