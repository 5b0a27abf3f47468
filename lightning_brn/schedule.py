r"""The paper's ``rmax`` / ``dmax`` / ``alpha`` schedule as a closed-form function of the optimizer step.

Batch Renorm starts as plain batchnorm (:math:`r_{max} = 1, d_{max} = 0`) and relaxes the clipping
bounds gradually: in the paper (Ioffe 2017, https://arxiv.org/abs/1702.03275) the bounds stay at
1 and 0 for the first 5,000 steps, then grow to :math:`r_{max} = 3` at 40,000 steps and
:math:`d_{max} = 5` at 25,000 steps of a 130,000-step run, with a moving-average rate
:math:`\alpha = 0.01`.

As in ``timm.scheduler``, the schedule counts nothing itself: the training loop passes the step in,
so the values after a resume are exactly those of an uninterrupted run.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, NamedTuple, Optional

import torch
from torch import nn

from lightning_brn.validation import check_choice, check_dmax, check_float, check_int, check_momentum, check_rmax
from lightning_brn.layers import set_renorm_hyperparameters

__all__ = ["RenormSchedule", "RenormValues"]

RampShape = Literal["linear", "cosine"]
_SHAPES = ("linear", "cosine")

# The paper's points (steps of a 130k-step Inception v3 run) and its moving-average rate.
_PAPER_TOTAL_STEPS = 130_000
_PAPER_WARMUP_STEPS = 5_000
_PAPER_RMAX_STEPS = 40_000
_PAPER_DMAX_STEPS = 25_000
_PAPER_MOMENTUM = 0.01
# The paper's last point: a reference run must contain it, else for_run puts the ramps beyond the run it fits
_MIN_REFERENCE_STEPS = max(_PAPER_WARMUP_STEPS, _PAPER_RMAX_STEPS, _PAPER_DMAX_STEPS)
# The momentum rule of :meth:`RenormSchedule.momentum_for_run` (measured in bench/momentum_study.py):
# the averaging horizon 1 / alpha is the paper's fraction of the run (100 of 130k steps), with alpha
# no smaller than the paper's 0.01 and no larger than torch's batchnorm default 0.1.
_RULE_MAX_MOMENTUM = 0.1


class RenormValues(NamedTuple):
    """The values a :class:`RenormSchedule` gives for one optimizer step."""

    rmax: float
    dmax: float
    momentum: float


def _check_reference_steps(value: Any) -> int:
    steps = check_int("reference_steps", value, minimum=1)
    if steps < _MIN_REFERENCE_STEPS:
        raise ValueError(
            f"reference_steps must be >= {_MIN_REFERENCE_STEPS} (the length of the run the paper's points belong to: "
            f"warm-up to {_PAPER_WARMUP_STEPS}, dmax at {_PAPER_DMAX_STEPS}, rmax at {_PAPER_RMAX_STEPS} steps; a "
            f"shorter one puts the ramps beyond the run being fitted), got reference_steps={steps}; to shape the ramps "
            "yourself, build RenormSchedule(warmup_steps=..., rmax_steps=..., dmax_steps=...)"
        )
    return steps


class RenormSchedule:
    r"""The Batch Renorm schedule: ``rmax``, ``dmax`` and ``momentum`` as a function of the optimizer step.

    For step :math:`s` (the number of optimizer steps already taken, Lightning's ``trainer.global_step``):

    .. math::
        r_{max}(s) = 1 + (r_{max} - 1)\, f\!\left(\frac{s - s_w}{s_r - s_w}\right), \qquad
        d_{max}(s) = d_{max}\, f\!\left(\frac{s - s_w}{s_d - s_w}\right)

    with the progress clamped to [0, 1], :math:`s_w` = ``warmup_steps``, :math:`s_r` = ``rmax_steps``,
    :math:`s_d` = ``dmax_steps``, and :math:`f(t) = t` (``shape="linear"``) or
    :math:`f(t) = (1 - \cos \pi t) / 2` (``shape="cosine"``, gentler at both ends). So ``rmax = 1`` and
    ``dmax = 0`` (exactly batchnorm) up to and including step ``warmup_steps``, the final values are
    reached at ``rmax_steps`` and ``dmax_steps`` and kept after. The moving-average rate ``momentum``
    (the paper's :math:`\alpha`) is constant.

    The defaults are the paper's 130k-step run; :meth:`for_run` fits them to a run of another length.
    The schedule is immutable, picklable and its ``__init__`` is typed, so LightningCLI can build it
    from YAML (``class_path: lightning_brn.RenormSchedule``).

    Args:
        warmup_steps: steps of plain batchnorm (``rmax=1, dmax=0``) before the ramps start. Default: 5000.
        rmax: final upper clip of r, >= 1. Default: 3.0.
        rmax_steps: step at which ``rmax`` is reached, >= ``warmup_steps``. Default: 40000.
        dmax: final clip of d, >= 0. Default: 5.0.
        dmax_steps: step at which ``dmax`` is reached, >= ``warmup_steps``. Default: 25000.
        momentum: moving-average rate :math:`\alpha` in [0, 1]. Default: 0.01.
        shape: ``"linear"`` (the usual reading of the paper's "gradually relaxed") or ``"cosine"``.
            Default: ``"linear"``.

    Examples::

        >>> import torch
        >>> from lightning_brn import BatchRenorm2d, RenormSchedule
        >>> schedule = RenormSchedule()
        >>> schedule.values(5000)
        RenormValues(rmax=1.0, dmax=0.0, momentum=0.01)
        >>> schedule.values(15000)
        RenormValues(rmax=1.5714285714285714, dmax=2.5, momentum=0.01)
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), BatchRenorm2d(8))
        >>> for step in range(3):  # a plain PyTorch loop: set the values, then forward/backward/step
        ...     _ = schedule.apply(model, step)
        >>> RenormSchedule.for_run(13_000)
        RenormSchedule(warmup_steps=500, rmax=3.0, rmax_steps=4000, dmax=5.0, dmax_steps=2500, momentum=0.1, shape='linear')
    """

    def __init__(
        self,
        warmup_steps: int = _PAPER_WARMUP_STEPS,
        rmax: float = 3.0,
        rmax_steps: int = _PAPER_RMAX_STEPS,
        dmax: float = 5.0,
        dmax_steps: int = _PAPER_DMAX_STEPS,
        momentum: float = _PAPER_MOMENTUM,
        shape: RampShape = "linear",
    ) -> None:
        warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        rmax = check_float("rmax", rmax)
        check_rmax(rmax)
        rmax_steps = check_int("rmax_steps", rmax_steps, minimum=0)
        if rmax_steps < warmup_steps:
            raise ValueError(
                f"rmax_steps must be >= warmup_steps (the ramp ends after it starts), "
                f"got rmax_steps={rmax_steps} < warmup_steps={warmup_steps}"
            )
        dmax = check_float("dmax", dmax)
        check_dmax(dmax)
        dmax_steps = check_int("dmax_steps", dmax_steps, minimum=0)
        if dmax_steps < warmup_steps:
            raise ValueError(
                f"dmax_steps must be >= warmup_steps (the ramp ends after it starts), "
                f"got dmax_steps={dmax_steps} < warmup_steps={warmup_steps}"
            )
        momentum = check_float("momentum", momentum)
        check_momentum(momentum)
        check_choice("shape", shape, _SHAPES)
        self._warmup_steps = warmup_steps
        self._rmax = rmax
        self._rmax_steps = rmax_steps
        self._dmax = dmax
        self._dmax_steps = dmax_steps
        self._momentum = momentum
        self._shape: RampShape = shape

    # ----------------------------------------------------------------- fitting to a run
    @staticmethod
    def momentum_for_run(total_steps: int, reference_steps: int = _PAPER_TOTAL_STEPS) -> float:
        r"""The moving-average rate :math:`\alpha` for a run of ``total_steps`` optimizer steps.

        Rule: the averaging horizon :math:`1/\alpha` is the same fraction of the run as in the paper
        (100 of 130,000 steps), with :math:`\alpha` kept between the paper's 0.01 and torch's
        batchnorm default 0.1:

        .. math::
            \alpha = \mathrm{clip}\!\left(\frac{0.01 \cdot T_{ref}}{T},\; 0.01,\; 0.1\right),
            \qquad T_{ref} = 130{,}000

        so runs as long as the paper's or longer keep 0.01, a 26,000-step run uses 0.05 and runs of
        13,000 steps or fewer use 0.1. Why: slow averages lag the weights of a short run, and renorm
        then corrects towards stale statistics (and evaluates with them). On Fashion-MNIST with
        batches of 16 (``bench/momentum_study.py``, results in ``bench/results/momentum_study.md``)
        alpha = 0.01 lost 2.7, 2.0 and 0.5 points of validation accuracy against alpha = 0.1 in runs
        of 500, 1,500 and 4,000 steps (means of 2 seeds): the loss shrinks as the run grows, as the
        rule has it. alpha = 0.3 was within seed noise of 0.1 (+0.4, +0.4, -0.04 points), and faster
        averages of small batches are noisier, hence the cap.

        Args:
            total_steps: optimizer steps of the run, >= 1.
            reference_steps: length of the run whose horizon (1 / 0.01 = 100 steps) is scaled. Default: 130000.

        Examples::

            >>> from lightning_brn import RenormSchedule
            >>> [RenormSchedule.momentum_for_run(t) for t in (2_000, 26_000, 130_000, 500_000)]
            [0.1, 0.05, 0.01, 0.01]
        """
        total_steps = check_int("total_steps", total_steps, minimum=1)
        reference_steps = check_int("reference_steps", reference_steps, minimum=1)
        alpha = _PAPER_MOMENTUM * reference_steps / total_steps
        return float(min(max(alpha, _PAPER_MOMENTUM), _RULE_MAX_MOMENTUM))

    @classmethod
    def for_run(
        cls,
        total_steps: int,
        reference_steps: int = _PAPER_TOTAL_STEPS,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        momentum: Optional[float] = None,
        shape: RampShape = "linear",
    ) -> "RenormSchedule":
        r"""The paper's schedule fitted to a run of ``total_steps`` optimizer steps.

        The paper's points (warm-up 5,000, ``dmax`` at 25,000, ``rmax`` at 40,000 steps of a
        ``reference_steps`` = 130,000-step run) are scaled by ``total_steps / reference_steps`` and
        rounded; the momentum, unless given, follows :meth:`momentum_for_run`.

        Args:
            total_steps: optimizer steps of the run (for Lightning: ``trainer.estimated_stepping_batches``,
                times the number of optimizers stepped per batch under manual optimization), >= 1.
            reference_steps: length of the run the paper's points belong to, >= 40000 (the last point, rmax at
                40,000 steps, must lie within it, or the ramps would end after the run). Default: 130000.
            rmax: final clip of r. Default: 3.0.
            dmax: final clip of d. Default: 5.0.
            momentum: moving-average rate; ``None`` chooses it with :meth:`momentum_for_run`. Default: ``None``.
            shape: ramp shape, ``"linear"`` or ``"cosine"``. Default: ``"linear"``.

        Examples::

            >>> from lightning_brn import RenormSchedule
            >>> s = RenormSchedule.for_run(2_600)
            >>> s.warmup_steps, s.dmax_steps, s.rmax_steps, s.momentum
            (100, 500, 800, 0.1)
            >>> RenormSchedule.for_run(260_000).momentum
            0.01
        """
        total_steps = check_int("total_steps", total_steps, minimum=1)
        reference_steps = _check_reference_steps(reference_steps)
        scale = total_steps / reference_steps
        if momentum is None:
            momentum = cls.momentum_for_run(total_steps, reference_steps)
        return cls(
            warmup_steps=round(_PAPER_WARMUP_STEPS * scale),
            rmax=rmax,
            rmax_steps=round(_PAPER_RMAX_STEPS * scale),
            dmax=dmax,
            dmax_steps=round(_PAPER_DMAX_STEPS * scale),
            momentum=momentum,
            shape=shape,
        )

    # ----------------------------------------------------------------- read-only hyper-parameters
    @property
    def warmup_steps(self) -> int:
        """Steps of plain batchnorm before the ramps start."""
        return self._warmup_steps

    @property
    def rmax(self) -> float:
        """The final ``rmax``."""
        return self._rmax

    @property
    def rmax_steps(self) -> int:
        """The step at which ``rmax`` is reached."""
        return self._rmax_steps

    @property
    def dmax(self) -> float:
        """The final ``dmax``."""
        return self._dmax

    @property
    def dmax_steps(self) -> int:
        """The step at which ``dmax`` is reached."""
        return self._dmax_steps

    @property
    def momentum(self) -> float:
        r"""The moving-average rate :math:`\alpha`."""
        return self._momentum

    @property
    def shape(self) -> RampShape:
        """The ramp shape, ``"linear"`` or ``"cosine"``."""
        return self._shape

    # ----------------------------------------------------------------- values
    def _progress(self, step: int, end: int) -> float:
        if step <= self._warmup_steps:
            return 0.0
        if step >= end:
            return 1.0
        t = (step - self._warmup_steps) / (end - self._warmup_steps)
        if self._shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * t))
        return t

    def rmax_at(self, step: int) -> float:
        """``rmax`` for optimizer step ``step`` (>= 0)."""
        step = check_int("step", step, minimum=0)
        return 1.0 + (self._rmax - 1.0) * self._progress(step, self._rmax_steps)

    def dmax_at(self, step: int) -> float:
        """``dmax`` for optimizer step ``step`` (>= 0)."""
        step = check_int("step", step, minimum=0)
        return self._dmax * self._progress(step, self._dmax_steps)

    def momentum_at(self, step: int) -> float:
        r"""The moving-average rate :math:`\alpha` for optimizer step ``step`` (>= 0); constant."""
        check_int("step", step, minimum=0)
        return self._momentum

    def values(self, step: int) -> RenormValues:
        """``(rmax, dmax, momentum)`` for optimizer step ``step`` (>= 0)."""
        return RenormValues(self.rmax_at(step), self.dmax_at(step), self.momentum_at(step))

    def apply(self, model: nn.Module, step: int) -> RenormValues:
        """Sets ``rmax``, ``dmax`` and ``momentum`` of every Batch Renorm layer of ``model`` for ``step``.

        Call it before the forward pass of each optimizer step (with gradient accumulation, pass
        the optimizer step, not the batch index). Layers other than Batch Renorm are left alone; a
        model without any is left unchanged. fx graphs of converted models (feature extractors) are
        reached too (see :func:`lightning_brn.layers.set_renorm_hyperparameters`).

        Args:
            model: any module; its Batch Renorm layers (see :func:`lightning_brn.is_batch_renorm`) are set.
            step: optimizer steps taken so far, an int >= 0.

        Returns:
            The values that were set.

        Examples::

            >>> import torch
            >>> from lightning_brn import BatchRenorm2d, RenormSchedule
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchRenorm2d(4))
            >>> RenormSchedule(warmup_steps=0, rmax=2.0, rmax_steps=10, dmax_steps=10).apply(model, 5)
            RenormValues(rmax=1.5, dmax=2.5, momentum=0.01)
            >>> model[1].rmax, model[1].dmax
            (1.5, 2.5)
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        values = self.values(step)
        set_renorm_hyperparameters(model, *values)
        return values

    # ----------------------------------------------------------------- plumbing
    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments as plain values: ``RenormSchedule(**s.to_dict()) == s``."""
        return {
            "warmup_steps": self._warmup_steps,
            "rmax": self._rmax,
            "rmax_steps": self._rmax_steps,
            "dmax": self._dmax,
            "dmax_steps": self._dmax_steps,
            "momentum": self._momentum,
            "shape": self._shape,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RenormSchedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}({args})"


# A checkpoint whose hyper-parameters hold a schedule (TimmClassifier(renorm_schedule=...)) loads with torch.load's
# default weights_only=True: the class holds plain numbers and a string, and builds nothing else when unpickled.
torch.serialization.add_safe_globals([RenormSchedule])

