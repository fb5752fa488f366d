"""The ImageNet recipe (configs/imagenet/deit_300e.yaml) against its source: BiFormer's ``main.py`` (DeiT's recipe).

The schedule is compared with timm's own ``CosineLRScheduler`` driven the way ``main.py`` drives it
(``lr_scheduler.step(epoch)`` after each epoch) and with its formula computed here; repeated augmentation with timm's
own ``RepeatAugSampler`` on the same inputs; the per-rank random streams with two real processes.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from timm.data.distributed_sampler import RepeatAugSampler
from timm.scheduler import CosineLRScheduler

import backbones  # noqa: F401  (registers the project's models)
from datamodules.loaders import ResumableSampler
from tasks.classification import ClassificationTask
from tests.support.rank_streams import record_rank_streams

REPO = Path(__file__).resolve().parents[2]


def _recipe() -> dict:
    merged: dict = {}
    for name in ("deit_300e.yaml", "biformer_small.yaml"):
        config = yaml.safe_load((REPO / "configs" / "imagenet" / name).read_text())
        for section, values in config.items():
            if isinstance(values, dict) and isinstance(merged.get(section), dict):
                init = {**merged[section].get("init_args", {}), **values.get("init_args", {})}
                merged[section] = {**merged[section], **values, "init_args": init}
            else:
                merged[section] = values
    return merged


def test_the_schedule_is_mains_per_epoch_cosine() -> None:
    recipe = _recipe()
    trainer_cfg, model_args = recipe["trainer"], recipe["model"]["init_args"]
    task = ClassificationTask(num_classes=1000, **{**model_args, "ema_decay": None})
    world = trainer_cfg["devices"] * trainer_cfg["num_nodes"]
    task.trainer = SimpleNamespace(
        estimated_stepping_batches=300 * 625,
        num_training_batches=625,
        accumulate_grad_batches=1,
        max_epochs=trainer_cfg["max_epochs"],
        world_size=world,
        train_dataloader=SimpleNamespace(batch_size=recipe["data"]["init_args"]["batch_size"]),
    )
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    base = 5e-4 * 128 * world / 512  # main.py:338 linear_scaled_lr = lr * batch_size * world_size / 512
    assert base == 2e-3

    # the reference: timm's scheduler as main.py builds and steps it (create_scheduler(args) -> step(epoch))
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    ref = CosineLRScheduler(ref_opt, t_initial=300, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6, t_in_epochs=True)

    def formula(epoch: int) -> float:  # epoch e trains at the value for t = e - 1 (step(epoch) after the epoch)
        t = max(epoch - 1, 0)
        if t < 5:
            return 1e-6 + t * (base - 1e-6) / 5
        return 1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * t / 300))

    for epoch in range(300):
        ours = [group["lr"] for group in optimizer.param_groups]
        assert ours == pytest.approx([ref_opt.param_groups[0]["lr"]] * len(ours), rel=1e-12), epoch
        assert ours[0] == pytest.approx(formula(epoch), rel=1e-12), epoch
        task.trainer.current_epoch = epoch
        task.lr_scheduler_step(scheduler, None)
        ref.step(epoch)


@pytest.mark.parametrize(("length", "world"), [(1000, 1), (1000, 8), (1281, 3), (37, 2), (300, 16)])
def test_repeated_augmentation_order_is_timms_repeat_aug_sampler(length: int, world: int) -> None:
    dataset = list(range(length))
    for epoch in (0, 1, 7):
        for rank in range(world):
            reference = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True, num_repeats=3)
            reference.set_epoch(epoch)
            # NOTE: seed 0: timm seeds the shuffle with the epoch alone, Strata with seed + epoch
            ours = ResumableSampler(dataset, seed=0, num_repeats=3, num_replicas=world, rank=rank)
            ours.set_epoch(epoch)
            pairs = list(ours)
            assert [index for index, _ in pairs] == list(reference) and len(ours) == len(reference)
            seeds = [seed for _, seed in pairs]
            assert len(set(seeds)) == len(seeds)  # the three repeats of an image are augmented differently


def test_ranks_draw_different_streams_and_each_resumes_its_own(tmp_path: Path) -> None:
    mp.spawn(record_rank_streams, args=(2, 29611, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["first"] != ranks[1]["first"]  # mixup lambdas (numpy) and drop-path masks (torch) differ
    torch.manual_seed(7), np.random.seed(7)
    assert ranks[0]["first"]["torch"] == torch.rand(3).tolist()  # rank 0 keeps the single-process stream
    assert all(r["ranks_saved"] == 2 for r in ranks)  # every rank's streams are in the checkpoint
    assert all(r["resumed"] == r["first"] for r in ranks)  # each rank resumes exactly its own stream
