"""Lightning callbacks of lightning_brn (installed as ``lightning_brn.callbacks``).

Examples::

    >>> from lightning_brn import RenormSchedule
    >>> from lightning_brn.callbacks import BatchRenormScheduler
    >>> BatchRenormScheduler(RenormSchedule.for_run(2_600)).schedule.warmup_steps
    100
"""

from lightning_brn.callbacks.batch_renorm_scheduler import BatchRenormScheduler
from lightning_brn.callbacks.weight_averaging import EMAWeightAveraging

__all__ = ["BatchRenormScheduler", "EMAWeightAveraging"]
