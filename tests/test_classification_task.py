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
        max_epochs=epochs,
        world_size=world,
        accumulate_grad_batches=accum,
        datamodule=SimpleNamespace(hparams=SimpleNamespace(batch_size=batch)),
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


def test_ema_tracks_weights_once_per_step() -> None:
    task = _task(ema_decay=0.5)
    ema_param = next(task.ema.module.parameters())
    param = next(task.model.parameters())
    before = ema_param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    task._trainer = SimpleNamespace(global_step=5)  # past timm's first steps, where the EMA copies the weights
    task.on_train_batch_end(None, None, 0)
    torch.testing.assert_close(ema_param, before + 0.5)
    task.on_train_batch_end(None, None, 1)  # same optimizer step (gradient accumulation): no second update
    torch.testing.assert_close(ema_param, before + 0.5)
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
