"""Lightning runs for tests/test_distributed.py: ``python tests/_dist_lightning.py OUT MODE[,MODE...]``.

2 gloo CPU processes (Lightning's launcher re-runs this script for rank 1), float64, rank r's batches shifted by 3 r.
MODE ``shared``: DDP, the default (per-device normalization, shared moving averages); ``plugin``:
``plugins=[RenormLayerSync()]``; ``sync_batchnorm``: ``Trainer(sync_batchnorm=True)`` with a BatchRenormScheduler;
``factory``: ``Trainer(sync_batchnorm=True)`` alone, with the package's ``lightning.pytorch.callbacks_factory``
entry point (registered here when the installed metadata lacks it); ``fsdp2``: ``ModelParallelStrategy`` with
``fully_shard`` over the data-parallel mesh in ``configure_model`` (Lightning's FSDP2 route; its ``FSDPStrategy``
refuses CPUs); ``fsdp2_sync``: the same with the renorm layers made ``SyncBatchRenorm`` before ``fully_shard``. Each rank saves the averages after every optimizer step and the layer classes it trained with into
OUT; rank 0 saves the checkpoint.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_worker import C_IN, averages, loss_fn, make_model  # noqa: E402

N_DATA, BATCH, STEPS = 32, 4, 3


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N_DATA, C_IN, generator=g, dtype=torch.float64))


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return loss_fn(self.net(x + 3 * self.global_rank))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=BATCH, shuffle=False)


class ShardedModule(Module):
    def __init__(self, sync: bool = False) -> None:
        super().__init__()
        self.sync = sync

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        from lightning_brn.distributed import convert_sync_batch_renorm

        if self.sync:  # synchronized layers under FSDP2: converted before sharding (no layer-sync plugin there)
            self.net = convert_sync_batch_renorm(self.net)
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def register_callbacks_factory() -> None:
    """What ``[project.entry-points."lightning.pytorch.callbacks_factory"]`` declares, for an install whose metadata
    predates it: Lightning's registry then finds lightning_brn's factory as it would in the package metadata."""
    from importlib.metadata import EntryPoint, entry_points

    import lightning.fabric.utilities.registry as registry

    group = "lightning.pytorch.callbacks_factory"
    ours = EntryPoint(name="lightning_brn", value="lightning_brn.plugins:callbacks_factory", group=group)
    if not any(e.value == ours.value for e in entry_points(group=group)):
        registry.entry_points = lambda group=None, **kw: [*entry_points(group=group), *([ours] if group == ours.group else [])]


class Record(pl.Callback):
    def __init__(self) -> None:
        self.seen: list = []
        self.inputs: list = []
        self.classes: set = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(averages(pl_module))  # after the optimizer step
        self.inputs.append(batch[0] + 3 * trainer.global_rank)
        self.classes |= {type(m).__name__ for m in pl_module.modules() if "Renorm" in type(m).__name__}
        self.layer_sync = type(getattr(trainer.strategy, "_layer_sync", None)).__name__


def main(out: str, mode: str) -> None:
    from lightning_brn import RenormSchedule
    from lightning_brn.callbacks import BatchRenormScheduler
    from lightning_brn.plugins import RenormLayerSync

    record = Record()
    callbacks: list = [record]
    kwargs: dict = {"strategy": "ddp"}
    if mode == "plugin":
        kwargs["plugins"] = [RenormLayerSync()]
    elif mode == "sync_batchnorm":
        kwargs["sync_batchnorm"] = True
        # rmax 1.5 and dmax 0.5 throughout, as make_model's layers: the run can be compared with the plugin's
        callbacks.append(BatchRenormScheduler(RenormSchedule(rmax=1.5, dmax=0.5, momentum=0.1, warmup_steps=0, rmax_steps=1, dmax_steps=1), verbose=False))
    elif mode == "factory":
        register_callbacks_factory()
        kwargs["sync_batchnorm"] = True
    elif mode in ("fsdp2", "fsdp2_sync"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        kwargs["strategy"] = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    model = ShardedModule(sync=mode == "fsdp2_sync") if mode.startswith("fsdp2") else Module()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs,
    )
    trainer.fit(model)
    trainer.save_checkpoint(os.path.join(out, f"{mode}.ckpt"))
    after = sorted({type(m).__name__ for m in model.modules() if "Renorm" in type(m).__name__})
    torch.save(
        {"seen": record.seen, "inputs": record.inputs, "classes": sorted(record.classes), "after": after, "final": averages(model),
         "layer_sync": record.layer_sync},
        os.path.join(out, f"{mode}_rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    for mode in sys.argv[2].split(","):  # one launch of the processes, one fit per mode
        main(sys.argv[1], mode)
