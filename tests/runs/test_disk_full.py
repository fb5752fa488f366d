"""A full disk while saving: a one-line ``DiskFullError`` naming the file, the space left and the fix; no temporary
``.<name>.tmp`` left; the previous complete file kept, and a rerun resumes from the last complete checkpoint."""

from __future__ import annotations

import builtins
import csv
import errno
import functools
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import core.files
from core.errors import DiskFullError
from core.files import write_atomically, write_text_atomically
from runs.checkpoint_io import AtomicCheckpointIO
from runs.loggers import AppendingCSVLogger
from tasks.base import StrataTask
from tests.support.cli import REPO, TINY_CLASSIFY, main_error_line, train_args
from train import cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

DISK_FULL = {"ENOSPC": errno.ENOSPC, "EDQUOT": errno.EDQUOT, "EFBIG": errno.EFBIG}


class FullDisk(io.FileIO):
    """A file that takes ``room`` more bytes (they land on disk), then fails every write as a full disk does."""

    def __init__(self, path: Any, mode: str, room: int, code: int = errno.ENOSPC) -> None:
        super().__init__(path, mode)
        self.room, self.code = room, code

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            super().write(data[: self.room])
            self.room = 0
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return super().write(data)


def _fill_disk_on(monkeypatch: pytest.MonkeyPatch, name: str, nth: int = 1, room: int = 1000, code: int = 0) -> list:
    """The ``nth`` open of ``name`` by ``core.files`` (its temporary file) gets a ``FullDisk`` of ``room`` bytes;
    returns the list that collects, at that open, the bytes its destination held."""
    opened, held = [0], []

    def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == name:
            opened[0] += 1
            if opened[0] == nth:
                destination = Path(path).with_name(name.removeprefix(".").removesuffix(".tmp"))
                held.append(destination.read_bytes() if destination.is_file() else None)
                return FullDisk(path, mode, room, code or errno.ENOSPC)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(core.files, "open", fake_open, raising=False)
    return held


def _assert_disk_full_message(message: str, path: Path, code: int) -> None:
    assert message.startswith(f"cannot write {path}: {os.strerror(code)} (") and "\n" not in message
    assert " free on /" in message, message
    assert "or point --out_dir elsewhere; rerun the same command to resume from the last complete checkpoint" in message


@pytest.mark.parametrize("code", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_a_checkpoint_save_that_fills_the_disk_is_one_line_and_keeps_the_previous_checkpoint(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"global_step": 1, "w": torch.zeros(1000)}, path)
    previous = path.read_bytes()
    _fill_disk_on(monkeypatch, ".last.ckpt.tmp", room=len(previous) // 2, code=code)
    with pytest.raises(DiskFullError) as info:
        io_plugin.save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, path)
    _assert_disk_full_message(str(info.value), path, code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no .last.ckpt.tmp
    assert path.read_bytes() == previous


def test_a_text_file_write_that_fills_the_disk_is_one_line_and_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "summary.json"
    write_text_atomically(path, '{"epochs": 1}\n')
    _fill_disk_on(monkeypatch, ".summary.json.tmp", room=4)
    with pytest.raises(DiskFullError) as info:
        write_text_atomically(path, '{"epochs": 2, "global_step": 8}\n')
    _assert_disk_full_message(str(info.value), path, errno.ENOSPC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert path.read_text() == '{"epochs": 1}\n'


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit, ValueError])
def test_any_failure_mid_write_removes_the_temporary_file_and_passes_unchanged(
    interruption: type[BaseException], tmp_path: Path
) -> None:
    path = tmp_path / "best.ckpt"
    path.write_bytes(b"previous")

    def interrupted(f: Any) -> None:
        f.write(b"partial" * 1000)
        f.flush()
        raise interruption()

    with pytest.raises(interruption):
        write_atomically(path, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]
    assert path.read_bytes() == b"previous"


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_the_kernels_own_refusal_through_torch_save_is_a_disk_full_error(tmp_path: Path) -> None:
    """A real ``EFBIG`` from the kernel (``RLIMIT_FSIZE``; Python ignores ``SIGXFSZ``), which ``torch.save``
    re-raises as ``RuntimeError: ... unexpected pos``, in a subprocess so the limit binds nothing else."""
    script = f"""
import resource, sys, torch
from core.errors import DiskFullError
from core.files import write_atomically
path = {str(tmp_path / "last.ckpt")!r}
write_atomically(path, lambda f: torch.save(torch.zeros(10), f))
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    write_atomically(path, lambda f: torch.save(torch.zeros(100_000), f))
except DiskFullError as error:
    print(error)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_disk_full_message(result.stdout.strip(), tmp_path / "last.ckpt", errno.EFBIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True).shape == (10,)


def test_a_metrics_save_that_fills_the_disk_leaves_metrics_csv_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = AppendingCSVLogger(save_dir=str(tmp_path), name="run", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    metrics = tmp_path / "run" / "metrics.csv"
    previous = metrics.read_bytes()
    import fsspec.implementations.local as local_files

    monkeypatch.setattr(local_files, "open", lambda path, mode: FullDisk(path, mode, room=3), raising=False)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    with pytest.raises(DiskFullError, match=rf"^cannot write {metrics}: No space left on device \("):
        logger.save()
    assert metrics.read_bytes() == previous  # the half-appended row is cut off again
    logger.log_metrics({"train/loss": 0.25, "val/top1": 0.5}, step=2)  # a new column: the header is rewritten
    _fill_disk_on(monkeypatch, ".metrics.csv.tmp", room=10)
    with pytest.raises(DiskFullError, match=rf"^cannot write {metrics}: "):
        logger.save()
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["metrics.csv"]
    assert metrics.read_bytes() == previous
    logger.finalize("failed")  # NOTE: a failed run reports its own error, not the logger's full disk
    monkeypatch.undo()
    logger.finalize("success")
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["val/top1"]) for r in rows] == [
        ("0", "1.0", ""),
        ("1", "0.5", ""),
        ("2", "0.25", "0.5"),
    ]


def _count_training_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch index of every ``training_step`` the task runs from now on."""
    calls: list[int] = []
    real = StrataTask.training_step

    @functools.wraps(real)
    def counted(self: StrataTask, batch: Any, batch_idx: int) -> Any:
        calls.append(batch_idx)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(StrataTask, "training_step", counted)
    return calls


def test_fit_whose_second_checkpoint_save_fills_the_disk_stops_in_one_line_and_the_rerun_resumes(
    tiny_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """4 steps of 16 images, ``last.ckpt`` every 2 steps: the save at step 4 (the second) hits a full disk."""
    run_dir = tmp_path / "run"
    args = train_args(
        "fit", TINY_CLASSIFY, tiny_imagenet, tmp_path, "run",
        "--data.init_args.batch_size", "16",
        "--model.init_args.ema_decay", "null",
        "--trainer.max_epochs", "1",
        "--save_every_n_steps", "2",
        "--val_overlays", "0",
    )  # fmt: skip
    held = _fill_disk_on(monkeypatch, ".last.ckpt.tmp", nth=2, room=50_000)
    line = main_error_line(args, capsys, monkeypatch)
    assert line.startswith(f"error: cannot write {run_dir / 'last.ckpt'}: No space left on device ("), line
    assert "point --out_dir elsewhere; rerun the same command to resume from the last complete checkpoint" in line
    assert not list(run_dir.glob(".*.tmp"))
    assert held and (run_dir / "last.ckpt").read_bytes() == held[0]  # the step-2 checkpoint, complete
    assert torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2

    monkeypatch.setattr(core.files, "open", builtins.open, raising=False)
    steps = _count_training_steps(monkeypatch)
    cli = cli_main(args)
    assert f"Using {run_dir / 'last.ckpt'}" in capsys.readouterr().out
    assert cli.trainer.ckpt_path == str(run_dir / "last.ckpt") and cli.trainer.global_step == 4
    assert steps == [2, 3]  # the epoch's last two batches: resumed after step 2, not restarted
    assert torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    assert (run_dir / "summary.json").is_file() and not list(run_dir.glob(".*.tmp"))
