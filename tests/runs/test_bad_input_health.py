"""Training health: non-finite losses skip their step and stop the run past a limit with the last good checkpoint
kept; fp16 overflow is counted; non-finite weights never reach a checkpoint (issue 9, training health)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.errors import TrainingHealthError
from runs.health import RunHealth
from tasks.classification import ClassificationTask
from tasks.nonfinite import NonFiniteLossGuard

BATCHES = 6


def _loader(nan_batches: set[int], batch: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCHES * batch, 3, 32, 32, generator=generator)
    for b in nan_batches:
        images[b * batch] = float("nan")  # one poisoned image makes the whole batch's loss NaN
    labels = torch.arange(BATCHES * batch) % 4
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)


def _task(max_nonfinite_steps: int) -> ClassificationTask:
    L.seed_everything(0)
    return ClassificationTask(
        backbone="test_resnet",
        num_classes=4,
        ema_decay=None,
        lr=1e-3,
        lr_base_size=None,
        warmup_epochs=0,
        max_nonfinite_steps=max_nonfinite_steps,
    )


def _fit(
    tmp_path: Path, nan_batches: set[int], max_nonfinite_steps: int, task: ClassificationTask | None = None
) -> tuple[ClassificationTask, L.Trainer]:
    task = task or _task(max_nonfinite_steps)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[checkpoint, RunHealth()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=_loader(nan_batches))
    return task, trainer


def _finite(module: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())


def test_a_nan_batch_is_skipped_counted_and_training_finishes(tmp_path: Path) -> None:
    task, trainer = _fit(tmp_path, nan_batches={2}, max_nonfinite_steps=2)
    assert task.nonfinite_guard.count == 1
    assert trainer.global_step == BATCHES  # NOTE: a skipped step still counts (no gradients, so no update)
    assert _finite(task)  # weights and BatchNorm statistics untouched by the NaN forward pass
    health = next(cb for cb in trainer.callbacks if isinstance(cb, RunHealth))
    assert health.summary == {"skipped_samples": 0, "nonfinite_steps": 1, "overflow_steps": 0}


def test_skipped_steps_leave_weights_and_optimizer_state_alone(tmp_path: Path) -> None:
    task = _task(max_nonfinite_steps=BATCHES)
    initial = {k: v.clone() for k, v in task.state_dict().items()}
    _, trainer = _fit(tmp_path, nan_batches=set(range(BATCHES)), max_nonfinite_steps=BATCHES, task=task)
    assert task.nonfinite_guard.count == BATCHES
    # no weight decay, no momentum, no BatchNorm update: every tensor as it started
    assert all(torch.equal(v, initial[k]) for k, v in task.state_dict().items())
    assert not trainer.optimizers[0].state  # AdamW never saw a gradient


def test_too_many_nan_batches_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingHealthError) as info:
        _fit(tmp_path, nan_batches={1, 3, 4}, max_nonfinite_steps=2)
    message = str(info.value)
    assert "\n" not in message
    assert "not finite in 3 steps (the last at step 4)" in message and "max_nonfinite_steps=2" in message
    assert f"the last good checkpoint is {tmp_path / 'last.ckpt'}" in message
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # written after batch 3 (a skipped one: finite weights), not after batch 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_guard_restores_batchnorm_statistics_after_a_bad_forward() -> None:
    guard = NonFiniteLossGuard(max_nonfinite_steps=0)
    module = nn.BatchNorm1d(3)
    guard.before_forward(module)
    before = module.running_mean.clone()
    out = module(torch.tensor([[1.0, float("nan"), 2.0], [0.0, 1.0, 3.0]]))
    assert not torch.isfinite(module.running_mean).all()
    with pytest.raises(TrainingHealthError, match="max_nonfinite_steps=0"):
        guard(module, out.sum())  # NOTE: a bare nn.Module: no trainer, limit 0 -> stops at the first
    assert torch.equal(module.running_mean, before) and guard.count == 1
    finite = torch.tensor(1.0)
    assert guard(module, finite) is finite and not guard.skipping


def test_a_skipped_step_backpropagates_zeros_then_drops_the_gradients() -> None:
    guard = NonFiniteLossGuard(max_nonfinite_steps=3)
    module = nn.Linear(3, 2)
    guard.before_forward(module)
    stand_in = guard(module, module(torch.full((1, 3), float("nan"))).sum())
    assert guard.skipping and stand_in.item() == 0.0
    stand_in.backward()  # NOTE: what DDP all-reduces: zeros for every parameter, the same on every rank
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())
    guard.drop_skipped_step(module)
    assert all(p.grad is None for p in module.parameters()) and not guard.skipping


def test_fp16_run_skips_a_nan_batch_and_counts_the_scaler_overflows(tmp_path: Path) -> None:
    # NOTE: a real GradScaler on CPU fp16 autocast (Lightning's own CPU "16-mixed" has none)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    task = _task(max_nonfinite_steps=2)
    health = RunHealth()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[health],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=_loader({3}))
    assert task.nonfinite_guard.count == 1 and _finite(task)
    assert health.summary["overflow_steps"] >= 1  # 2**24 overflows fp16 gradients at once
    assert scaler.get_scale() == 2.0**24 / 2 ** health.summary["overflow_steps"]  # each overflow halved it once


def test_non_finite_weights_never_reach_a_checkpoint() -> None:
    module = nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = math.inf
    trainer = SimpleNamespace(global_step=7, checkpoint_callback=None)
    with pytest.raises(TrainingHealthError, match=r"before saving a checkpoint: 1 parameters are not finite \(weight"):
        RunHealth().on_save_checkpoint(trainer, module, {})


_DDP_SCRIPT = """
import sys
import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, sys.argv[1])
from tasks.classification import ClassificationTask

L.seed_everything(0)
images, labels = torch.randn(64, 3, 32, 32), torch.arange(64) % 4
images[5] = float("nan")  # index 5 goes to rank 1 only: one bad batch per epoch there, none on rank 0
task = ClassificationTask(
    backbone="test_resnet", num_classes=4, ema_decay=None, lr_base_size=None, warmup_epochs=0, max_nonfinite_steps=2
)
trainer = L.Trainer(
    max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
    enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
)
trainer.fit(task, train_dataloaders=DataLoader(TensorDataset(images, labels), batch_size=4))
first = next(task.parameters()).detach().flatten()[:4].tolist()
finite = all(bool(torch.isfinite(t).all()) for t in [*task.parameters(), *task.buffers()] if t.is_floating_point())
result = f"RESULT rank={trainer.global_rank} count={task.nonfinite_guard.count} finite={finite} first={first}"
open(f"result_{trainer.global_rank}.txt", "w").write(result)  # one file per rank: prints to a shared pipe interleave
"""


@pytest.mark.slow
def test_ddp_ranks_skip_the_same_steps(tmp_path: Path) -> None:
    script = tmp_path / "ddp_guard.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, str(script), repo], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    results = [
        (tmp_path / f"result_{rank}.txt").read_text() for rank in (0, 1) if (tmp_path / f"result_{rank}.txt").exists()
    ]
    assert len(results) == 2, out.stderr[-2000:]
    # the bad batch was on rank 1 only, yet both ranks skipped both steps and hold the same finite weights
    assert all("count=2 finite=True" in line for line in results)
    assert results[0].split("first=")[1] == results[1].split("first=")[1]
