"""Lightning callbacks of lightning_brn (installed as ``lightning_brn.callbacks``).

Examples::

    >>> from lightning_brn import RenormSchedule
    >>> from lightning_brn.callbacks import BatchRenormScheduler
    >>> BatchRenormScheduler(RenormSchedule.for_run(2_600)).schedule.warmup_steps
    100
"""

from typing import Any

from lightning_brn.callbacks.batch_renorm_scheduler import BatchRenormScheduler
from lightning_brn.callbacks.weight_averaging import ResumableEMAWeightAveraging

__all__ = ["BatchRenormScheduler", "ResumableEMAWeightAveraging"]


def __getattr__(name: str) -> Any:
    if name == "EMAWeightAveraging":  # renamed in 0.2: the module's __getattr__ warns
        from lightning_brn.callbacks import weight_averaging

        return weight_averaging.EMAWeightAveraging
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
