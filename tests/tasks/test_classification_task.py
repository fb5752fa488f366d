"""Classification task: steps, loss paths, EMA, optimizer groups, LR schedule and scaling rule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tasks.backbone import ConfigError
from tasks.classification import ClassificationTask

BACKBONE = "test_resnet"


def _task(**kwargs) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(backbone=BACKBONE, num_classes=6, **kwargs)


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 32, 32), torch.arange(n) % 6


def _fake_trainer(task: ClassificationTask, *, steps: int, epochs: int, batch: int, world: int = 1, accum: int = 1):
    trainer = SimpleNamespace(
        estimated_stepping_batches=steps,
        num_training_batches=steps * accum // epochs,
        max_epochs=epochs,
        world_size=world,
        accumulate_grad_batches=accum,
        train_dataloader=SimpleNamespace(batch_size=batch),
    )
    task._trainer = trainer  # NOTE: LightningModule.trainer reads this attribute
    return trainer


def test_training_step_gives_finite_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task(label_smoothing=0.1)
    monkeypatch.setattr(task, "log", lambda *a, **k: None)
    monkeypatch.setattr(task, "optimizers", lambda: SimpleNamespace(param_groups=[{"lr": 0.1}]))
    loss = task.training_step(_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)


def test_label_smoothing_matches_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task(label_smoothing=0.2)
    monkeypatch.setattr(task, "log", lambda *a, **k: None)
    monkeypatch.setattr(task, "optimizers", lambda: SimpleNamespace(param_groups=[{"lr": 0.1}]))
    images, targets = _batch()
    task.eval()  # BatchNorm uses running stats, so the forward below is repeatable
    loss = task.training_step((images, targets), 0)
    logp = task(images).log_softmax(-1)
    soft = torch.full_like(logp, 0.2 / 6).scatter_(1, targets[:, None], 1 - 0.2 + 0.2 / 6)
    torch.testing.assert_close(loss, -(soft * logp).sum(-1).mean())


def test_mixup_uses_soft_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task(mixup=0.8, cutmix=1.0)
    monkeypatch.setattr(task, "log", lambda *a, **k: None)
    monkeypatch.setattr(task, "optimizers", lambda: SimpleNamespace(param_groups=[{"lr": 0.1}]))
    seen = {}
    original = task.soft_target_loss.forward

    def spy(x, target):
        seen["target"] = target
        return original(x, target)

    monkeypatch.setattr(task.soft_target_loss, "forward", spy)
    loss = task.training_step(_batch(4), 0)
    assert torch.isfinite(loss)
    target = seen["target"]
    assert target.shape == (4, 6)
    torch.testing.assert_close(target.sum(-1), torch.ones(4))


def test_ema_updates_once_per_optimizer_step_before_checkpoint_hooks(tmp_path) -> None:
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    task = _task(ema_decay=0.5, warmup_epochs=0)
    assert not any(p.requires_grad for p in task.ema.parameters())  # DDP must not wait for EMA gradients
    updates: list[int] = []
    real_update = task.ema.update
    task.ema.update = lambda model, step=None: (updates.append(step), real_update(model, step=step))[1]

    class EmaSeenByCallbacks(L.Callback):
        """What a checkpoint written in on_train_batch_end would hold: the EMA must already include this step."""

        seen: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            self.seen.append(len(updates))

    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 6
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    callback = EmaSeenByCallbacks()
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=loader)
    assert updates == [1, 2]  # 4 batches, accumulation 2: two optimizer steps, one EMA update each, timm's step count
    assert callback.seen == [0, 1, 1, 2]  # updated before the callbacks of the batch that stepped
    assert any(k.startswith("ema.module.") for k in task.state_dict())


def test_no_weight_decay_on_norms_and_biases() -> None:
    task = _task(weight_decay=0.05)
    _fake_trainer(task, steps=100, epochs=10, batch=32)
    optimizer = task.configure_optimizers()["optimizer"]
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in task.model.named_parameters():
        expected = 0.0 if p.ndim <= 1 or name.endswith(".bias") else 0.05
        assert decay_of[id(p)] == expected, name


def test_lr_scaling_rule_and_warmup_cosine_schedule() -> None:
    task = _task(lr=5e-4, lr_base_size=512, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    _fake_trainer(task, steps=100, epochs=10, batch=64, world=4, accum=2)  # global batch 512 -> lr 5e-4
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    peak = 5e-4 * 64 * 4 * 2 / 512

    def lr_at(step: int) -> float:
        scheduler.step_update(num_updates=step)
        return optimizer.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(1e-6)
    assert lr_at(10) == pytest.approx(1e-6 + (peak - 1e-6) * 10 / 20)  # warmup: 2 epochs of 10 steps
    assert lr_at(60) == pytest.approx(1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * 60 / 100)))
    assert lr_at(100) == pytest.approx(1e-5, rel=1e-3)


def test_unknown_backbone_names_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet5O'.*resnet50"):
        ClassificationTask(backbone="resnet5O", num_classes=3)


def test_monitor_must_be_logged() -> None:
    with pytest.raises(ConfigError, match=r"model\.monitor"):
        ClassificationTask(backbone=BACKBONE, num_classes=3, monitor="val/acc")
