"""Range checks of the Batch Renorm hyper-parameters, one wording of each error for the layers, the functional
form and the schedule. They take numbers that passed their callers' type checks (``not x >= 1`` also refuses NaN)."""

from __future__ import annotations

from typing import Optional


def check_eps(eps: float) -> None:
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0 (it sits inside the square root of the variance), got eps={eps}")


def check_rmax(rmax: float) -> None:
    if not rmax >= 1.0:
        raise ValueError(f"rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got rmax={rmax}")


def check_dmax(dmax: float) -> None:
    if not dmax >= 0.0:
        raise ValueError(f"dmax must be >= 0 (d is clipped to [-dmax, dmax]), got dmax={dmax}")


def check_momentum(momentum: Optional[float]) -> None:
    if momentum is None or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum (the moving-average rate alpha) must be in [0, 1], got momentum={momentum}")
