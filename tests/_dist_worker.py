"""Multi-process scenarios for tests/test_distributed.py: ``python tests/_dist_worker.py OUT SCENARIO WORLD``.

Each scenario runs on WORLD gloo CPU processes (``torch.multiprocessing.spawn``, a file rendezvous in OUT) in
float64, with rank-dependent data, and ``torch.save``s what each rank saw into OUT; rank 0 also saves the
single-process reference (the ranks' batches concatenated, ``microbatch_size`` = per-rank batch). The test file
asserts on those files.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

B, C_IN, STEPS = 4, 3, 3
MIXED = (2, None)  # microbatches of 2 in the first layer (2 groups per rank), none in the second


def make_model(microbatch_size=None) -> nn.Module:
    """Two renorm layers with different eps; ``microbatch_size``: one for both, or a pair (one per layer)."""
    from lightning_brn import BatchRenorm1d

    torch.manual_seed(0)
    sizes = microbatch_size if isinstance(microbatch_size, tuple) else (microbatch_size, microbatch_size)
    kw = dict(rmax=1.5, dmax=0.5, momentum=0.1)
    model = nn.Sequential(
        BatchRenorm1d(C_IN, microbatch_size=sizes[0], **kw), nn.Linear(C_IN, 6),
        BatchRenorm1d(6, eps=1e-3, microbatch_size=sizes[1], **kw), nn.ReLU(), nn.Linear(6, 2),
    )
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.double()


def batch(step: int, rank: int, micro: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + 10 * rank + micro)
    return torch.randn(B, C_IN, generator=g, dtype=torch.float64) * (1 + rank) + 3 * rank


def averages(model: nn.Module) -> list[torch.Tensor]:
    from lightning_brn import is_batch_renorm

    return [t.detach().clone() for m in model.modules() if is_batch_renorm(m) for t in (m.running_mean, m.running_var)]


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return (out - 1).square().mean()


def reference(world: int, micro_steps: int = 1, microbatch_size=B) -> list[list[torch.Tensor]]:
    """One process, the ranks' batches concatenated and normalized as microbatches of the per-rank batch."""
    model = make_model(microbatch_size=microbatch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(STEPS):
        for micro in range(micro_steps):
            x = torch.cat([batch(step, r, micro) for r in range(world)])
            (loss_fn(model(x)) / micro_steps).backward()
        opt.step()
        opt.zero_grad()
        seen.append(averages(model))
    return seen


# --------------------------------------------------------------------------------------------- scenarios
def ddp(
    rank: int, world: int, out: str, explicit: bool, micro_steps: int = 1, local: bool = False, microbatch_size=None
) -> dict:
    """Plain DistributedDataParallel; ``explicit``: share_running_stats before wrapping, broadcast_buffers=False;
    ``local``: share_running_stats(enabled=False), broadcast_buffers=False (per-rank averages)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lightning_brn.distributed import share_running_stats

    model = make_model(microbatch_size)
    if explicit or local:
        share_running_stats(model, enabled=not local)
    ddp_model = DDP(model, broadcast_buffers=not (explicit or local))
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    seen = []
    for step in range(STEPS):
        for micro in range(micro_steps):
            x = batch(step, rank, micro)
            if micro < micro_steps - 1:
                with ddp_model.no_sync():
                    (loss_fn(ddp_model(x)) / micro_steps).backward()
            else:
                (loss_fn(ddp_model(x)) / micro_steps).backward()
        opt.step()  # the optimizer step post-hook writes the shared averages
        opt.zero_grad()
        seen.append(averages(model))
    state = model.state_dict()
    return {"seen": seen, "state": state, "ignored": sorted(getattr(model, "_ddp_params_and_buffers_to_ignore", []))}


def compiled(rank: int, world: int, out: str) -> dict:
    """torch.compile(fullgraph=True) of a model with shared averages: the all-reduce is in the graph."""
    from lightning_brn.distributed import share_running_stats

    model = share_running_stats(make_model())
    step_model = torch.compile(model, backend="aot_eager", fullgraph=True)  # AOTAutograd: the backward graph too
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(STEPS):
        loss = loss_fn(step_model(batch(step, rank)))
        loss.backward()
        for p in model.parameters():  # no DDP here: average the gradients by hand
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        opt.zero_grad()
        seen.append(averages(model))
    return {"seen": seen}


def resume(rank: int, world: int, out: str) -> dict:
    """Two ranks resume from the rank-0 checkpoint of the ddp scenario and take one more step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    model.load_state_dict(torch.load(os.path.join(out, "ddp_auto_rank0.pt"))["state"])
    ddp_model = DDP(model)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    loss_fn(ddp_model(batch(STEPS, rank))).backward()
    opt.step()
    return {"seen": [averages(model)]}


def fsdp(rank: int, world: int, out: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(STEPS):
        loss_fn(model(batch(step, rank))).backward()
        opt.step()
        opt.zero_grad()
        seen.append(averages(model))
    return {"seen": seen}


def sync_layer(rank: int, world: int, out: str, group_size: int, fsdp: bool = False) -> dict:
    """SyncBatchRenorm over groups of ``group_size`` consecutive ranks on 4D data: two training steps. Over the
    world group the layer is made by ``convert_model(BatchNorm2d, sync=True)``, over subgroups built directly.
    ``fsdp``: the layer wrapped by FSDP2's ``fully_shard`` on a CPU device mesh (weight and bias sharded)."""
    from lightning_brn import convert_model
    from lightning_brn.distributed import SyncBatchRenorm

    torch.manual_seed(0)
    if group_size == world:
        layer = convert_model(nn.BatchNorm2d(5), rmax=1.5, dmax=0.3, momentum=0.2, sync=True)
        assert type(layer) is SyncBatchRenorm
    else:
        groups = [dist.new_group(list(range(s, s + group_size))) for s in range(0, world, group_size)]
        layer = SyncBatchRenorm(5, rmax=1.5, dmax=0.3, momentum=0.2, process_group=groups[rank // group_size])
    layer = _randomized(layer.double())
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(layer, mesh=init_device_mesh("cpu", (world,)))
    results = []
    for step in range(2):
        x, g = sync_inputs(step, world)
        xr = x.chunk(world)[rank].clone().requires_grad_()
        layer.weight.grad = layer.bias.grad = None
        y = layer(xr)
        (y * g.chunk(world)[rank]).sum().backward()
        if fsdp:  # reduce-scattered shards of the mean over ranks (as DDP's all-reduce): the whole is world times it
            grads = torch.cat([layer.weight.grad.full_tensor(), layer.bias.grad.full_tensor()]) * world
        else:
            grads = torch.cat([layer.weight.grad, layer.bias.grad])
            dist.all_reduce(grads)  # each rank holds its share of the parameter gradients: their sum is the whole
        with torch.no_grad():  # a later step sees moved parameters, as after an optimizer step
            layer.weight.add_(0.1)
        results.append({"y": y.detach(), "grad_x": xr.grad, "grads": grads})
    from lightning_brn.distributed import wait_running_stats

    wait_running_stats(layer)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in layer.state_dict().items()}
    return {"steps": results, "buffers": {k: v.clone() for k, v in state.items()}}


def _randomized(layer: torch.nn.Module) -> torch.nn.Module:
    """The same random moving averages and affine parameters for the synchronized layer and its reference."""
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


def sync_inputs(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7 + step)
    x = torch.randn(2 * world, 5, 3, 3, generator=g, dtype=torch.float64)
    x = x + torch.arange(2 * world, dtype=torch.float64).view(-1, 1, 1, 1)  # rank-dependent data
    return x, torch.randn(x.shape, generator=g, dtype=torch.float64)


def sync_reference(world: int, group_size: int) -> dict:
    from lightning_brn import BatchRenorm2d

    torch.manual_seed(0)
    layer = _randomized(BatchRenorm2d(5, rmax=1.5, dmax=0.3, momentum=0.2, microbatch_size=2 * group_size).double())
    results = []
    for step in range(2):
        x, g = sync_inputs(step, world)
        x.requires_grad_()
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        (y * g).sum().backward()
        with torch.no_grad():
            layer.weight.add_(0.1)
        results.append({"y": y.detach(), "grad_x": x.grad, "grads": torch.cat([layer.weight.grad, layer.bias.grad])})
    return {"steps": results, "buffers": {k: v.clone() for k, v in layer.state_dict().items()}}


SCENARIOS = {
    "ddp_auto": lambda r, w, o: ddp(r, w, o, explicit=False),
    "ddp_explicit": lambda r, w, o: ddp(r, w, o, explicit=True),
    "ddp_no_sync": lambda r, w, o: ddp(r, w, o, explicit=False, micro_steps=2),
    "ddp_local": lambda r, w, o: ddp(r, w, o, explicit=False, local=True),
    "ddp_microbatches": lambda r, w, o: ddp(r, w, o, explicit=False, microbatch_size=MIXED),
    "resume": resume,
    "fsdp": fsdp,
    "compiled": compiled,
    "sync": lambda r, w, o: sync_layer(r, w, o, group_size=w),
    "sync_subgroups": lambda r, w, o: sync_layer(r, w, o, group_size=w // 2),
    "sync_fsdp": lambda r, w, o: sync_layer(r, w, o, group_size=w, fsdp=True),
}


def worker(rank: int, world: int, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        for name in names:
            torch.save(SCENARIOS[name](rank, world, out), os.path.join(out, f"{name}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def main(out: str, names: list[str], world: int) -> None:
    torch.multiprocessing.spawn(worker, args=(world, out, names), nprocs=world, join=True)
    refs = {
        "reference": reference(world),
        "reference_no_sync": reference(world, micro_steps=2),
        "sync_reference": sync_reference(world, world),
        "sync_subgroups_reference": sync_reference(world, world // 2),
    }
    torch.save(refs, os.path.join(out, f"references_{world}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[3].split(","), int(sys.argv[2]))
