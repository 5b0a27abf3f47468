"""The paper's rmax / dmax / alpha schedule. (Being written; see issue 5.)"""

from __future__ import annotations

__all__ = ["RenormSchedule"]


class RenormSchedule:
    pass
