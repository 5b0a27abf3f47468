r"""Lightning callback that drives Batch Renorm's ``rmax`` / ``dmax`` / ``momentum`` from ``trainer.global_step``.

The values are a closed-form function of the optimizer step (:class:`lightning_brn.RenormSchedule`),
so a resumed run carries exactly the values of an uninterrupted one, and gradient accumulation
changes them once per optimizer step. Optionally converts the model's batchnorm layers in
``setup`` and logs what the correction is doing.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import type_before_parametrizations
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_brn.layers import is_batch_renorm, set_renorm_hyperparameters
from lightning_brn.schedule import RenormSchedule, RenormValues
from lightning_brn.validation import check_bool, check_int, check_microbatch_size

__all__ = ["BatchRenormScheduler"]

#: Names of the logged metrics (``brn/<name>``), in the order of the layers' ``_correction`` sums.
_CORRECTION_METRICS = ("r_clipped_frac", "d_clipped_frac", "mean_abs_r_minus_1", "mean_abs_d")

ExcludeType = Optional[Union[str, Sequence[str], Callable[..., bool]]]
#: A schedule, or a function that fits one to the run's optimizer steps (such as ``RenormSchedule.for_run``).
ScheduleType = Optional[Union[RenormSchedule, Callable[[int], RenormSchedule]]]


class _ConfigTypeError(MisconfigurationException, TypeError):
    """An argument of the wrong type: Lightning's MisconfigurationException, and a TypeError as in RenormSchedule."""


class _ConfigValueError(MisconfigurationException, ValueError):
    """An argument (or a model) that cannot be used: Lightning's MisconfigurationException, and a ValueError."""


class BatchRenormScheduler(Callback):
    r"""Sets ``rmax``, ``dmax`` and ``momentum`` of every Batch Renorm layer at every optimizer step.

    Before each training batch the values of ``schedule`` for ``trainer.global_step`` (the number of
    optimizer steps taken) are written into every Batch Renorm layer of the LightningModule, so:

    - with ``accumulate_grad_batches=k`` the values change once per optimizer step, not per batch;
    - after resuming from a checkpoint the layers carry exactly the values of an uninterrupted run
      (they are set at fit start, again once the training state is restored, and before every batch);
    - validation, test and predict run in eval mode (Lightning's loops call ``model.eval()``), where
      Batch Renorm is batchnorm's inference and never updates the moving averages.

    ``trainer.global_step`` counts optimizer steps, as ``Trainer(max_steps=...)`` does: under manual
    optimization with several optimizers it grows by one for each ``optimizer.step()``, so a GAN that
    steps two optimizers per batch moves through the schedule two steps per batch. Size such a schedule
    in optimizer steps, e.g. ``RenormSchedule.for_run(2 * trainer.estimated_stepping_batches)`` (Lightning
    estimates batches there, not steps).

    With ``convert=True`` the model's batchnorm layers are replaced by Batch Renorm layers
    (:func:`lightning_brn.convert_model`) in ``setup``, before the optimizers exist, so
    ``Trainer(callbacks=[BatchRenormScheduler(convert=True)])`` is the whole integration for an
    ordinary (for example timm) LightningModule. A model built in ``configure_model`` does not exist
    yet at ``setup``: call ``convert_model`` there yourself. A model without any Batch Renorm layer
    at fit start is an error, not a silent no-op.

    **Logged metrics** (every ``log_every_n_steps`` optimizer steps, at the same steps as Lightning's
    own step logging; under DDP the correction statistics cover the channels of every process, summed
    with one all-reduce at those steps). They are logged with ``pl_module.log(..., on_step=True,
    on_epoch=False)`` on every process, so they reach ``trainer.callback_metrics`` (a
    ``ModelCheckpoint(monitor="brn/r_clipped_frac")`` or ``EarlyStopping`` can use them, also under DDP) and
    the Trainer's loggers, in the rows of the module's own step metrics. With a ``log_every_n_steps`` of
    its own (not the Trainer's), the callback writes them to the loggers itself, in rows of their own:

    - ``brn/rmax``, ``brn/dmax``, ``brn/momentum``: the values used in that step;
    - ``brn/r_clipped_frac``, ``brn/d_clipped_frac``: fraction of channels (over all layers, microbatch
      groups and processes) whose r, resp. d, hit its clipping bound (with gradient accumulation: in the
      last batch of the step);
    - ``brn/mean_abs_r_minus_1``, ``brn/mean_abs_d``: mean of :math:`|r - 1|` and :math:`|d|` after clipping.

    During warm-up (``rmax = 1``, ``dmax = 0``) every r and d sits on its bound, so both fractions are
    about 1 by construction; once the bounds are relaxed the paper reports "a small fraction of r
    clipped, and no d". The correction statistics are recorded only in the logged steps (the
    layers' ``track_correction`` is switched on for those batches), summed over layers on device
    and read with a single ``.tolist()``. Switching ``track_correction`` costs a ``torch.compile``'d
    model one extra graph; the callback itself runs outside the compiled region. The callback owns
    ``track_correction`` during fit: it is off outside the logged steps and after training.

    **Non-finite batches.** A training batch whose statistics are not finite (an ``inf`` in the data, an
    overflow) leaves the moving averages of those channels as they were (see
    :attr:`lightning_brn.BatchRenorm2d.nonfinite_batches`). The callback logs their running count over all layers
    as ``brn/nonfinite_batches`` at the logged steps and warns with the total at the end of training (each layer
    warns of its first one itself).

    Args:
        schedule: the schedule; ``None`` means ``RenormSchedule()``, the paper's 130k-step schedule
            (use :meth:`RenormSchedule.for_run` for shorter runs). Any object with RenormSchedule's
            ``values(step)`` and ``to_dict()`` methods works. A function ``total_steps -> schedule``, such as
            ``RenormSchedule.for_run`` itself, is called at fit start with the run's optimizer steps
            (``trainer.estimated_stepping_batches``, known once the data is set up), so epoch-based runs
            (``max_epochs``) get the schedule fitted to their length. Default: ``None``.
        convert: convert the model's batchnorm layers in ``setup`` (stage ``"fit"``). Default: ``False``.
        log_every_n_steps: log every this many optimizer steps; ``None`` follows
            ``Trainer(log_every_n_steps=...)``, ``0`` disables logging and recording. Default: ``None``.
        microbatch_size: with ``convert=True``, ``microbatch_size`` of the converted layers. Default: ``None``.
        exclude: with ``convert=True``, batchnorm layers to keep (passed to ``convert_model``:
            ``fnmatch`` pattern(s) of module names relative to the LightningModule, e.g.
            ``"model.head.*"``, or a predicate ``(name, module) -> bool``). Default: ``None``.
        verbose: print a one-time summary of the renorm layers and the schedule at fit start (a rich
            table when the Trainer uses ``RichProgressBar``, an info log line otherwise). Default: ``True``.

    Raises:
        MisconfigurationException: if an argument is invalid, or if at fit start the model has no
            Batch Renorm layer. The exception is also a ``TypeError`` (an argument of the wrong type) or a
            ``ValueError`` (any other case), as :class:`lightning_brn.RenormSchedule` raises them.

    Examples::

        >>> import lightning.pytorch as pl
        >>> from lightning_brn import RenormSchedule
        >>> from lightning_brn.callbacks import BatchRenormScheduler
        >>> callback = BatchRenormScheduler(RenormSchedule.for_run(13_000), convert=True)
        >>> trainer = pl.Trainer(max_steps=13_000, callbacks=[callback], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        schedule: ScheduleType = None,
        convert: bool = False,
        log_every_n_steps: Optional[int] = None,
        *,
        microbatch_size: Optional[int] = None,
        exclude: ExcludeType = None,
        verbose: bool = True,
    ) -> None:
        if schedule is None:
            schedule = RenormSchedule()
        # Duck-typed (``values(step)`` and ``to_dict()``), so custom schedules with RenormSchedule's interface work too.
        is_schedule = _is_schedule(schedule)
        if not is_schedule and (not callable(schedule) or isinstance(schedule, type)):
            raise _ConfigTypeError(
                f"`schedule` must be a lightning_brn.RenormSchedule (or have its `values(step)` and `to_dict()` methods), "
                f"a function total_steps -> RenormSchedule (such as RenormSchedule.for_run) or None, got {schedule!r} "
                f"of type {type(schedule).__name__}"
            )
        # the library's rules (lightning_brn.validation), raised as Lightning's MisconfigurationException too
        try:
            check_bool("convert", convert)
            if log_every_n_steps is not None:
                check_int("log_every_n_steps", log_every_n_steps, minimum=0)
            check_microbatch_size(microbatch_size)
            check_bool("verbose", verbose)
        except TypeError as err:
            raise _ConfigTypeError(str(err)) from None
        except ValueError as err:
            raise _ConfigValueError(str(err)) from None
        if not convert and (microbatch_size is not None or exclude is not None):
            raise _ConfigValueError(
                f"`microbatch_size` and `exclude` apply to the conversion and need convert=True, got "
                f"convert=False with microbatch_size={microbatch_size!r}, exclude={exclude!r}"
            )
        self._schedule: Optional[RenormSchedule] = schedule if is_schedule else None  # type: ignore[assignment]
        self._fit_schedule: Optional[Callable[[int], RenormSchedule]] = None if is_schedule else schedule
        self._saved_schedule: Optional[dict[str, Any]] = None  # from a checkpoint, compared once the schedule is fitted
        self._convert = convert
        self._log_every_n_steps = log_every_n_steps
        self._microbatch_size = microbatch_size
        self._exclude = exclude
        self._verbose = verbose

        self._layers: list[nn.Module] = []
        self._applied: Optional[RenormValues] = None
        self._recording = False
        self._step_at_batch_start = 0
        self._values_at_batch_start: Optional[RenormValues] = None
        self._converted: Optional[dict[str, int]] = None

    # ----------------------------------------------------------------- read-only views
    @property
    def schedule(self) -> RenormSchedule:
        """The schedule this callback applies (a schedule fitted to the run exists from fit start on)."""
        if self._schedule is None:
            raise RuntimeError(
                "BatchRenormScheduler.schedule: the schedule is fitted to the run's length at fit start "
                f"({self._fit_schedule!r} is called with trainer.estimated_stepping_batches), which has not come yet"
            )
        return self._schedule

    @property
    def layers(self) -> list[nn.Module]:
        """The Batch Renorm layers found at fit start."""
        return list(self._layers)

    # ----------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        # The values are a function of ``trainer.global_step``, which Lightning restores: the schedule
        # is saved only to warn when a run is resumed with a different one.
        return {"schedule": None if self._schedule is None else self._schedule.to_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_schedule = state_dict.get("schedule")
        if self._schedule is not None:  # (a schedule fitted to the run is compared once it exists, at fit start)
            self._compare_saved_schedule()

    def _compare_saved_schedule(self) -> None:
        saved, self._saved_schedule = self._saved_schedule, None
        if saved is not None and self._schedule is not None and saved != self._schedule.to_dict():
            rank_zero_warn(
                f"BatchRenormScheduler: resuming with {self._schedule!r}, but the checkpoint was trained with "
                f"RenormSchedule(**{saved!r}); the layers follow the new schedule from the restored step on."
            )

    # ----------------------------------------------------------------- setup: conversion
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":  # Trainer(sync_batchnorm=True) then synchronizes the renorm layers too (said once)
            from lightning_brn.plugins import take_sync_batchnorm

            take_sync_batchnorm(trainer)
        if stage != "fit" or not self._convert:
            return
        from lightning_brn.convert import convert_model

        before = sum(1 for m in pl_module.modules() if is_batch_renorm(m))
        # plain batchnorm until the schedule is applied at fit start (a schedule fitted to the run does not exist yet)
        values = self._values(trainer.global_step) if self._schedule is not None else RenormValues(1.0, 0.0, 0.01)
        converted = convert_model(
            pl_module,
            rmax=values.rmax,
            dmax=values.dmax,
            momentum=values.momentum,
            microbatch_size=self._microbatch_size,
            exclude=self._exclude,
        )
        if converted is not pl_module:
            raise _ConfigValueError(
                f"convert_model replaced the LightningModule itself ({type(pl_module).__name__} -> "
                f"{type(converted).__name__}); BatchRenormScheduler(convert=True) can only convert its submodules"
            )
        counts = collections.Counter(type_before_parametrizations(m).__name__ for m in pl_module.modules() if is_batch_renorm(m))
        self._converted = {"converted": sum(counts.values()) - before}
        # A weight-averaging callback listed before this one has already copied the unconverted model in its own
        # setup: let it copy the converted one, so that the callbacks' order does not matter.
        from lightning.pytorch.callbacks import WeightAveraging

        for callback in trainer.callbacks:
            if callback is self:
                break
            if isinstance(callback, WeightAveraging):
                callback.setup(trainer, pl_module, stage)

    # ----------------------------------------------------------------- fit start: find layers, set values
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._layers = [m for m in pl_module.modules() if is_batch_renorm(m)]
        if not self._layers:
            hint = (
                "convert=True found nothing to convert (a model built in `configure_model` must be converted "
                "there with lightning_brn.convert_model)"
                if self._convert
                else "pass BatchRenormScheduler(convert=True) to convert its batchnorm layers, or build it with "
                "lightning_brn layers (lightning_brn.convert_model, BatchRenorm2d, ...)"
            )
            raise _ConfigValueError(
                f"BatchRenormScheduler found no Batch Renorm layer in {type(pl_module).__name__}: {hint}."
            )
        if self._schedule is None:
            self._schedule = self._fitted_schedule(trainer)
            self._compare_saved_schedule()
        self._applied = None
        self._set_tracking(False)
        self._apply(trainer)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # On resume, ``global_step`` is restored only after ``on_fit_start``: the summary shows the restored step.
        self._applied = None
        self._apply(trainer)
        if self._verbose and trainer.is_global_zero:
            self._print_summary(trainer)

    def _fitted_schedule(self, trainer: "pl.Trainer") -> RenormSchedule:
        assert self._fit_schedule is not None
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise _ConfigValueError(
                f"BatchRenormScheduler(schedule={self._fit_schedule!r}) fits the schedule to the run's length, but the "
                "run has none (max_steps=-1 and max_epochs=-1): set Trainer(max_steps=...) or max_epochs, or pass a "
                "RenormSchedule"
            )
        schedule = self._fit_schedule(max(int(total), 1))  # (a run of 0 steps trains nothing: any schedule will do)
        if not _is_schedule(schedule):
            raise _ConfigTypeError(
                f"BatchRenormScheduler: schedule={self._fit_schedule!r} returned {schedule!r} of type "
                f"{type(schedule).__name__} for {int(total)} steps; expected a lightning_brn.RenormSchedule"
            )
        return schedule

    # ----------------------------------------------------------------- every batch
    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step
        self._values_at_batch_start = self._apply(trainer)
        record = self._should_log(trainer)
        if record:
            for m in self._layers:
                m.correction_record().zero_()  # layers that do not run in training mode then report nothing
        self._set_tracking(record)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Log once per optimizer step: with gradient accumulation, the batch after which the step was taken.
        if not self._recording or trainer.global_step == self._step_at_batch_start:
            return
        values = self._values_at_batch_start
        assert values is not None
        metrics = {"brn/rmax": values.rmax, "brn/dmax": values.dmax, "brn/momentum": values.momentum}
        metrics.update(self._correction_metrics(trainer))
        # Through ``LightningModule.log``: the values reach ``trainer.callback_metrics`` (so ``ModelCheckpoint`` /
        # ``EarlyStopping`` can monitor them) and, at the Trainer's logging steps, its loggers, in the same rows as
        # the module's own step metrics. At other steps (a ``log_every_n_steps`` of our own) the loggers get them here.
        # Every process logs the same (all-reduced) values, so a monitored brn/ metric exists on every rank.
        own_steps = self._every(trainer) != trainer.log_every_n_steps
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=not own_steps, batch_size=1)
        if own_steps and trainer.is_global_zero:
            step = _logging_step(trainer)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        # logged once: a batch end without its batch start (Lightning skips that hook for a None batch) logs nothing
        self._step_at_batch_start = trainer.global_step

    # ----------------------------------------------------------------- end of fit
    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set_tracking(False)
        if not self._layers:
            return
        total = int(trainer.strategy.reduce(self._nonfinite_total(), reduce_op="sum").item())
        if total > 0:
            rank_zero_warn(
                f"BatchRenormScheduler: {total} training batch(es) (summed over layers and processes) had non-finite "
                "statistics in some channels; those channels' moving averages were left unchanged for those batches"
            )

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._set_tracking(False)

    # ----------------------------------------------------------------- helpers
    def _values(self, step: int) -> RenormValues:
        return RenormValues(*self.schedule.values(step))

    def _nonfinite_total(self) -> Tensor:
        """Non-finite batches counted by every layer, summed on device (no sync)."""
        counters = [m.nonfinite_counter() for m in self._layers]
        return torch.stack([c.to(counters[0].device) for c in counters]).sum()

    def _apply(self, trainer: "pl.Trainer") -> RenormValues:
        values = self._values(trainer.global_step)
        if values != self._applied:  # write only when a value changes (constant during warm-up and after the ramps)
            for m in self._layers:
                set_renorm_hyperparameters(m, *values)
            self._applied = values
        return values

    def _every(self, trainer: "pl.Trainer") -> int:
        return trainer.log_every_n_steps if self._log_every_n_steps is None else self._log_every_n_steps

    def _should_log(self, trainer: "pl.Trainer") -> bool:
        every = self._every(trainer)
        if every <= 0:
            return False
        # (the same answer on every process: the correction sums are all-reduced at these steps)
        # The steps at which Lightning logs ``self.log(..., on_step=True)`` (LoggerConnector.should_update_logs).
        return (_logging_step(trainer) + 1) % every == 0

    def _set_tracking(self, on: bool) -> None:
        if on != self._recording:
            for m in self._layers:
                m.track_correction = on
            self._recording = on

    def _correction_metrics(self, trainer: "pl.Trainer") -> dict[str, float]:
        bufs: list[Tensor] = [m.correction_record() for m in self._layers]
        device = bufs[0].device
        # [#r clipped, #d clipped, sum |r-1|, sum |d|, #channels] summed over layers and over processes, and the
        # layers' non-finite batch counts (one all-reduce under DDP; none on one device), then read with one sync.
        # (in float32 whatever the buffers were cast to, e.g. float16 by FSDP's mixed precision: counts overflow it)
        stacked = torch.stack([b.to(device=device, dtype=torch.float32) for b in bufs]).sum(0)
        stacked = torch.cat([stacked, self._nonfinite_total().to(device=device, dtype=torch.float32).view(1)])
        sums = trainer.strategy.reduce(stacked, reduce_op="sum")
        r_cl, d_cl, abs_r, abs_d, count, nonfinite = sums.tolist()
        metrics = {"brn/nonfinite_batches": nonfinite}  # (the layers warn of the first one themselves)
        if count <= 0:  # no layer ran in training mode with running statistics
            return metrics
        metrics.update({f"brn/{name}": v / count for name, v in zip(_CORRECTION_METRICS, (r_cl, d_cl, abs_r, abs_d))})
        return metrics

    def _print_summary(self, trainer: "pl.Trainer") -> None:
        counts = collections.Counter(type_before_parametrizations(m).__name__ for m in self._layers)
        s = self.schedule
        step = trainer.global_step
        values = self._values(step)
        layer_text = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        rows = [
            ("renorm layers", f"{len(self._layers)} ({layer_text})"),
            ("converted in setup", "no" if self._converted is None else str(self._converted["converted"])),
        ]
        if isinstance(s, RenormSchedule):
            rows += [
                ("warm-up (rmax=1, dmax=0)", f"steps 0..{s.warmup_steps}"),
                ("rmax", f"1 -> {s.rmax:g} at step {s.rmax_steps} ({s.shape})"),
                ("dmax", f"0 -> {s.dmax:g} at step {s.dmax_steps} ({s.shape})"),
            ]
        else:
            rows.append(("schedule", repr(s)))
        rows += [
            ("momentum (alpha)", f"{values.momentum:g}"),
            ("now", f"step {step}: rmax={values.rmax:.4g}, dmax={values.dmax:.4g}"),
        ]
        from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBar
        from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

        if _RICH_AVAILABLE and isinstance(trainer.progress_bar_callback, RichProgressBar):
            from rich.console import Console
            from rich.table import Table

            table = Table(title="Batch Renorm", show_header=False)
            table.add_column(style="bold")
            table.add_column()
            for k, v in rows:
                table.add_row(k, v)
            Console().print(table)
        else:
            rank_zero_info("Batch Renorm: " + "; ".join(f"{k}: {v}" for k, v in rows))


def _is_schedule(obj: Any) -> bool:
    """RenormSchedule's interface (``values(step)`` and ``to_dict()``), which custom schedules may implement too."""
    return callable(getattr(obj, "values", None)) and callable(getattr(obj, "to_dict", None))


def _logging_step(trainer: "pl.Trainer") -> int:
    """The step Lightning's own step logging uses (``_batches_that_stepped``), ``global_step`` as fallback."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
