"""Fault injection on the real command line: SIGKILL mid-training, SIGKILL mid-save, SIGTERM; then rerun and compare.

Every run is a subprocess of ``python train.py fit`` on the tiny shapes dataset (64 training images, batch 8: 8 steps
per epoch, 2 epochs), deterministic CPU mode, a mid-epoch ``last.ckpt`` every 2 steps. The reference is the same
command never interrupted.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.cli import TINY_CLASSIFY, run_train, train_args

STEPS_PER_EPOCH, EPOCHS = 8, 2
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS


def _fit(data: Path, out: Path, *extra: str, num_workers: int = 0) -> subprocess.CompletedProcess:
    """A deterministic 2-epoch fit of 8 steps each, ``last.ckpt`` every 2 steps, drop path on."""
    resumable = [
        "--data.init_args.batch_size", "8",
        "--data.init_args.num_workers", str(num_workers),
        "--model.init_args.drop_path_rate", "0.1",
        "--trainer.max_epochs", str(EPOCHS),
        "--trainer.deterministic", "true",
        "--save_every_n_steps", "2",
    ]  # fmt: skip
    return run_train(train_args("fit", TINY_CLASSIFY, data, out, "run", *resumable, *extra))


def _state(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _kill_callback(name: str, step: int, signal_name: str | None = None) -> list[str]:
    args = [f"--trainer.callbacks+=tests.support.fault_injection.{name}", f"--trainer.callbacks.step={step}"]
    if signal_name:
        args.append(f"--trainer.callbacks.signal_name={signal_name}")
    return args


@pytest.fixture(scope="module")
def reference(tiny_imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("reference")
    result = _fit(tiny_imagenet, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list((out / "run").glob("last-v*.ckpt"))  # the periodic and the per-epoch saves share last.ckpt
    return _state(out / "run")


def test_sigkill_mid_training_then_rerun_gives_identical_weights(
    tiny_imagenet: Path, tmp_path: Path, reference: tuple[int, dict[str, torch.Tensor]]
) -> None:
    kill_step = random.Random().randrange(3, TOTAL_STEPS - 1)
    killed = _fit(tiny_imagenet, tmp_path, *_kill_callback("KillAtStep", kill_step))
    assert killed.returncode == -signal.SIGKILL, (kill_step, killed.stderr[-2000:])
    saved_step, _ = _state(tmp_path / "run")
    # NOTE: the kill comes before that step's own save (checkpoint callbacks run last), so the last one is older
    assert saved_step == (kill_step - 1) - (kill_step - 1) % 2
    resumed = _fit(tiny_imagenet, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, weights = _state(tmp_path / "run")
    assert step == reference[0] == TOTAL_STEPS, f"killed at {kill_step}"
    _assert_same_weights(weights, reference[1])


def test_sigkill_mid_save_leaves_the_previous_checkpoint_and_the_rerun_no_temporary_file(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    killed = _fit(tiny_imagenet, tmp_path, *_kill_callback("KillDuringSave", 6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    step, weights = _state(tmp_path / "run")  # loads with weights_only=True: complete, not truncated
    assert step == 4 and weights
    assert (tmp_path / "run" / ".last.ckpt.tmp").is_file()  # the save of step 6 died half-way
    resumed = _fit(tiny_imagenet, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _state(tmp_path / "run")[0] == TOTAL_STEPS
    assert not list((tmp_path / "run").glob(".*.tmp"))  # the rerun removed what the kill left behind


def test_sigterm_saves_a_checkpoint_exits_0_and_resumes(
    tiny_imagenet: Path, tmp_path: Path, reference: tuple[int, dict[str, torch.Tensor]]
) -> None:
    stopped = _fit(tiny_imagenet, tmp_path, *_kill_callback("KillAtStep", 5, "SIGTERM"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    step, _ = _state(tmp_path / "run")
    assert step == 5  # saved at the batch boundary where the signal arrived, not at the last periodic save (4)
    assert not (tmp_path / "run" / "summary.json").exists()  # stopped, not finished
    resumed = _fit(tiny_imagenet, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final_step, weights = _state(tmp_path / "run")
    assert final_step == TOTAL_STEPS
    _assert_same_weights(weights, reference[1])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == TOTAL_STEPS


REPEATED = ("--data.init_args.repeated_augmentation", "3", "--model.init_args.mixup", "0.8")


def _kill_resume_and_compare(data: Path, out: Path, args: tuple[str, ...], steps: int, first_kill: int) -> None:
    """An uninterrupted run, then one SIGKILLed at a random step and rerun: both end with the same weights."""
    reference = _fit(data, out / "reference", *args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    kill_step = random.Random().randrange(first_kill, steps - 1)
    killed = _fit(data, out / "killed", *args, *_kill_callback("KillAtStep", kill_step))
    assert killed.returncode == -signal.SIGKILL, (kill_step, killed.stderr[-2000:])
    resumed = _fit(data, out / "killed", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, weights = _state(out / "killed" / "run")
    ref_step, ref_weights = _state(out / "reference" / "run")
    assert step == ref_step == steps, f"killed at {kill_step}"
    _assert_same_weights(weights, ref_weights)


def test_sigkill_with_repeated_augmentation_and_mixup_resumes_bit_identical(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    _kill_resume_and_compare(tiny_imagenet, tmp_path, REPEATED, TOTAL_STEPS, first_kill=3)


@pytest.mark.slow
def test_two_process_sigkill_with_repeated_augmentation_resumes_bit_identical(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", *REPEATED)
    # NOTE: each rank sees half of every epoch; mixup lambdas and drop-path masks differ per rank
    _kill_resume_and_compare(tiny_imagenet, tmp_path, ddp, TOTAL_STEPS // 2, first_kill=2)
