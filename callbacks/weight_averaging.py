r"""Lightning's ``EMAWeightAveraging`` whose end-of-training checkpoint still resumes from the training weights.

With ``lightning.pytorch.callbacks.EMAWeightAveraging`` (Lightning 2.6) a checkpoint's ``state_dict`` holds
the averaged weights and ``current_model_state`` the training weights, which ``fit(ckpt_path=...)``
restores. At the end of training, though, the callback copies the average into the module
(``on_train_end``), and ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` in its own ``on_train_end``,
which runs after it: that checkpoint's ``current_model_state`` is the average too, the training weights are
gone, and a run resumed from it (for example to train longer) restarts from the averaged weights.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import copy
import functools

import torch
from torch import Tensor
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging as _LightningEMAWeightAveraging
from lightning.pytorch.callbacks import WeightAveraging

__all__ = ["ResumableEMAWeightAveraging"]


@torch.no_grad()
def _warmup_ema_update(decay: float, ema_params: list[Tensor], current_params: list[Tensor], num_averaged: Tensor) -> None:
    """TensorFlow's ``ExponentialMovingAverage(decay, num_updates)``: update n (``AveragedModel``'s count of
    updates; it copies the weights at n = 0) uses the decay ``min(decay, (1 + n) / (10 + n))``. In place, one
    ``_foreach_lerp_`` per group of tensors of one device and dtype, as ``torch.optim.swa_utils``' EMA."""
    n = int(num_averaged)  # one host read per group of tensors (a few per update), not one per tensor
    d = min(decay, (1 + n) / (10 + n))
    if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
        torch._foreach_lerp_(ema_params, current_params, 1.0 - d)
    else:  # integer buffers (num_batches_tracked), as torch's get_ema_multi_avg_fn does them
        for p_ema, p_model in zip(ema_params, current_params):
            p_ema.copy_(p_ema * d + p_model * (1.0 - d))


def _warmup_ema_multi_avg_fn(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    return functools.partial(_warmup_ema_update, decay)  # (picklable, unlike a closure)


class ResumableEMAWeightAveraging(_LightningEMAWeightAveraging):
    r"""``lightning.pytorch.callbacks.EMAWeightAveraging``, with the training weights kept after training.

    Same arguments and behaviour (evaluation with an exponential moving average of the weights, and of
    the buffers with ``use_buffers=True``; the average replaces the weights when training ends), and:

    - A checkpoint written after training has ended (``ModelCheckpoint(save_last=True)``'s ``last.ckpt``
      at the end of ``fit``, or ``trainer.save_checkpoint`` afterwards) stores the training weights of
      the last step under ``current_model_state``, as checkpoints written during training do, so
      ``fit(ckpt_path=...)`` resumes from them; its ``state_dict`` still holds the average for
      evaluation and deployment.
    - ``warmup=True`` uses the decay ``min(decay, (1 + n) / (10 + n))`` at the n-th update, as
      TensorFlow's ``ExponentialMovingAverage(decay, num_updates=global_step)`` in the Inception
      training code the paper's runs come from: early in a run the average follows the weights instead
      of holding on to their initial values for ~1 / (1 - decay) steps. n counts the updates
      (``AveragedModel``'s ``n_averaged``, saved in checkpoints), which is the optimizer step when the
      average is updated at every step from the first, as by default.

    The recipes of ``lightning-brn`` use this class with ``warmup: true``. It has a name of its own so that
    ``class_path: EMAWeightAveraging`` in a LightningCLI config still names Lightning's class alone (this class was
    called ``EMAWeightAveraging`` before 0.2; that name still imports, with a deprecation warning).

    Args:
        device, use_buffers, update_every_n_steps, update_starting_at_step, update_starting_at_epoch:
            as Lightning's ``EMAWeightAveraging``.
        decay: the EMA decay (its ceiling with ``warmup``), in [0, 1]. Default: 0.999.
        warmup: TensorFlow's ramp of the decay, above (not with a ``multi_avg_fn`` of your own, which
            would replace it). Default: ``False`` (Lightning's fixed decay).

    Examples::

        >>> from lightning_brn.callbacks import ResumableEMAWeightAveraging
        >>> ema = ResumableEMAWeightAveraging(decay=0.999, use_buffers=True, warmup=True)
        >>> ema.should_update(step_idx=10)
        True
    """

    _training_state: Optional[dict[str, Tensor]] = None

    def __init__(
        self,
        device: Optional[Union[torch.device, str, int]] = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: Optional[int] = None,
        update_starting_at_epoch: Optional[int] = None,
        warmup: bool = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise TypeError(f"decay must be a number in [0, 1], got decay={decay!r} of type {type(decay).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got decay={decay!r}")
        if not isinstance(warmup, bool):
            raise TypeError(f"warmup must be a bool, got warmup={warmup!r}")
        if warmup and kwargs.get("multi_avg_fn") is not None:
            raise ValueError("warmup=True is the averaging function: it cannot be combined with a multi_avg_fn")
        if warmup:
            # Lightning's EMAWeightAveraging gives AveragedModel a fixed-decay avg_fn, and AveragedModel takes one
            # function of the two: set up as its base class with the warmup multi_avg_fn, then its own attributes
            WeightAveraging.__init__(
                self, device=device, use_buffers=use_buffers, multi_avg_fn=_warmup_ema_multi_avg_fn(float(decay)),
                **kwargs,
            )
            self.update_every_n_steps = update_every_n_steps
            self.update_starting_at_step = update_starting_at_step
            self.update_starting_at_epoch = update_starting_at_epoch
        else:
            super().__init__(
                device=device,
                use_buffers=use_buffers,
                decay=decay,
                update_every_n_steps=update_every_n_steps,
                update_starting_at_step=update_starting_at_step,
                update_starting_at_epoch=update_starting_at_epoch,
                **kwargs,
            )
        self.decay = float(decay)
        self.warmup = warmup

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._training_state = None

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # before the average overwrites them (copies, in host memory: the module's tensors are written in place,
        # and checkpoints are written from the host)
        self._training_state = {
            k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else copy.deepcopy(v)
            for k, v in pl_module.state_dict().items()
        }
        super().on_train_end(trainer, pl_module)
        # With use_buffers the average covers every buffer, the renorm layers' non-persistent schedule buffer too:
        # give it back the values their rmax / dmax / momentum say (compiled graphs read the buffer)
        from lightning_brn.layers import is_batch_renorm

        for m in pl_module.modules():
            if is_batch_renorm(m):
                m.refresh_schedule_buffer()

    @override
    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._training_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._training_state


def __getattr__(name: str) -> Any:
    if name == "EMAWeightAveraging":  # the name before 0.2, which shadowed Lightning's in LightningCLI configs
        import warnings

        warnings.warn(
            "lightning_brn.callbacks.EMAWeightAveraging was renamed ResumableEMAWeightAveraging (the old name made "
            "`class_path: EMAWeightAveraging` ambiguous with Lightning's class); import the new name",
            FutureWarning,
            stacklevel=2,
        )
        return ResumableEMAWeightAveraging
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
