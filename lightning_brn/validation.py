"""Argument checks shared by every entry point: one rule, and one wording of its error, per argument.

The layers, :func:`lightning_brn.functional.batch_renorm`, :func:`lightning_brn.convert_model`,
:class:`lightning_brn.RenormSchedule`, :class:`~lightning_brn.callbacks.BatchRenormScheduler`, the
LightningModule and the data modules all check their arguments here, so a value is refused with the same
message wherever it is given. Each check returns the value normalized (a Python ``float`` / ``int``) and raises
``TypeError`` for a value of the wrong type and ``ValueError`` for one out of range, naming the argument, the value
and what was expected.

Examples::

    >>> from lightning_brn.validation import check_rmax, check_microbatch_size
    >>> check_rmax(3)
    3.0
    >>> check_microbatch_size(None) is None
    True
    >>> check_rmax(0.5)
    Traceback (most recent call last):
    ...
    ValueError: rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got rmax=0.5
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any, Optional

from torch import Tensor

__all__ = [
    "check_bool",
    "check_choice",
    "check_dmax",
    "check_eps",
    "check_float",
    "check_int",
    "check_microbatch_size",
    "check_momentum",
    "check_rmax",
]


def check_float(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """A real number (or a one-element tensor), not NaN, and finite unless ``allow_inf``."""
    if type(value) is float:  # the common case, checked on every training step: no abstract-class checks
        if value != value or (not allow_inf and value in (math.inf, -math.inf)):
            raise ValueError(f"{name} must be {'a number' if allow_inf else 'finite'}, got {name}={value}")
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be {'a number' if allow_inf else 'finite'}, got {name}={v}")
    return v


def check_int(name: str, value: Any, minimum: Optional[int] = None) -> int:
    """An ``int`` (not a ``bool``), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {name}={value!r} of type {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """A ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {name}={value!r}")
    return value


def check_rmax(value: Any) -> float:
    """``rmax`` >= 1; ``inf`` means r is not clipped."""
    v = check_float("rmax", value, allow_inf=True)
    if not v >= 1.0:
        raise ValueError(f"rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got rmax={v}")
    return v


def check_dmax(value: Any) -> float:
    """``dmax`` >= 0; ``inf`` means d is not clipped."""
    v = check_float("dmax", value, allow_inf=True)
    if not v >= 0.0:
        raise ValueError(f"dmax must be >= 0 (d is clipped to [-dmax, dmax]), got dmax={v}")
    return v


def check_momentum(value: Any) -> float:
    """The moving-average rate alpha in [0, 1] (batchnorm's ``momentum=None``, a cumulative average, is refused)."""
    if value is None:
        raise ValueError(
            "momentum (the moving-average rate alpha) must be in [0, 1], got momentum=None: batchnorm's cumulative "
            "average is not supported by Batch Renorm; give e.g. momentum=0.01"
        )
    v = check_float("momentum", value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"momentum (the moving-average rate alpha) must be in [0, 1], got momentum={v}")
    return v


def check_eps(value: Any) -> float:
    """``eps`` > 0 (it sits inside the square root of the variance)."""
    v = check_float("eps", value)
    if not v > 0.0:
        raise ValueError(f"eps must be > 0 (it sits inside the square root of the variance), got eps={v}")
    return v


def check_microbatch_size(value: Any) -> Optional[int]:
    """``None`` (the whole batch) or the examples per normalization group, >= 1. A group must still hold more than
    one value per channel when it is used: a (N, C) input in groups of 1 is refused by the forward."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"microbatch_size must be a positive int or None, got microbatch_size={value!r}")
    if value < 1:
        raise ValueError(f"microbatch_size must be >= 1 or None, got microbatch_size={value}")
    return int(value)
