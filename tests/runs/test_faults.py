"""Cluster faults on the real command line: signals to a whole process group, a second run on a live run's name,
a mistyped ``--name``, config typos, SLURM tasks racing for the wandb id, corrupt ``last.ckpt`` files.

Each test drives ``train.py`` (in a subprocess where a signal or a second process is involved) on the tiny shapes
dataset, as SLURM, torchrun or a user would, and checks what "nothing lost" means for it: exit code, one-line
errors, the checkpoint loading with ``weights_only=True``, no temporary file left, bit-identical resumed weights.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runs.process_rank import RANK_VARIABLES, is_first_process
from tests.support.cli import TINY_CLASSIFY, main_error_line, run_train, start_train, train_args, train_env

STEPS = 8  # 64 images, batch 16, 2 epochs


def _fit_args(data: Path, out: Path, *extra: str, workers: int = 0) -> list[str]:
    resumable = [
        "--data.init_args.batch_size", "16",
        "--data.init_args.num_workers", str(workers),
        "--data.init_args.persistent_workers", "true",
        "--model.init_args.ema_decay", "null",
        "--trainer.max_epochs", "2",
        "--trainer.deterministic", "true",
        "--save_every_n_steps", "2",
        "--val_overlays", "0",
    ]  # fmt: skip
    return train_args("fit", TINY_CLASSIFY, data, out, "run", *resumable, *extra)


def _callback(name: str, **init_args: object) -> list[str]:
    args = [f"--trainer.callbacks+=tests.support.fault_injection.{name}"]
    return args + [f"--trainer.callbacks.{key}={value}" for key, value in init_args.items()]


def _last(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]


def _slurm_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """One SLURM task's environment, with a stub ``scontrol`` first on PATH that records its arguments."""
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    stub.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "strata", "SLURM_PROCID": "0"}
    slurm |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return {**os.environ, **slurm}, record


@pytest.mark.parametrize("signal_name", ["SIGUSR1", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_a_signal_to_the_whole_process_group_with_workers_saves_requeues_and_resumes_exactly(
    signal_name: str, tiny_imagenet: Path, tmp_path: Path
) -> None:
    """slurmstepd signals every process of the step, DataLoader workers included (``kill -USR1 -PGID``)."""
    env, record = _slurm_env(tmp_path)
    step = random.Random().randrange(2, STEPS - 1)
    signalled = _callback("SignalGroupAtStep", step=step, signal_name=signal_name)
    stopped = run_train(
        _fit_args(tiny_imagenet, tmp_path, *signalled, workers=2), env=env, start_new_session=True, timeout=300
    )
    assert stopped.returncode == 0, (step, stopped.stderr[-3000:])
    assert "DataLoader worker" not in stopped.stderr
    assert _last(tmp_path / "run")[0] == step  # saved at the batch boundary where the signal arrived
    if signal_name == "SIGUSR1":
        assert record.read_text().split() == ["requeue", "4242"] and "Requeued SLURM job 4242" in stopped.stdout
    else:
        assert not record.exists()  # SIGTERM is a stop (scancel, the time limit), not a requeue request
    assert not list((tmp_path / "run").glob(".*.tmp"))

    resumed = run_train(_fit_args(tiny_imagenet, tmp_path, workers=2), timeout=300)
    reference = run_train(_fit_args(tiny_imagenet, tmp_path / "reference", workers=2), timeout=300)
    assert resumed.returncode == 0 and reference.returncode == 0, resumed.stderr[-3000:] + reference.stderr[-3000:]
    (final, weights), (ref_final, ref_weights) = _last(tmp_path / "run"), _last(tmp_path / "reference" / "run")
    assert final == ref_final == STEPS
    assert [k for k in weights if not torch.equal(weights[k], ref_weights[k])] == [], f"signalled at step {step}"


def test_a_second_fit_on_a_running_runs_name_stops_at_once_naming_the_first(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    first = start_train(_fit_args(tiny_imagenet, tmp_path, *_callback("WaitForFileAtStep", step=1, path=release)))
    try:
        lock = tmp_path / ".run.lock-fit"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid
        time.sleep(1.0)
        second = run_train(_fit_args(tiny_imagenet, tmp_path), timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"is already running fit (pid {first.pid} on " in errors[0], second.stderr[-2000:]
        assert "another --name" in errors[0]
    finally:
        release.touch()
        err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, err[-3000:]
    assert _last(tmp_path / "run")[0] == STEPS
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == STEPS
    # the lock died with its process: the same name now resumes (and, finished, just returns)
    again = run_train(_fit_args(tiny_imagenet, tmp_path), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_a_mistyped_name_does_not_score_untrained_weights(
    subcommand: str, tiny_imagenet: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    (tmp_path / "runs" / "my-run" / "best.ckpt").write_bytes(b"")  # a run that exists, to be listed
    argv = train_args(subcommand, TINY_CLASSIFY, tiny_imagenet, tmp_path / "runs", "my-rnu")
    line = main_error_line(argv, capsys, monkeypatch)
    assert f"{subcommand} would score untrained weights: run {tmp_path / 'runs' / 'my-rnu'} has no best.ckpt" in line
    assert "my-run" in line and "check --name, or pass --ckpt_path" in line
    assert (
        not (tmp_path / "runs" / "my-rnu" / subcommand).exists()
        and not (tmp_path / "runs" / "my-rnu" / "predictions").exists()
    )


CONFIG_TYPOS = {
    "unknown task argument": (
        ["--model.init_args.lrr", "1e-3"],
        "--model.init_args.lrr: tasks.classification.ClassificationTask has no argument 'lrr' (did you mean 'lr'?)",
    ),
    "unknown data argument": (
        ["--data.init_args.batch_sise", "3"],
        "--data.init_args.batch_sise: datamodules.imagenet.ImageNetDataModule has no argument 'batch_sise' "
        "(did you mean 'batch_size'",
    ),
    "unknown trainer option": (
        ["--trainer.max_epochz", "3"],
        "--trainer.max_epochz is not an option (did you mean 'trainer.max_epochs'",
    ),
    "wrong type": (["--model.init_args.lr", "abc"], "--model.init_args.lr: expected float, got 'abc'"),
}


@pytest.mark.parametrize("case", CONFIG_TYPOS)
def test_a_config_typo_is_one_line_with_the_closest_names(
    case: str, tiny_imagenet: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    typo, expected = CONFIG_TYPOS[case]
    line = main_error_line(train_args("fit", TINY_CLASSIFY, tiny_imagenet, tmp_path, "run", *typo), capsys, monkeypatch)
    assert line.startswith(f"error: {expected}"), line


def test_a_typo_in_a_config_file_is_one_line(
    tiny_imagenet: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    weight_decai: 0.1\n")
    argv = train_args("fit", TINY_CLASSIFY, tiny_imagenet, tmp_path, "run", "--config", str(extra))
    line = main_error_line(argv, capsys, monkeypatch)
    assert "--model.init_args.weight_decai: " in line and "(did you mean 'weight_decay'?)" in line


class _RunsCommand:
    """A pickle that would run a shell command when unpickled without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _corrupt(kind: str, good: bytes, marker: Path) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "empty":
        return b""
    if kind == "random bytes":
        return random.Random(0).randbytes(4096)
    return pickle.dumps({"state_dict": {}, "payload": _RunsCommand(marker)})


@pytest.mark.parametrize("kind", ["truncated", "empty", "random bytes", "os.system pickle"])
def test_a_corrupt_last_ckpt_stops_fit_in_one_line_and_runs_nothing(
    kind: str,
    tiny_imagenet: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks.classification import ClassificationTask

    good = tmp_path / "good.ckpt"
    task = ClassificationTask(backbone="test_resnet", num_classes=8, ema_decay=None)
    torch.save({"state_dict": task.state_dict(), "global_step": 1}, good)
    marker = tmp_path / "executed"
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "last.ckpt").write_bytes(_corrupt(kind, good.read_bytes(), marker))
    line = main_error_line(_fit_args(tiny_imagenet, tmp_path / "runs"), capsys, monkeypatch)
    assert f"{run_dir / 'last.ckpt'}" in line, line
    assert not marker.exists()  # weights_only refused the global before anything ran


def test_only_the_first_process_of_any_launcher_is_the_first() -> None:
    cases = {
        "plain": ({}, True),
        "srun task 0": ({"SLURM_PROCID": "0"}, True),
        "srun task 3": ({"SLURM_PROCID": "3"}, False),
        "torchrun rank 0 inside srun": ({"SLURM_PROCID": "0", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),
        "torchrun node 1, local rank 0": ({"SLURM_PROCID": "1", "RANK": "8", "LOCAL_RANK": "0"}, False),
        "torchrun rank 1": ({"RANK": "1", "LOCAL_RANK": "1"}, False),
        "Lightning's launcher, child": ({"LOCAL_RANK": "1"}, False),
        "Lightning's launcher, node 1": ({"NODE_RANK": "1"}, False),
    }
    saved = {name: os.environ.pop(name, None) for name in RANK_VARIABLES}
    try:
        for case, (env, expected) in cases.items():
            os.environ.update(env)
            assert is_first_process() is expected, case
            for name in env:
                del os.environ[name]
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})


_START_LOGGERS = """
import sys
from pathlib import Path
from jsonargparse import Namespace
from runs.loggers import point_loggers_at_run
from runs.process_rank import is_first_process
config = Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace())
point_loggers_at_run(config, Path(sys.argv[1]), "run", write_ids=is_first_process())
print(config.init_args.get("id"))
"""


def test_eight_slurm_tasks_starting_loggers_in_one_run_write_one_wandb_id(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _START_LOGGERS, str(run_dir)],
            env=train_env({**os.environ, "SLURM_PROCID": str(task), "SLURM_NTASKS": "8", "WANDB_MODE": "offline"}),
            stdout=subprocess.PIPE,
            text=True,
        )
        for task in range(8)
    ]
    ids = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert all(process.returncode == 0 for process in processes)
    written = (run_dir / "wandb_run_id").read_text().strip()
    assert ids[0] == written  # task 0 wrote the id; every other task either read that same id or has none
    assert set(ids[1:]) <= {written, "None"}


def test_an_error_under_an_open_progress_bar_starts_on_a_fresh_line() -> None:
    import io

    from tqdm import tqdm

    from runs.cli import end_progress_bar_lines

    screen = io.StringIO()
    bar = tqdm(total=10, file=screen, disable=False)
    bar.update(3)
    assert not screen.getvalue().endswith("\n")  # the bar's line is open, as on a terminal
    try:
        end_progress_bar_lines()
        assert screen.getvalue().endswith("\n")
    finally:
        bar.close()


def _val_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [
            {k: v for k, v in row.items() if k.startswith(("epoch", "val/"))}
            for row in csv.DictReader(f)
            if row["val/top1"]
        ]


@pytest.mark.slow
def test_a_signal_during_a_long_validation_stops_it_and_the_resumed_run_repeats_it(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    long_validation = ["--data.init_args.eval_batch_size", "1"]  # 32 validation batches
    signalled = _callback("SignalAtValidationBatch", batch=5, signal_name="SIGTERM")
    stopped = run_train(_fit_args(tiny_imagenet, tmp_path, *long_validation, *signalled), timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "Preempted at step 4: saved" in stopped.stdout  # the end of epoch 0's training, in its validation
    assert _val_rows(tmp_path / "run") == []  # stopped before that validation ended
    resumed = run_train(_fit_args(tiny_imagenet, tmp_path, *long_validation), timeout=300)
    reference = run_train(_fit_args(tiny_imagenet, tmp_path / "reference", *long_validation), timeout=300)
    assert resumed.returncode == 0 and reference.returncode == 0, resumed.stderr[-3000:] + reference.stderr[-3000:]
    assert _val_rows(tmp_path / "run") == _val_rows(tmp_path / "reference" / "run")  # epoch 0 validated in full
    (final, weights), (ref_final, ref_weights) = _last(tmp_path / "run"), _last(tmp_path / "reference" / "run")
    assert final == ref_final == STEPS
    assert [k for k in weights if not torch.equal(weights[k], ref_weights[k])] == []
    best, ref_best = (
        torch.load(d / "best.ckpt", weights_only=True)["global_step"]
        for d in (tmp_path / "run", tmp_path / "reference" / "run")
    )
    assert best == ref_best


@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGTERM"])
def test_a_signal_during_setup_exits_0_and_requeues_on_sigusr1(
    signal_name: str, tiny_imagenet: Path, tmp_path: Path
) -> None:
    env, record = _slurm_env(tmp_path)
    stopped = run_train(
        _fit_args(tiny_imagenet, tmp_path, *_callback("SignalInSetup", signal_name=signal_name)), env=env, timeout=300
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert f"Stopped by {signal_name} while no training step was running: nothing to save." in stopped.stdout
    assert not (tmp_path / "run" / "last.ckpt").exists()
    if signal_name == "SIGUSR1":
        assert record.read_text().split() == ["requeue", "4242"]
    else:
        assert not record.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill", "saved_step"),
    [
        (_callback("KillAfterWriting", file_name="best.ckpt", epoch=0), 4),
        (_callback("SignalAtValidationBatch", batch=5, signal_name="SIGKILL"), 2),
    ],
    ids=["between-best-and-last", "in-validation-after-a-periodic-save"],
)
def test_a_kill_around_the_epoch_end_saves_loses_no_validation_and_best_ckpt_matches_the_summary(
    kill: list[str], saved_step: int, tiny_imagenet: Path, tmp_path: Path
) -> None:
    """Step 4 ends epoch 0 and its validation follows: a periodic last.ckpt there, resumed from, made Lightning skip
    that validation, so that save comes after the validation; a kill inside it resumes from step 2. best.ckpt,
    written before the kill, may be newer than the state resumed from."""
    long_validation = ["--data.init_args.eval_batch_size", "1"]
    killed = run_train(_fit_args(tiny_imagenet, tmp_path, *long_validation, *kill), timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    # after the validation (the periodic save moved there), or before it when the kill came inside it
    assert _last(tmp_path / "run")[0] == saved_step
    resumed = run_train(_fit_args(tiny_imagenet, tmp_path, *long_validation), timeout=300)
    reference = run_train(_fit_args(tiny_imagenet, tmp_path / "reference", *long_validation), timeout=300)
    assert resumed.returncode == 0 and reference.returncode == 0, resumed.stderr[-3000:] + reference.stderr[-3000:]
    run, ref = tmp_path / "run", tmp_path / "reference" / "run"
    # every validation of the reference, in full; rows the killed attempt logged after its checkpoint stay before them
    assert {row["epoch"]: row for row in _val_rows(run)} == {row["epoch"]: row for row in _val_rows(ref)}
    assert len(_val_rows(run)) == len(_val_rows(ref))
    (final, weights), (_, ref_weights) = _last(run), _last(ref)
    assert final == STEPS and [k for k in weights if not torch.equal(weights[k], ref_weights[k])] == []
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    best = torch.load(run / "best.ckpt", weights_only=True)
    assert (summary["best_step"], summary["best_metric"]) == (ref_summary["best_step"], ref_summary["best_metric"])
    assert summary["best_step"] == best["global_step"]
    assert torch.equal(
        best["state_dict"][next(iter(best["state_dict"]))],
        torch.load(ref / "best.ckpt", weights_only=True)["state_dict"][next(iter(best["state_dict"]))],
    )
