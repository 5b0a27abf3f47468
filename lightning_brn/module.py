"""A LightningModule that trains any timm classifier with batchnorm or Batch Renorm.

Examples::

    >>> import torch
    >>> from lightning_brn.module import TimmClassifier
    >>> m = TimmClassifier("resnet10t", num_classes=10, in_chans=1, normalization="brn")
    >>> m(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> from lightning_brn import is_batch_renorm
    >>> any(is_batch_renorm(x) for x in m.modules())
    True
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_brn.convert import convert_model
from lightning_brn.schedule import RenormSchedule
from lightning_brn.validation import check_float, check_int, check_microbatch_size

__all__ = ["TimmClassifier", "create_timm_model", "check_batch_config"]

Normalization = Literal["bn", "brn"]


def create_timm_model(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)`` with an error that suggests close names.

    Examples::

        >>> create_timm_model("resnet_18")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown timm model 'resnet_18'; did you mean 'resnet18'...
    """
    import timm

    try:
        return timm.create_model(model_name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        names = timm.list_models()
        close = difflib.get_close_matches(model_name, names, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(repr(n) for n in close)}?" if close else "no close name found"
        raise ValueError(
            f"unknown timm model {model_name!r}; {hint} (set --model.model_name to one of timm.list_models(), "
            f"{len(names)} names)"
        ) from None


def check_batch_config(model: "TimmClassifier", datamodule: Any) -> None:
    """Raise before training if the data module's batches do not fit the model's settings.

    Checks that ``microbatch_size`` divides the per-process batch size, that the data has no
    more classes than the model outputs, and that the channel counts agree.

    Raises:
        ValueError: naming the mismatch and the option to change.

    Examples::

        >>> from types import SimpleNamespace
        >>> model = TimmClassifier("test_resnet", num_classes=10, in_chans=1, microbatch_size=4)
        >>> check_batch_config(model, SimpleNamespace(batch_size=32, num_classes=10, in_chans=1))  # fits
        >>> check_batch_config(model, SimpleNamespace(batch_size=30, num_classes=10, in_chans=1))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: batch_size=30 is not divisible by microbatch_size=4: ...
    """
    batch_size = getattr(datamodule, "batch_size", None)
    mb = model.microbatch_size
    if mb is not None and batch_size is not None and batch_size % mb:
        multiple = -(-batch_size // mb) * mb
        divisors = [d for d in range(2, batch_size + 1) if batch_size % d == 0]
        raise ValueError(
            f"batch_size={batch_size} is not divisible by microbatch_size={mb}: each batch is split into groups of "
            f"{mb}. Set --data.init_args.batch_size to a multiple of {mb} (e.g. {multiple}) or --model.microbatch_size "
            f"to a divisor of {batch_size} ({divisors})"
        )
    n_data = getattr(datamodule, "num_classes", None)
    if n_data is not None and n_data > model.num_classes:
        raise ValueError(
            f"the data has {n_data} classes but the model outputs num_classes={model.num_classes}; set "
            f"--model.num_classes {n_data}"
        )
    c_data = getattr(datamodule, "in_chans", None)
    if c_data is not None and c_data != model.in_chans:
        raise ValueError(
            f"the data has {c_data} channel(s) but the model takes in_chans={model.in_chans}; set "
            f"--model.in_chans {c_data}"
        )


class _SharedCallable:
    """Wraps the optimizer / LR scheduler factory so that ``copy.deepcopy`` of the module shares it.

    ``EMAWeightAveraging`` (``AveragedModel``) deep-copies the LightningModule. A factory made by
    LightningCLI refers to jsonargparse's instantiators and, through them, to the CLI and its
    Trainer: copying it copies the whole run, and under DDP fails on the process group's locks.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> "_SharedCallable":
        return self

    def __repr__(self) -> str:
        return repr(self.fn)


class TimmClassifier(pl.LightningModule):
    r"""Image classification with any timm model, batchnorm (``"bn"``) or Batch Renorm (``"brn"``).

    With ``normalization="brn"`` every batchnorm of the timm model is replaced by
    :func:`lightning_brn.convert_model` (in ``__init__``, so optimizers, EMA copies and
    checkpoints all see the renorm layers), and :meth:`configure_callbacks` adds a
    :class:`lightning_brn.callbacks.BatchRenormScheduler` driving rmax, dmax and the
    moving-average rate from ``renorm_schedule``. When ``renorm_schedule`` is ``None`` the
    paper's schedule is fitted to the run (:meth:`RenormSchedule.for_run` of the run's optimizer
    steps, ``trainer.estimated_stepping_batches``: ``max_steps`` or ``max_epochs``, whichever ends it). With ``normalization="bn"`` the timm model keeps its batchnorm,
    unless ``microbatch_size`` is set: batchnorm over microbatches (paper section 4.2) is
    run as renorm layers held at ``rmax=1, dmax=0`` (exactly batchnorm per group).

    Args:
        model_name: any :func:`timm.list_models` name (an unknown name suggests close ones).
        num_classes: classifier outputs.
        in_chans: input channels (1 for Fashion-MNIST).
        normalization: ``"bn"`` or ``"brn"``.
        renorm_schedule: the rmax/dmax/alpha schedule; ``None`` fits the paper's to the run.
        microbatch_size: normalize each group of this many consecutive examples on its own
            (paper 4.2: 4); >= 1, and must divide the per-process batch size.
        label_smoothing: cross-entropy label smoothing (paper/Inception v3: 0.1).
        optimizer: a callable ``params -> Optimizer`` (LightningCLI ``class_path`` +
            ``init_args``). ``None``: :class:`timm.optim.RMSpropTF` with the Inception v3
            settings (lr 0.045, alpha 0.9, eps 1.0, momentum 0.9).
        lr_scheduler: a callable ``optimizer -> LRScheduler``; ``None``: constant learning rate.
        lr_scheduler_interval: step the scheduler every ``"epoch"`` or every optimizer ``"step"``.
        weight_decay_norm_and_bias: if ``False`` (default) 1-D parameters (norm weights,
            biases) and the parameters the timm model names in its ``no_weight_decay()`` (position
            embeddings, class tokens, ...) get no weight decay, as in the TensorFlow Inception code and
            ``timm.optim.create_optimizer_v2``.
        log_renorm_every_n_steps: forwarded to ``BatchRenormScheduler(log_every_n_steps=...)``
            (``None``: the Trainer's ``log_every_n_steps``).
        model_kwargs: extra keyword arguments of :func:`timm.create_model` (e.g. ``drop_rate``).

    Examples::

        >>> import torch
        >>> m = TimmClassifier("resnet10t", num_classes=10, in_chans=1, normalization="brn", microbatch_size=2)
        >>> _ = m.train()
        >>> m(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 1000,
        in_chans: int = 3,
        normalization: Normalization = "brn",
        renorm_schedule: Optional[RenormSchedule] = None,
        microbatch_size: Optional[int] = None,
        label_smoothing: float = 0.0,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "epoch",
        weight_decay_norm_and_bias: bool = False,
        log_renorm_every_n_steps: Optional[int] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if normalization not in ("bn", "brn"):
            raise ValueError(f"normalization must be 'bn' or 'brn', got {normalization!r}")
        check_int("num_classes", num_classes, minimum=1)
        check_int("in_chans", in_chans, minimum=1)
        microbatch_size = check_microbatch_size(microbatch_size)
        label_smoothing = check_float("label_smoothing", label_smoothing)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}")
        if renorm_schedule is not None and not isinstance(renorm_schedule, RenormSchedule):
            raise TypeError(f"renorm_schedule must be a RenormSchedule or None, got {type(renorm_schedule).__name__}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model_name = model_name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.normalization = normalization
        self.renorm_schedule = renorm_schedule
        self.microbatch_size = microbatch_size
        self.label_smoothing = label_smoothing
        # (shared, not copied, by copy.deepcopy: see _SharedCallable)
        self.optimizer_factory = _SharedCallable(optimizer) if optimizer is not None else None
        self.lr_scheduler_factory = _SharedCallable(lr_scheduler) if lr_scheduler is not None else None
        self.lr_scheduler_interval = lr_scheduler_interval
        self.weight_decay_norm_and_bias = weight_decay_norm_and_bias
        self.log_renorm_every_n_steps = log_renorm_every_n_steps

        model = create_timm_model(model_name, num_classes=num_classes, in_chans=in_chans, **(model_kwargs or {}))
        if self.uses_renorm_layers:
            if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                what = "normalization='brn'" if normalization == "brn" else f"microbatch_size={microbatch_size}"
                raise ValueError(
                    f"timm model {model_name!r} has no batchnorm layer, so {what} has nothing to act on "
                    f"(Batch Renorm replaces batchnorm); pick a batchnorm model (e.g. resnet18, inception_v3, "
                    f"test_resnet) or set --model.normalization bn and --model.microbatch_size null"
                )
            momentum = renorm_schedule.momentum if renorm_schedule is not None else 0.01
            model = convert_model(model, rmax=1.0, dmax=0.0, momentum=momentum, microbatch_size=microbatch_size)
        self.model = model

        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    @property
    def uses_renorm_layers(self) -> bool:
        """True for ``"brn"`` and for batchnorm over microbatches (renorm layers at rmax=1, dmax=0)."""
        return self.normalization == "brn" or self.microbatch_size is not None

    # ----------------------------------------------------------------- schedule and callbacks
    def resolved_renorm_schedule(self) -> RenormSchedule:
        """The schedule the callback applies: ``renorm_schedule``, or the paper's fitted to the run's optimizer
        steps (``trainer.estimated_stepping_batches``, which sets the data up if needed).

        For ``normalization="bn"`` with microbatches: rmax=1, dmax=0 throughout, with the
        same moving-average rate.
        """
        if self.renorm_schedule is not None:
            return self.renorm_schedule_for_run(1)
        trainer = self._trainer
        total = trainer.estimated_stepping_batches if trainer is not None else float("inf")
        if total == float("inf"):
            raise ValueError(
                "renorm_schedule is None, so the paper's schedule is fitted to the run length, which is unknown "
                "(no Trainer, or max_steps=-1 and max_epochs=-1): set --trainer.max_steps or --trainer.max_epochs, "
                "or give --model.renorm_schedule explicitly"
            )
        return self.renorm_schedule_for_run(max(int(total), 1))

    def renorm_schedule_for_run(self, total_steps: int) -> RenormSchedule:
        """The schedule for a run of ``total_steps`` optimizer steps: ``renorm_schedule`` when given, else
        :meth:`RenormSchedule.for_run` (``total_steps``); held at rmax=1, dmax=0 for ``normalization="bn"``.

        Examples::

            >>> TimmClassifier("test_resnet", num_classes=10, in_chans=1).renorm_schedule_for_run(2_600).rmax_steps
            800
        """
        schedule = self.renorm_schedule if self.renorm_schedule is not None else RenormSchedule.for_run(total_steps)
        if self.normalization == "bn":
            schedule = RenormSchedule(
                warmup_steps=0, rmax=1.0, rmax_steps=0, dmax=0.0, dmax_steps=0, momentum=schedule.momentum
            )
        return schedule

    def configure_callbacks(self) -> list[Callback]:
        """A :class:`~lightning_brn.callbacks.BatchRenormScheduler` when the model holds renorm layers.

        Only for ``fit``: validate, test and predict run the layers in eval mode, where the schedule
        plays no part (and a run length need not be known).
        """
        if not self.uses_renorm_layers:
            return []
        trainer = self._trainer
        if trainer is not None and trainer.state.fn is not None and trainer.state.fn != "fit":
            return []
        from lightning_brn.callbacks import BatchRenormScheduler

        # a schedule to fit is fitted at fit start, once the data (and so the length of an epoch-based run) is known
        schedule = self.renorm_schedule_for_run if self.renorm_schedule is None else self.resolved_renorm_schedule()
        return [BatchRenormScheduler(schedule=schedule, convert=False, log_every_n_steps=self.log_renorm_every_n_steps)]

    def setup(self, stage: str) -> None:
        """Checks the data module's batches against the model (:func:`check_batch_config`); for ``fit`` with renorm
        layers, takes ``Trainer(sync_batchnorm=True)`` to synchronize them too
        (:func:`lightning_brn.plugins.take_sync_batchnorm`; Lightning runs this hook before the strategy applies
        its layer-sync plugin)."""
        trainer = self._trainer
        if trainer is not None and trainer.datamodule is not None:
            check_batch_config(self, trainer.datamodule)
        if trainer is not None and stage == "fit" and self.uses_renorm_layers:
            from lightning_brn.plugins import RenormLayerSync, take_sync_batchnorm

            take_sync_batchnorm(trainer)
            synchronized = isinstance(getattr(trainer.strategy, "_layer_sync", None), RenormLayerSync)
            if synchronized and self.microbatch_size is not None:
                raise ValueError(
                    f"microbatch_size={self.microbatch_size} with synchronized renorm layers (Trainer(sync_batchnorm=True) "
                    "or plugins=[RenormLayerSync()]): a synchronized layer normalizes the batches of every process "
                    "together, microbatches split one process's batch. Set --model.microbatch_size null, or "
                    "--trainer.sync_batchnorm false"
                )

    # ----------------------------------------------------------------- steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc1(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", self.train_acc1, on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.val_acc1(logits, y)
        self.val_acc5(logits, y)
        self.log(f"{prefix}/loss", loss, sync_dist=True)
        self.log(f"{prefix}/acc1", self.val_acc1, prog_bar=True)
        self.log(f"{prefix}/acc5", self.val_acc5)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        trainer = self._trainer
        if trainer is not None and not trainer.sanity_checking:
            self._last_val_step = trainer.global_step

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)

    # ----------------------------------------------------------------- optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """All trainable parameters, with 1-D ones (norm weights, biases) and those the timm model names in its
        ``no_weight_decay()`` in a no-weight-decay group, as ``timm.optim.create_optimizer_v2`` groups them
        (everything in one group with ``weight_decay_norm_and_bias=True``)."""
        if self.weight_decay_norm_and_bias:
            return [{"params": [p for p in self.parameters() if p.requires_grad]}]
        skip: set[str] = set()
        no_weight_decay = getattr(self.model, "no_weight_decay", None)
        if callable(no_weight_decay):
            skip = {str(name) for name in no_weight_decay()}  # names (or fnmatch patterns) within the timm model
        model_params = {id(p): name for name, p in self.model.named_parameters()}
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            name = model_params.get(id(p))
            named_skip = name is not None and (
                name.endswith(".bias") or any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)
            )
            (no_decay if p.ndim <= 1 or named_skip else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        if self.optimizer_factory is None:
            from timm.optim import RMSpropTF

            optimizer = RMSpropTF(groups, lr=0.045, alpha=0.9, eps=1.0, momentum=0.9)
        else:
            optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}
