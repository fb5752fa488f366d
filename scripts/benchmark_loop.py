"""Training-loop comparison: Lightning's ``Trainer.fit`` against a plain PyTorch loop, same model, same data.

Both loops train the same ``tasks.classification.ClassificationTask`` instance (its model, its forward with the
channels-last and compile options, its EMA) on the same in-memory batches of the demo dataset (decoded and
transformed once, so data loading costs the same in both), and do the same work per step: forward, label-smoothed
cross-entropy, backward, gradient clipping, AdamW step, per-iteration cosine schedule, EMA update. The Lightning side
adds what a run has: the task's ``self.log`` calls, a CSV logger writing every ``log_every_n_steps`` (10, as the
demo config) and its hooks; progress bar, checkpointing and validation are off (they are per epoch or interactive).

A step's time is the interval between the starts of consecutive steps (Lightning: ``on_train_batch_start``; plain:
the top of the loop body), so it includes fetching the batch and all the loop's bookkeeping; measured in process CPU
time on a single-threaded CPU run (``benchmark_common.timer``), else wall time. The per-run wall times (Lightning's
including its setup) are reported beside. The two loops
alternate, ``steps`` steps each, for ``rounds`` rounds; the first interval of every round is dropped as warmup.
``overhead = median(lightning) / median(plain) - 1``; the target is <= 3%.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from benchmark_common import autocast, timer
from lightning.pytorch.loggers import CSVLogger
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, TensorDataset

from datamodules.imagenet import ImageNetDataModule
from tasks.classification import ClassificationTask

__all__ = ["compare_loops"]

CLIP = 5.0  # gradient_clip_val of configs/demo/classify.yaml


class _StepTimer(L.Callback):
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.starts.append(self.clock())


def _demo_batches(root: str, img_size: int, count: int) -> TensorDataset:
    dm = ImageNetDataModule(root, img_size=img_size, crop_pct=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), num_workers=0)
    dm.setup("fit")
    if len(dm.train_set) < count:
        raise ValueError(f"--data-root {root} has {len(dm.train_set)} training images, fewer than {count} needed")
    step = len(dm.train_set) // count  # NOTE: spread over the classes (the folder scan is sorted by class)
    samples = [dm.train_set[i * step] for i in range(count)]
    return TensorDataset(torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples]))


def _plain_loop(task: ClassificationTask, loader: DataLoader, device: str, precision: str, log_dir: str):
    hp = task.hparams
    steps = len(loader)
    optimizer = create_optimizer_v2(task.model, opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=steps, lr_min=hp.min_lr, warmup_t=round(hp.warmup_epochs * steps),
        warmup_lr_init=hp.warmup_lr, t_in_epochs=False,
    )  # fmt: skip
    task.train()
    t0 = time.perf_counter()
    starts, loss_sum = [], torch.zeros((), device=device)
    for step, (images, targets) in enumerate(loader):
        starts.append(timer(device)[0]())
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = F.cross_entropy(task(images), targets, label_smoothing=hp.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.model.parameters(), CLIP)
        optimizer.step()
        scheduler.step_update(num_updates=step + 1)
        if task.ema is not None:
            task.ema.update(task.model, step=step + 1)
        loss_sum += loss.detach()
    if device == "cuda":
        torch.cuda.synchronize()
    return starts, time.perf_counter() - t0


def _lightning_loop(task: ClassificationTask, loader: DataLoader, device: str, precision: str, log_dir: str):
    step_timer = _StepTimer(timer(device)[0])
    trainer = L.Trainer(
        accelerator=device, devices=1, max_steps=len(loader), max_epochs=1,
        precision="bf16-mixed" if precision == "bf16" else "32-true", gradient_clip_val=CLIP,
        logger=CSVLogger(log_dir), log_every_n_steps=10, callbacks=[step_timer], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(task, train_dataloaders=loader)
    return step_timer.starts, time.perf_counter() - t0


def compare_loops(
    model: str = "strata_hybrid_pico",
    data_root: str = "data/demo/imagenet",
    img_size: int = 64,
    batch_size: int = 64,
    steps: int = 6,
    rounds: int = 3,
    device: str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> dict[str, object]:
    """Median step time of each loop and Lightning's overhead; see the module docstring."""
    if steps < 3:
        raise ValueError(f"--steps must be at least 3 (a round's first step is warmup), got {steps}")
    torch.manual_seed(0)
    data = _demo_batches(data_root, img_size, batch_size * steps)
    num_classes = int(data.tensors[1].max()) + 1
    task = ClassificationTask(
        backbone=model, num_classes=num_classes, lr=3e-3, lr_base_size=None, warmup_epochs=1, ema_decay=0.998,
        ema_warmup=True, channels_last=channels_last, compile=compile,
    )  # fmt: skip
    task.to(device)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen)
    intervals: dict[str, list[float]] = {"plain": [], "lightning": []}
    walls: dict[str, list[float]] = {"plain": [], "lightning": []}
    per_round: list[float] = []
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(rounds):
            for name, loop in (("plain", _plain_loop), ("lightning", _lightning_loop)):
                starts, wall = loop(task, loader, device, precision, log_dir)
                walls[name].append(wall)
                intervals[name] += [b - a for a, b in itertools.pairwise(starts[1:])]
            per_round.append(statistics.median(intervals["lightning"][-steps + 2 :]))
            per_round[-1] /= statistics.median(intervals["plain"][-steps + 2 :])
    row: dict[str, object] = dict(
        model=model, img_size=img_size, batch=batch_size, steps=steps, rounds=rounds, device=device,
        precision=precision, channels_last=channels_last, compile=compile,
    )  # fmt: skip
    row["plain_ms"] = 1e3 * statistics.median(intervals["plain"])
    row["lightning_ms"] = 1e3 * statistics.median(intervals["lightning"])
    row["overhead_pct"] = 100 * (row["lightning_ms"] / row["plain_ms"] - 1)
    row["plain_wall_s"] = statistics.median(walls["plain"])
    row["lightning_fit_wall_s"] = statistics.median(walls["lightning"])
    row["intervals"] = len(intervals["plain"])
    row["overhead_pct_per_round"] = " ".join(f"{100 * (r - 1):+.1f}" for r in per_round)
    return row
