"""``predictions.csv`` is valid UTF-8 whatever the file names: a Linux file name of bytes that are not UTF-8 gets a
row escaped by ``runs.prediction_writers.csv_cell`` that maps back to exactly that file (``path_from_csv``)."""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from pathlib import Path

import pytest

from datamodules.shapes import write_classification_dataset
from runs.prediction_writers import csv_cell, path_from_csv
from tests.support.cli import TINY_CLASSIFY, train_args
from train import cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

LATIN1 = b"caf\xe9.JPEG"  # "café" in Latin-1: not valid UTF-8
LOOKS_ESCAPED = b"lit\\xe9.JPEG"  # valid UTF-8 whose text reads like an escape: its backslash is escaped too


def _unescaped(cell: str) -> bytes:
    """The documented rule, written out here: each ``\\xHH`` of the cell's UTF-8 bytes is the byte ``HH``."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), cell.encode("utf-8"))


@pytest.mark.parametrize(
    ("name", "cell"),
    [
        (b"/d/plain.png", "/d/plain.png"),
        ("/d/café.png".encode(), "/d/café.png"),
        (b"/d/caf\xe9.png", "/d/caf\\xe9.png"),
        (b"/d/a\\b\xff.png", "/d/a\\x5cb\\xff.png"),
        (b"/d/lit\\xe9.png", "/d/lit\\x5cxe9.png"),
        (b"/d/win\\x4.png", "/d/win\\x4.png"),
    ],
)
def test_a_cell_is_utf8_and_maps_back_to_the_exact_name(name: bytes, cell: str) -> None:
    written = csv_cell(os.fsdecode(name))
    assert written == cell
    assert os.fsencode(path_from_csv(written)) == _unescaped(written) == name


def _accepts_non_utf8_names(folder: Path) -> bool:
    probe = os.fsencode(folder) + b"/probe\xe9"
    try:
        with open(probe, "wb"):
            pass
    except OSError:
        return False
    os.remove(probe)
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16 text, never undecodable bytes")
def test_predict_writes_utf8_and_a_row_that_maps_back_to_a_non_utf8_file_name(tmp_path: Path) -> None:
    root = write_classification_dataset(tmp_path / "data", num_train_per_class=1, num_val_per_class=2, image_size=16)
    if not _accepts_non_utf8_names(root):
        pytest.skip(f"the filesystem of {tmp_path} refuses file names that are not valid UTF-8 (APFS, some NAS mounts)")
    first, second = sorted((root / "val").rglob("*.JPEG"))[:2]
    folder = os.fsencode(first.parent)
    content = first.read_bytes()
    os.rename(os.fsencode(first), folder + b"/" + LATIN1)
    os.rename(os.fsencode(second), folder + b"/" + LOOKS_ESCAPED)
    images = sorted(
        os.path.join(top, name) for top, _, names in os.walk(os.fsencode(root / "val")) for name in names
    )  # NOTE: bytes, as the filesystem holds them
    assert len(images) == 16

    cli_main(train_args("predict", TINY_CLASSIFY, root, tmp_path / "runs", "p", "--allow_untrained", "true"))
    text = (tmp_path / "runs" / "p" / "predictions.csv").read_bytes().decode("utf-8")  # strict: valid UTF-8
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert sorted(_unescaped(row["path"]) for row in rows) == images  # a row for every image, each its own
    cells = {_unescaped(row["path"]): row["path"] for row in rows}
    assert cells[folder + b"/" + LATIN1] == first.parent.as_posix() + "/caf\\xe9.JPEG"
    assert cells[folder + b"/" + LOOKS_ESCAPED] == first.parent.as_posix() + "/lit\\x5cxe9.JPEG"
    with open(path_from_csv(cells[folder + b"/" + LATIN1]), "rb") as f:
        assert f.read() == content
    plain = [cell for raw, cell in cells.items() if b"caf" not in raw and b"lit" not in raw]
    assert len(plain) == 14 and all(Path(cell).is_file() for cell in plain)  # valid UTF-8 names: as is
    assert not list((tmp_path / "runs" / "p").glob(".*.tmp"))
