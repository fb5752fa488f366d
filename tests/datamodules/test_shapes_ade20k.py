"""Tests for the synthetic shapes generator's ADE20K (ADEChallengeData2016) layout."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from datamodules import shapes_ade20k
from datamodules.shapes import SHAPE_CLASSES, render_scene
from datamodules.shapes_ade20k import ensure_demo_ade20k, render_ade20k_scene, semantic_label_map, write_ade20k_dataset

SMALL = dict(num_train=10, num_val=5, image_size=64)
SPLITS = (("training", "train", 10), ("validation", "val", 5))  # folder, file-name tag, images


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _stems(tag: str, count: int) -> list[str]:
    return [f"ADE_{tag}_{i:08d}" for i in range(1, count + 1)]


@pytest.fixture(scope="module")
def small_ade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ade20k_dataset(tmp_path_factory.mktemp("data") / "ade20k", seed=0, **SMALL)


def test_layout_names_and_class_file(small_ade: Path) -> None:
    root = small_ade
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "class_names.txt", "images", "manifest.json"]
    assert not list(root.parent.glob(".ade20k.tmp-*"))
    assert sorted(p.name for p in (root / "images").iterdir()) == ["training", "validation"]
    assert sorted(p.name for p in (root / "annotations").iterdir()) == ["training", "validation"]
    for folder, tag, count in SPLITS:
        stems = _stems(tag, count)
        assert sorted(p.name for p in (root / "images" / folder).iterdir()) == [f"{s}.jpg" for s in stems]
        assert sorted(p.name for p in (root / "annotations" / folder).iterdir()) == [f"{s}.png" for s in stems]
        for stem in stems:
            with Image.open(root / "images" / folder / f"{stem}.jpg") as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
            with Image.open(root / "annotations" / folder / f"{stem}.png") as label:
                assert label.format == "PNG" and label.mode == "L" and label.size == (64, 64)
                values = np.unique(np.asarray(label))
            assert values.dtype == np.uint8 and values.min() >= 0 and values.max() <= len(SHAPE_CLASSES)
            assert values.max() >= 1, "every scene shows at least one object"
    assert (root / "class_names.txt").read_text().splitlines() == list(SHAPE_CLASSES)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == shapes_ade20k.ADE_GENERATOR_VERSION
    assert {k: manifest[k] for k in ("seed", "num_train", "num_val", "image_size")} == {"seed": 0, **SMALL}


def test_label_maps_and_images_match_the_rendered_scenes(small_ade: Path) -> None:
    seen = set()
    for split_id, (folder, tag, count) in enumerate(SPLITS):
        for index, stem in enumerate(_stems(tag, count)):
            scene = render_ade20k_scene(shapes_ade20k._image_rng(0, split_id, index), 64)
            expected = np.zeros((64, 64), dtype=np.uint8)
            for instance in scene.instances:
                assert not expected[instance.mask].any(), "instance masks overlap"
                expected[instance.mask] = instance.label + 1
            with Image.open(small_ade / "annotations" / folder / f"{stem}.png") as label:
                assert np.array_equal(np.asarray(label), expected)
            seen.update(np.unique(expected).tolist())

            with Image.open(small_ade / "images" / folder / f"{stem}.jpg") as image:
                on_disk = np.asarray(image, dtype=np.float32)
            stranger = render_ade20k_scene(shapes_ade20k._image_rng(1, split_id, index), 64)
            error = np.abs(on_disk - scene.image).mean()
            assert error < 10.0 and error < 0.5 * np.abs(on_disk - stranger.image).mean()  # this scene, up to JPEG
    assert 0 in seen and len(seen) >= 6


def test_every_painted_object_is_labelled_and_occlusion_is_respected() -> None:
    overlaps = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        scene = render_ade20k_scene(rng, 64)
        labels = semantic_label_map(scene)
        # NOTE: replay the scene's first draws (object count, classes), then render the same background alone
        replay = np.random.default_rng(seed)
        count = int(replay.integers(2, 6))
        classes = replay.integers(len(SHAPE_CLASSES), size=count).tolist()
        background = render_scene(replay, 64, []).image
        changed = (scene.image != background).any(axis=-1)
        assert changed[labels > 0].all(), "a labelled pixel shows the background"
        # anti-aliased fringes (coverage < 0.5) are the only painted pixels left unlabelled
        near = ndimage.binary_dilation(labels > 0, iterations=3)
        assert not (changed & ~near).any(), f"seed {seed}: painted pixels labelled 'other'"
        remaining = iter(classes)
        assert all(i.label in remaining for i in scene.instances), "instances are not the painted classes, in order"
        assert scene.instances, "every scene shows at least one object"
        union = np.zeros((64, 64), dtype=bool)
        for instance in scene.instances:
            overlaps += bool((ndimage.binary_dilation(instance.mask) & union).any())
            union |= instance.mask
        assert np.array_equal(labels > 0, union)
    assert overlaps >= 10, "scenes are expected to overlap often"


def test_dataset_is_deterministic_per_seed(small_ade: Path, tmp_path: Path) -> None:
    same = write_ade20k_dataset(tmp_path / "same", seed=0, **SMALL)
    other = write_ade20k_dataset(tmp_path / "other", seed=1, **SMALL)
    files = sorted(p.relative_to(small_ade) for p in small_ade.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(same) for p in same.rglob("*") if p.is_file())
    assert all((small_ade / f).read_bytes() == (same / f).read_bytes() for f in files)
    data = [f for f in files if f.suffix in (".jpg", ".png")]
    assert len(data) == 30
    assert all((small_ade / f).read_bytes() != (other / f).read_bytes() for f in data)


def test_matching_manifest_is_a_no_op_and_changes_regenerate(tmp_path: Path) -> None:
    root = write_ade20k_dataset(tmp_path / "ade20k", **SMALL)
    before = _snapshot(root)
    assert write_ade20k_dataset(tmp_path / "ade20k", **SMALL) == root
    assert _snapshot(root) == before

    write_ade20k_dataset(root, overwrite=True, **SMALL)
    data = [k for k in before if k.endswith((".jpg", ".png"))]
    assert all(_snapshot(root)[k][0] != before[k][0] for k in data), "files were not rewritten"

    write_ade20k_dataset(root, **{**SMALL, "image_size": 48, "num_val": 3})
    assert json.loads((root / "manifest.json").read_text())["image_size"] == 48
    assert len(list((root / "annotations" / "validation").iterdir())) == 3
    with Image.open(root / "annotations" / "training" / "ADE_train_00000001.png") as label:
        assert label.size == (48, 48)


def test_interrupted_generation_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shapes_ade20k.render_ade20k_scene
    calls = {"n": 0}

    def failing(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] > 12:  # in the val split
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shapes_ade20k, "render_ade20k_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        write_ade20k_dataset(tmp_path / "ade20k", **SMALL)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    killed = tmp_path / ".ade20k.tmp-999-deadbeef"  # what a SIGKILLed run leaves behind
    (killed / "images").mkdir(parents=True)
    monkeypatch.setattr(shapes_ade20k, "render_ade20k_scene", real)
    root = write_ade20k_dataset(tmp_path / "ade20k", **SMALL)
    assert len(list(root.rglob("*.png"))) == 15
    assert not killed.exists()


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "ade20k").mkdir()
    (tmp_path / "ade20k" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="root") as error:
        write_ade20k_dataset(tmp_path / "ade20k", **SMALL)
    assert "\n" not in str(error.value)
    assert (tmp_path / "ade20k" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_train": 0}, "num_train"),
        ({"num_val": -1}, "num_val"),
        ({"image_size": 16}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_write_rejects_bad_input(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as error:
        write_ade20k_dataset(tmp_path / "x", **{**SMALL, **kwargs})
    assert "\n" not in str(error.value)
    assert not (tmp_path / "x").exists()


def test_render_rejects_small_images() -> None:
    with pytest.raises(ValueError, match="image_size"):
        render_ade20k_scene(np.random.default_rng(0), 16)


def test_ensure_demo_ade20k_and_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shapes_ade20k, "write_ade20k_dataset", functools.partial(write_ade20k_dataset, **SMALL))
    path = ensure_demo_ade20k(tmp_path / "demo")
    assert path == tmp_path / "demo" / "ade20k"
    assert len(list((path / "images" / "training").iterdir())) == 10
    before = _snapshot(path)
    assert shapes_ade20k.main(["--root", str(tmp_path / "demo")]) == path
    assert capsys.readouterr().out.strip() == str(path)
    assert _snapshot(path) == before


@pytest.mark.slow
def test_default_demo_dataset(tmp_path: Path) -> None:
    path = ensure_demo_ade20k(tmp_path / "demo")
    for folder, count in (("training", shapes_ade20k.DEMO_NUM_TRAIN), ("validation", shapes_ade20k.DEMO_NUM_VAL)):
        assert len(list((path / "images" / folder).iterdir())) == count
        assert len(list((path / "annotations" / folder).iterdir())) == count
    with Image.open(path / "annotations" / "validation" / "ADE_val_00000001.png") as label:
        assert label.size == (128, 128) and label.mode == "L"
