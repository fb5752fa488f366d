"""Resuming ``fit`` after a change: settings that shape the training trajectory refuse in one line and leave the run
as it was; settings that do not (workers, callbacks) resume. Gradient accumulation: a stop signal between the
micro-batches of a step waits for the step, and the resumed run matches an uninterrupted one bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.support.cli import TINY_CLASSIFY, main_error_line, run_train, train_args

STEPS = 8  # 64 images, batch 16, 2 epochs


def _fit_args(data: Path, out: Path, *extra: str) -> list[str]:
    resumable = [
        "--data.init_args.batch_size", "16",
        "--model.init_args.ema_decay", "null",
        "--trainer.max_epochs", "2",
        "--trainer.deterministic", "true",
        "--save_every_n_steps", "2",
        "--val_overlays", "0",
    ]  # fmt: skip
    return train_args("fit", TINY_CLASSIFY, data, out, "run", *resumable, *extra)


def _last(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]


@pytest.fixture(scope="module")
def interrupted(tiny_imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run killed after step 3: its last.ckpt is the periodic one of step 2."""
    out = tmp_path_factory.mktemp("interrupted")
    killed = run_train(
        _fit_args(
            tiny_imagenet,
            out,
            "--trainer.callbacks+=tests.support.fault_injection.KillAtStep",
            "--trainer.callbacks.step=3",
        )
    )
    assert killed.returncode != 0 and _last(out / "run")[0] == 2, killed.stderr[-2000:]
    return out


def _copy(interrupted: Path, tmp_path: Path) -> Path:
    shutil.copytree(interrupted / "run", tmp_path / "run")
    return tmp_path


@pytest.mark.parametrize(
    ("change", "field", "old", "new"),
    [
        (["--data.init_args.batch_size", "32"], "data.init_args.batch_size", "16", "32"),
        (["--model.init_args.lr", "0.01"], "model.init_args.lr", "0.003", "0.01"),
        (["--trainer.max_epochs", "3"], "trainer.max_epochs", "2", "3"),
        (["--trainer.accumulate_grad_batches", "2"], "trainer.accumulate_grad_batches", "1", "2"),
        (
            ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
            "the number of ranks (--trainer.devices x --trainer.num_nodes)",
            "1",
            "2",
        ),
    ],
    ids=["batch-size", "lr", "epochs", "accumulation", "ranks"],
)
def test_a_resume_that_changes_the_trajectory_refuses_in_one_line_and_changes_nothing(
    change: list[str], field: str, old: str, new: str, tiny_imagenet: Path, interrupted: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    out = _copy(interrupted, tmp_path)
    before = {path.name: path.read_bytes() for path in (out / "run").iterdir() if path.is_file()}
    line = main_error_line(_fit_args(tiny_imagenet, out, *change), capsys, monkeypatch)
    assert f"was trained with {field}={old}, this command gives {new}" in line, line
    assert "keep" in line and "another --name" in line
    after = {path.name: path.read_bytes() for path in (out / "run").iterdir() if path.is_file()}
    assert after == before  # config.yaml, metrics.csv and last.ckpt untouched


def test_a_resume_that_changes_only_workers_and_callbacks_continues(
    tiny_imagenet: Path, interrupted: Path, tmp_path: Path
) -> None:
    out = _copy(interrupted, tmp_path)
    extra = [
        "--data.init_args.num_workers",
        "1",
        "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
    ]
    resumed = run_train(_fit_args(tiny_imagenet, out, *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _last(out / "run")[0] == STEPS


@pytest.mark.slow
def test_a_signal_between_accumulated_micro_batches_waits_for_the_step_and_resumes_exactly(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    accumulate = ["--data.init_args.batch_size", "8", "--trainer.accumulate_grad_batches", "2"]
    signalled = ["--trainer.callbacks+=tests.support.fault_injection.SignalAtBatch", "--trainer.callbacks.batch=6"]
    stopped = run_train(_fit_args(tiny_imagenet, tmp_path, *accumulate, *signalled))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    # micro-batch 6 (0-based) is the first half of step 4: the stop comes after its second half
    assert "Preempted at step 4: saved" in stopped.stdout and _last(tmp_path / "run")[0] == 4
    resumed = run_train(_fit_args(tiny_imagenet, tmp_path, *accumulate))
    reference = run_train(_fit_args(tiny_imagenet, tmp_path / "reference", *accumulate))
    assert resumed.returncode == 0 and reference.returncode == 0, resumed.stderr[-3000:] + reference.stderr[-3000:]
    (final, weights), (ref_final, ref_weights) = _last(tmp_path / "run"), _last(tmp_path / "reference" / "run")
    assert final == ref_final == STEPS
    assert [k for k in weights if not torch.equal(weights[k], ref_weights[k])] == []
