"""lightning_brn: Batch Renormalization for PyTorch, PyTorch Lightning and timm.

Examples::

    >>> import torch
    >>> from lightning_brn import BatchRenorm2d
    >>> BatchRenorm2d(3, rmax=3.0, dmax=5.0)(torch.randn(4, 3, 8, 8)).shape
    torch.Size([4, 3, 8, 8])
"""

from lightning_brn.__about__ import __version__
from lightning_brn import functional
from lightning_brn.layers import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BatchRenormAct2d,
    is_batch_renorm,
    set_renorm_hyperparameters,
)
from lightning_brn.convert import ConversionSummary, conversion_summary, convert_model, revert_model
from lightning_brn.schedule import RenormSchedule, RenormValues
from lightning_brn.distributed import (
    RunningStatsSharing,
    SyncBatchRenorm,
    convert_sync_batch_renorm,
    revert_sync_batch_renorm,
    share_running_stats,
    wait_running_stats,
)

__all__ = [
    "__version__",
    "functional",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BatchRenormAct2d",
    "is_batch_renorm",
    "set_renorm_hyperparameters",
    "convert_model",
    "revert_model",
    "conversion_summary",
    "ConversionSummary",
    "RenormSchedule",
    "RenormValues",
    "SyncBatchRenorm",
    "RunningStatsSharing",
    "share_running_stats",
    "wait_running_stats",
    "convert_sync_batch_renorm",
    "revert_sync_batch_renorm",
]
