"""Faults in 2-process DDP (gloo, CPU) under Lightning's launcher, through the real command line.

A stop signal to both ranks, to rank 0 only or to rank 1 only must stop every rank at the same step with
``last.ckpt`` saved and exit code 0 (Lightning's own handler ran a collective inside the signal handler: a signal to
one rank hung the job); SIGKILL of one rank must end every rank within 60 s. In each case the rerun resumes and ends
with weights bit-identical to an uninterrupted 2-rank run.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from tests.support.cli import TINY_CLASSIFY, run_train, start_train, train_args

STEPS = 8  # 64 images, 8 per rank and step, 2 epochs
EXIT_WITHIN_S = 60


def _fit_args(data: Path, out: Path, *extra: str) -> list[str]:
    ddp = [
        "--data.init_args.batch_size", "8",
        "--model.init_args.ema_decay", "null",
        "--trainer.max_epochs", "2",
        "--trainer.deterministic", "true",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
        "--save_every_n_steps", "2",
        "--val_overlays", "0",
    ]  # fmt: skip
    return train_args("fit", TINY_CLASSIFY, data, out, "run", *ddp, *extra)


def _weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]


@pytest.fixture(scope="module")
def reference(tiny_imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ddp_reference")
    result = run_train(_fit_args(tiny_imagenet, out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    step, weights = _weights(out / "run")
    assert step == STEPS
    return weights


class Stopped(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    step: int
    seconds: float  # from the first signal until the last process of the run ended


def _signalled_run(data: Path, out: Path, signal_name: str, ranks: list[int]) -> Stopped:
    """The run, with ``signal_name`` sent to ``ranks`` at a random step; it leads its own process group, so the
    time until the group is empty counts every rank (an orphaned rank 1 included)."""
    step = random.Random().randrange(2, STEPS - 1)
    stamp = out / "signalled_at"
    callbacks: list[str] = []
    for rank in ranks:
        callbacks += ["--trainer.callbacks+=tests.support.fault_injection.SignalRankAtStep"]
        callbacks += [f"--trainer.callbacks.step={step}", f"--trainer.callbacks.rank={rank}"]
        callbacks += [f"--trainer.callbacks.signal_name={signal_name}", f"--trainer.callbacks.stamp={stamp}{rank}"]
    stdout, stderr, returncode = _run_until_the_group_ends(_fit_args(data, out, *callbacks))
    return Stopped(returncode, stdout, stderr, step, time.time() - min(_stamps(stamp, ranks)))


def _run_until_the_group_ends(args: list[str]) -> tuple[str, str, int]:
    """Run ``train.py args`` as the leader of its own process group and return (stdout, stderr, exit code) once
    every process of the group has ended (at most 10 minutes, then the group is killed and the test fails)."""
    process = start_train(args, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        stdout, stderr = process.communicate(timeout=600)
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return stdout, stderr, process.returncode
            time.sleep(0.2)
        raise AssertionError("a rank outlived the run's main process by 10 minutes")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _stamps(stamp: Path, ranks: list[int]) -> list[float]:
    return [float(Path(f"{stamp}{rank}").read_text()) for rank in ranks]


def _resumes_to_the_reference(data: Path, out: Path, reference: dict[str, torch.Tensor], note: object) -> None:
    resumed = run_train(_fit_args(data, out), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, weights = _weights(out / "run")
    assert step == STEPS
    assert [k for k in weights if not torch.equal(weights[k], reference[k])] == [], note


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signal_name", "ranks"),
    [("SIGTERM", [0, 1]), ("SIGTERM", [0]), ("SIGTERM", [1]), ("SIGUSR1", [1])],
    ids=["sigterm-both", "sigterm-rank0", "sigterm-rank1", "sigusr1-rank1"],
)
def test_a_stop_signal_to_any_ranks_stops_all_at_one_step_and_resumes_exactly(
    signal_name: str, ranks: list[int], tiny_imagenet: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    stopped = _signalled_run(tiny_imagenet, tmp_path, signal_name, ranks)
    step = stopped.step
    assert stopped.returncode == 0, (step, stopped.stderr[-3000:])
    assert stopped.seconds < EXIT_WITHIN_S
    assert f"Preempted at step {step}: saved" in stopped.stdout
    assert _weights(tmp_path / "run")[0] == step
    assert not list((tmp_path / "run").glob(".*.tmp"))
    _resumes_to_the_reference(tiny_imagenet, tmp_path, reference, f"signalled at step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_rank_ends_every_rank_within_a_minute_and_the_rerun_resumes_exactly(
    rank: int, tiny_imagenet: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    stopped = _signalled_run(tiny_imagenet, tmp_path, "SIGKILL", [rank])
    assert stopped.returncode != 0
    assert stopped.seconds < EXIT_WITHIN_S, f"rank {rank} killed at step {stopped.step}: {stopped.seconds:.0f} s"
    assert not list((tmp_path / "run").glob(".*.tmp"))
    _resumes_to_the_reference(tiny_imagenet, tmp_path, reference, f"rank {rank} killed at step {stopped.step}")


def test_a_ddp_strategy_named_by_string_gets_the_bounded_collective_timeout() -> None:
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from core.errors import ConfigError
    from runs.strategies import ddp_with_timeout

    strategy = ddp_with_timeout("ddp_find_unused_parameters_true", 2.5)
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(minutes=2.5)
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}
    configured = DDPStrategy(timeout=timedelta(minutes=1))
    assert ddp_with_timeout(configured, 10) is configured and ddp_with_timeout("auto", 10) == "auto"
    with pytest.raises(ConfigError, match="collective_timeout 0 is in minutes"):
        ddp_with_timeout("ddp", 0)


@pytest.mark.slow
def test_a_stalled_rank_fails_the_job_after_the_collective_timeout_not_30_minutes(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    stamp = tmp_path / "stalled_at"
    stall = ["--trainer.callbacks+=tests.support.fault_injection.StallRankAtStep", "--trainer.callbacks.step=3"]
    stall += ["--trainer.callbacks.rank=1", "--trainer.callbacks.seconds=600", f"--trainer.callbacks.stamp={stamp}"]
    _, _, returncode = _run_until_the_group_ends(
        _fit_args(tiny_imagenet, tmp_path, *stall, "--collective_timeout", "0.25")
    )
    seconds = time.time() - float(stamp.read_text())
    assert returncode != 0
    assert seconds < EXIT_WITHIN_S, f"the job ended {seconds:.0f} s after rank 1 stalled (timeout 15 s)"
    assert _weights(tmp_path / "run")[0] == 2  # the last periodic save is intact, to resume from
