"""Lightning ``LayerSync`` plugin for Batch Renorm: synchronized renorm (and batchnorm) layers across processes.

``Trainer(sync_batchnorm=True)`` uses Lightning's ``TorchSyncBatchNorm``, which synchronizes ``torch.nn`` batchnorm
layers only: Batch Renorm layers keep normalizing each device's batch (with moving averages shared by every rank,
see :mod:`lightning_brn.distributed`). :class:`RenormLayerSync` synchronizes both::

    trainer = Trainer(strategy="ddp", devices=8, plugins=[RenormLayerSync()])  # sync_batchnorm=True may be added

``Trainer(sync_batchnorm=True)`` on a model with renorm layers is taken to mean it (:func:`take_sync_batchnorm`: a
:class:`RenormLayerSync` in place of Lightning's plugin, before the strategy applies it, said once on rank 0) by
:class:`~lightning_brn.callbacks.BatchRenormScheduler`, by :class:`~lightning_brn.module.TimmClassifier`, and, for
any other LightningModule, by the callback that :func:`callbacks_factory` gives every Trainer through Lightning's
``lightning.pytorch.callbacks_factory`` entry point (declared in the package metadata).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.nn import Module
from typing_extensions import override

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_brn.distributed import convert_sync_batch_renorm, revert_sync_batch_renorm, share_running_stats
from lightning_brn.layers import is_batch_renorm

__all__ = ["RenormLayerSync", "TakeSyncBatchnorm", "callbacks_factory", "take_sync_batchnorm"]


class RenormLayerSync(TorchSyncBatchNorm):
    """Turns Batch Renorm layers into :class:`~lightning_brn.distributed.SyncBatchRenorm` and batchnorm layers into
    ``torch.nn.SyncBatchNorm`` (``apply``), and back (``revert``), for Lightning's DDP and FSDP strategies.

    A subclass of Lightning's ``TorchSyncBatchNorm``, so ``Trainer(sync_batchnorm=True, plugins=[RenormLayerSync()])``
    is accepted. ``Trainer(sync_batchnorm=True)`` alone installs Lightning's ``TorchSyncBatchNorm``, which leaves
    renorm layers per device; :func:`take_sync_batchnorm` puts this plugin in its place when the model has renorm
    layers (automatically under Lightning's entry point, see :func:`callbacks_factory`). ``apply`` also keeps the renorm buffers out of ``DistributedDataParallel``'s rank-0 broadcast
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


class TakeSyncBatchnorm(Callback):
    """Calls :func:`take_sync_batchnorm` in ``setup("fit")`` (before the strategy applies the layer-sync plugin)
    when the Trainer has Lightning's ``TorchSyncBatchNorm`` and the LightningModule has renorm layers; does nothing
    otherwise. Every Trainer gets one through :func:`callbacks_factory`; ``callbacks=[TakeSyncBatchnorm()]`` does the
    same where the package's entry point is not installed.

    Examples::

        >>> import lightning.pytorch as pl
        >>> from lightning_brn import BatchRenorm1d
        >>> from lightning_brn.plugins import TakeSyncBatchnorm
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", sync_batchnorm=True, logger=False)
        >>> module = pl.LightningModule()
        >>> module.norm = BatchRenorm1d(3)
        >>> TakeSyncBatchnorm().setup(trainer, module, "fit")
        >>> type(trainer.strategy._layer_sync).__name__
        'RenormLayerSync'
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        layer_sync = getattr(getattr(trainer, "strategy", None), "_layer_sync", None)
        if stage != "fit" or type(layer_sync) is not TorchSyncBatchNorm:
            return  # (the cheap check first: this callback is in every Trainer)
        if any(is_batch_renorm(m) for m in pl_module.modules()):
            take_sync_batchnorm(trainer)


def callbacks_factory() -> list[Callback]:
    """Lightning's ``lightning.pytorch.callbacks_factory`` entry point (declared in the package metadata): every
    ``Trainer`` gets a callback that, in ``setup("fit")``, applies :func:`take_sync_batchnorm` when the model has
    Batch Renorm layers, so ``Trainer(sync_batchnorm=True)`` synchronizes them on every route. It costs one look for
    Lightning's plugin per ``fit`` and nothing when ``sync_batchnorm`` is off.

    Lightning logs, at INFO level, ``Adding 1 callbacks from entry point 'lightning_brn': TakeSyncBatchnorm`` when it
    builds a Trainer.

    Examples::

        >>> [type(c).__name__ for c in callbacks_factory()]
        ['TakeSyncBatchnorm']
    """
    return [TakeSyncBatchnorm()]
