"""Lightning ``LayerSync`` plugin for Batch Renorm: synchronized renorm (and batchnorm) layers across processes.

``Trainer(sync_batchnorm=True)`` uses Lightning's ``TorchSyncBatchNorm``, which synchronizes ``torch.nn`` batchnorm
layers only: Batch Renorm layers keep normalizing each device's batch (with moving averages shared by every rank,
see :mod:`lightning_brn.distributed`). :class:`RenormLayerSync` synchronizes both::

    trainer = Trainer(strategy="ddp", devices=8, plugins=[RenormLayerSync()])  # sync_batchnorm=True may be added

and :class:`~lightning_brn.callbacks.BatchRenormScheduler` takes ``Trainer(sync_batchnorm=True)`` to mean it: it
puts a :class:`RenormLayerSync` in place of Lightning's plugin before the strategy applies it, and says so once.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.nn import Module
from typing_extensions import override

from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_brn.distributed import convert_sync_batch_renorm, revert_sync_batch_renorm, share_running_stats
from lightning_brn.layers import is_batch_renorm

__all__ = ["RenormLayerSync", "take_sync_batchnorm"]


class RenormLayerSync(TorchSyncBatchNorm):
    """Turns Batch Renorm layers into :class:`~lightning_brn.distributed.SyncBatchRenorm` and batchnorm layers into
    ``torch.nn.SyncBatchNorm`` (``apply``), and back (``revert``), for Lightning's DDP and FSDP strategies.

    A subclass of Lightning's ``TorchSyncBatchNorm``, so ``Trainer(sync_batchnorm=True, plugins=[RenormLayerSync()])``
    is accepted. ``apply`` also keeps the renorm buffers out of ``DistributedDataParallel``'s rank-0 broadcast
    (:func:`~lightning_brn.distributed.share_running_stats`). Layers with ``microbatch_size`` are refused (a
    ``ValueError`` naming the layer): use ``process_group`` subgroups for microbatches spread over devices.

    Args:
        process_group: the ranks whose batches are normalized together; ``None``: all of them.

    Examples::

        >>> import lightning.pytorch as pl
        >>> from lightning_brn.plugins import RenormLayerSync
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", plugins=[RenormLayerSync()], logger=False)
    """

    def __init__(self, process_group: Optional[Any] = None) -> None:
        self.process_group = process_group

    @override
    def apply(self, model: Module) -> Module:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, self.process_group)
        model = convert_sync_batch_renorm(model, self.process_group)
        return share_running_stats(model) if any(is_batch_renorm(m) for m in model.modules()) else model

    @override
    def revert(self, model: Module) -> Module:
        return super().revert(revert_sync_batch_renorm(model))


def take_sync_batchnorm(trainer: Any) -> bool:
    """If ``trainer`` was built with ``sync_batchnorm=True`` (Lightning's ``TorchSyncBatchNorm``, which would leave
    Batch Renorm layers unsynchronized), put a :class:`RenormLayerSync` in its place, say so once on rank 0 and
    return ``True``; else change nothing and return ``False``. Call it before the strategy's ``setup`` (a callback's
    ``setup`` hook). Reads the strategy's ``_layer_sync``, the only place Lightning keeps the plugin."""
    strategy = getattr(trainer, "strategy", None)
    layer_sync = getattr(strategy, "_layer_sync", None)
    if type(layer_sync) is not TorchSyncBatchNorm:
        return False
    strategy._layer_sync = RenormLayerSync()  # type: ignore[union-attr]
    rank_zero_info(
        "lightning_brn: Trainer(sync_batchnorm=True) synchronizes the Batch Renorm layers too (SyncBatchRenorm: "
        "statistics over all processes, one all-reduce of 2C + 1 values per layer in the forward and of 2C in the "
        "backward); batchnorm layers become torch.nn.SyncBatchNorm as usual. Without sync_batchnorm each device "
        "normalizes its own batch and the moving averages are shared, as on the paper's workers."
    )
    return True
