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

import torch
from torch import Tensor
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging as _LightningEMAWeightAveraging

__all__ = ["EMAWeightAveraging"]


def _warmup_ema_avg_fn(decay: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """TensorFlow's ``ExponentialMovingAverage(decay, num_updates)``: the rate of update n is
    ``min(decay, (1 + n) / (10 + n))`` (``AveragedModel`` copies the weights at its first update, n = 0)."""

    def ema_update(ema_param: Tensor, current_param: Tensor, num_averaged: Tensor) -> Tensor:
        # a 0-dim tensor on the parameters' device: no host sync per parameter, and no type promotion
        d = ((1 + num_averaged) / (10 + num_averaged)).clamp(max=decay)
        return d * ema_param + (1 - d) * current_param

    return ema_update


class EMAWeightAveraging(_LightningEMAWeightAveraging):
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
      of holding on to their initial values for ~1 / (1 - decay) steps. (The count of updates is
      ``AveragedModel``'s ``n_averaged``, saved in checkpoints.)

    The recipes of ``lightning-brn`` use this class with ``warmup: true``.

    Args:
        device, use_buffers, update_every_n_steps, update_starting_at_step, update_starting_at_epoch:
            as Lightning's ``EMAWeightAveraging``.
        decay: the EMA decay (its ceiling with ``warmup``), in [0, 1]. Default: 0.999.
        warmup: TensorFlow's ramp of the decay, above. Default: ``False`` (Lightning's fixed decay).

    Examples::

        >>> from lightning_brn.callbacks import EMAWeightAveraging
        >>> ema = EMAWeightAveraging(decay=0.999, use_buffers=True, warmup=True)
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
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got decay={decay!r}")
        if not isinstance(warmup, bool):
            raise TypeError(f"warmup must be a bool, got warmup={warmup!r}")
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
        if warmup:
            self._kwargs["avg_fn"] = _warmup_ema_avg_fn(float(decay))

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._training_state = None

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # before the average overwrites them (copies: the module's tensors are written in place)
        self._training_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._training_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._training_state
