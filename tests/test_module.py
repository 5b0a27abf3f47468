"""TimmClassifier: model creation, normalization modes, callbacks, optimizers, config checks."""

from __future__ import annotations

import copy
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from timm.optim import RMSpropTF
from torch import nn

from lightning_brn import RenormSchedule, is_batch_renorm
from lightning_brn.callbacks import BatchRenormScheduler
from lightning_brn.module import TimmClassifier, check_batch_config, create_timm_model

TINY = dict(model_name="test_resnet", num_classes=10, in_chans=1)


def _count(model: nn.Module) -> tuple[int, int]:
    bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    brn = sum(is_batch_renorm(m) for m in model.modules())
    return bn, brn


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet_18'; did you mean 'resnet18'.*--model.model_name"):
        TimmClassifier("resnet_18")
    with pytest.raises(ValueError, match="no close name found"):
        create_timm_model("zzzzqqqq")


def test_brn_converts_every_batchnorm() -> None:
    sched = RenormSchedule(warmup_steps=10, rmax_steps=20, dmax_steps=20, momentum=0.05)
    m = TimmClassifier(**TINY, normalization="brn", renorm_schedule=sched)
    bn, brn = _count(m)
    assert bn == 0 and brn > 0
    assert all(x.momentum == 0.05 and x.rmax == 1.0 for x in m.modules() if is_batch_renorm(x))
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    (cb,) = m.configure_callbacks()
    assert isinstance(cb, BatchRenormScheduler) and cb.schedule is sched


def test_scheduler_callback_only_for_fit() -> None:
    """validate / test / predict run in eval mode: no scheduler, no 'overrides existing callbacks' notice."""
    m = TimmClassifier(**TINY, normalization="brn", renorm_schedule=RenormSchedule())
    m._trainer = Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    m._trainer.state.fn = TrainerFn.FITTING
    (cb,) = m.configure_callbacks()
    assert isinstance(cb, BatchRenormScheduler)
    for fn in (TrainerFn.VALIDATING, TrainerFn.TESTING, TrainerFn.PREDICTING):
        m._trainer.state.fn = fn
        assert m.configure_callbacks() == []


def test_bn_keeps_batchnorm_and_adds_no_callback() -> None:
    m = TimmClassifier(**TINY, normalization="bn")
    bn, brn = _count(m)
    assert bn > 0 and brn == 0
    assert m.configure_callbacks() == []


def test_bn_with_microbatches_is_renorm_frozen_at_batchnorm() -> None:
    sched = RenormSchedule.for_run(1000)
    m = TimmClassifier(**TINY, normalization="bn", microbatch_size=4, renorm_schedule=sched)
    bn, brn = _count(m)
    assert bn == 0 and brn > 0
    assert all(x.microbatch_size == 4 for x in m.modules() if is_batch_renorm(x))
    (cb,) = m.configure_callbacks()
    for step in (0, 500, 10_000):
        v = cb.schedule.values(step)
        assert (v.rmax, v.dmax, v.momentum) == (1.0, 0.0, sched.momentum)


def test_schedule_fitted_to_max_steps() -> None:
    m = TimmClassifier(**TINY, normalization="brn")
    m._trainer = Trainer(max_steps=2600, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert m.resolved_renorm_schedule() == RenormSchedule.for_run(2600)
    explicit = RenormSchedule(warmup_steps=10, rmax_steps=20, dmax_steps=20)
    m.renorm_schedule = explicit
    assert m.resolved_renorm_schedule() is explicit


def test_schedule_needs_run_length() -> None:
    m = TimmClassifier(**TINY, normalization="brn")
    m._trainer = SimpleNamespace(max_steps=-1, estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="--trainer.max_steps"):
        m.resolved_renorm_schedule()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="normalization must be 'bn' or 'brn', got 'gn'"):
        TimmClassifier(**TINY, normalization="gn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"microbatch_size must be >= 1 or None, got microbatch_size=0"):
        TimmClassifier(**TINY, microbatch_size=0)  # (one rule, lightning_brn.validation, as in the layers)
    with pytest.raises(ValueError, match="label_smoothing"):
        TimmClassifier(**TINY, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"timm model 'test_vit' has no batchnorm layer, so normalization='brn'"):
        TimmClassifier("test_vit", num_classes=10, normalization="brn")
    assert _count(TimmClassifier("test_vit", num_classes=10, normalization="bn")) == (0, 0)


def test_check_batch_config_messages() -> None:
    m = TimmClassifier(**TINY, normalization="brn", microbatch_size=4)
    with pytest.raises(ValueError, match=r"batch_size=30 is not divisible by microbatch_size=4.*multiple of 4 \(e.g. 32\)"):
        check_batch_config(m, SimpleNamespace(batch_size=30, num_classes=10, in_chans=1))
    with pytest.raises(ValueError, match="--model.num_classes 100"):
        check_batch_config(m, SimpleNamespace(batch_size=32, num_classes=100, in_chans=1))
    with pytest.raises(ValueError, match="--model.in_chans 3"):
        check_batch_config(m, SimpleNamespace(batch_size=32, num_classes=10, in_chans=3))
    check_batch_config(m, SimpleNamespace(batch_size=32, num_classes=10, in_chans=1))


def test_default_optimizer_is_inception_rmsprop_without_decay_on_norms() -> None:
    m = TimmClassifier(**TINY)
    opt = m.configure_optimizers()
    assert isinstance(opt, RMSpropTF)
    assert opt.defaults["lr"] == 0.045 and opt.defaults["eps"] == 1.0 and opt.defaults["alpha"] == 0.9
    decay, no_decay = opt.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_optimizer_and_scheduler_from_callables() -> None:
    m = TimmClassifier(
        **TINY,
        optimizer=partial(torch.optim.SGD, lr=0.1, weight_decay=1e-4),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.94),
        lr_scheduler_interval="step",
        weight_decay_norm_and_bias=True,
    )
    cfg = m.configure_optimizers()
    assert isinstance(cfg["optimizer"], torch.optim.SGD) and len(cfg["optimizer"].param_groups) == 1
    assert cfg["lr_scheduler"]["interval"] == "step"
    assert isinstance(cfg["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


def test_deepcopy_shares_the_optimizer_factory() -> None:
    """EMAWeightAveraging deep-copies the module: the (CLI-made) factories must be shared, not copied."""
    factory = partial(torch.optim.SGD, lr=0.1)
    m = TimmClassifier(**TINY, optimizer=factory, lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1))
    c = copy.deepcopy(m)
    assert c.optimizer_factory is m.optimizer_factory and c.lr_scheduler_factory is m.lr_scheduler_factory
    assert c.model.fc.weight is not m.model.fc.weight
    assert isinstance(c.configure_optimizers()["optimizer"], torch.optim.SGD)


def test_training_step_logs_and_backprops() -> None:
    m = TimmClassifier(**TINY, normalization="brn", label_smoothing=0.1)
    m.log = lambda *a, **k: None  # type: ignore[method-assign]
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    loss = m.training_step((x, y), 0)
    loss.backward()
    assert loss.ndim == 0 and m.model.fc.weight.grad is not None
    m.eval()
    assert m.predict_step((x, y), 0).sum(-1).allclose(torch.ones(4))


def test_parameter_groups_honour_timms_no_weight_decay():
    module = TimmClassifier("vit_tiny_patch16_224", num_classes=10, normalization="bn")
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"model.cls_token", "model.pos_embed"} <= skipped  # 3-D, named by the model's no_weight_decay()
    assert no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(".weight") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("normalization, taken", [("brn", True), ("bn", False)])
def test_setup_takes_sync_batchnorm_for_renorm_layers(normalization: str, taken: bool) -> None:
    """Trainer(sync_batchnorm=True): TimmClassifier's setup("fit"), which Lightning runs before the strategy applies
    its layer-sync plugin, puts RenormLayerSync in place of Lightning's when the model has renorm layers."""
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from lightning_brn.plugins import RenormLayerSync

    m = TimmClassifier(**TINY, normalization=normalization)
    m._trainer = Trainer(
        accelerator="cpu", devices=1, strategy="ddp", sync_batchnorm=True, logger=False, enable_checkpointing=False,
        enable_progress_bar=False,
    )
    m.setup("validate")  # the plugin is applied for fit only
    assert type(m._trainer.strategy._layer_sync) is TorchSyncBatchNorm
    m.setup("fit")
    assert type(m._trainer.strategy._layer_sync) is (RenormLayerSync if taken else TorchSyncBatchNorm)


def test_setup_refuses_microbatches_with_synchronized_layers() -> None:
    m = TimmClassifier(**TINY, normalization="bn", microbatch_size=2)
    m._trainer = Trainer(
        accelerator="cpu", devices=1, strategy="ddp", sync_batchnorm=True, logger=False, enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(ValueError, match=r"microbatch_size=2 with synchronized renorm layers .*--model.microbatch_size null"):
        m.setup("fit")
