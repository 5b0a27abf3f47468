"""Cost of Batch Renorm's data-parallel modes: wall time per DDP training step of a converted timm model.

Modes, each a separate copy of the model under ``DistributedDataParallel`` (same data, same process group):

- ``local``: renorm layers with per-rank moving averages (``share_running_stats(enabled=False)``): the baseline;
- ``shared``: the default, moving averages shared by every rank (one async all-reduce of 2C + 1 values per layer);
- ``sync``: :class:`lightning_brn.distributed.SyncBatchRenorm` (statistics over the process group);
- ``syncbn`` (CUDA only, torch's SyncBatchNorm needs it): the unconverted model after ``convert_sync_batchnorm``;
- ``bn``: the unconverted model with plain batchnorm.

One run interleaves the modes (each round times ``--steps`` steps of every mode, in a shuffled order) after warm-up,
and reports the median step time per mode and, for each mode, the median over rounds of its time divided by the
baseline's time in the same round, with a distribution-free 95% interval (order statistics).

    python bench/bench_distributed.py                        # 2 gloo processes on CPU (~2-4 min on 2 cores)
    python bench/bench_distributed.py --clock cpu            # CPU time per step: for a machine shared with others
    python bench/bench_distributed.py --device cuda --world 1  # one GPU (nccl, world 1: the machinery's cost)
    python bench/bench_distributed.py --device cuda --world 2  # two GPUs (nccl)
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(mode: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    import timm

    from lightning_brn import convert_model
    from lightning_brn.distributed import convert_sync_batch_renorm, share_running_stats

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    if mode == "syncbn":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif mode != "bn":
        model = convert_model(model, rmax=3.0, dmax=5.0)
        if mode == "sync":
            model = convert_sync_batch_renorm(model)
        share_running_stats(model, enabled=mode != "local")
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def interval(ratios: list[float]) -> tuple[float, float]:
    """Distribution-free 95% interval of the median (order statistics; the extremes for few rounds)."""
    r = sorted(ratios)
    n = len(r)
    k = max(0, int(n / 2 - 1.96 * (n ** 0.5) / 2))
    return r[k], r[min(n - 1, n - 1 - k)]


def worker(rank: int, args: argparse.Namespace, store: str) -> None:
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=args.world)
    modes = args.modes.split(",")
    if args.device != "cuda":
        modes = [m for m in modes if m != "syncbn"]
    models = {m: build(m, args, device) for m in modes}
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=0.01, momentum=0.9) for m in modes}
    g = torch.Generator().manual_seed(rank)
    x = (torch.randn(args.batch, 3, args.size, args.size, generator=g) + rank).to(device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    def step(m: str) -> None:
        opts[m].zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(models[m](x), y).backward()
        opts[m].step()

    def timed(m: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        t0 = clock()
        for _ in range(args.steps):
            step(m)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = torch.tensor([clock() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        return t.item() / args.steps

    for m in modes:
        for _ in range(args.warmup):
            step(m)
    rng = random.Random(0)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        order = modes[:]
        rng.shuffle(order)
        for m in order:
            times[m].append(timed(m))
    if rank == 0:
        base = args.baseline if args.baseline in modes else modes[0]
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)/rank"
        print(f"# {args.model}, batch {args.batch}/rank at {args.size}x{args.size}, world {args.world} ({dist.get_backend()}), "
              f"{name}; {args.rounds} rounds x {args.steps} steps; torch {torch.__version__}\n")
        print(f"clock: {args.clock}\n")
        print(f"| mode | median step (ms) | vs {base} (median of paired ratios, 95% interval) |")
        print("|---|---|---|")
        for m in modes:
            ratios = [a / b for a, b in zip(times[m], times[base])]
            lo, hi = interval(ratios)
            print(f"| {m} | {1e3 * statistics.median(times[m]):.2f} | {statistics.median(ratios):.3f} [{lo:.3f}, {hi:.3f}] |")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="examples per rank")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"],
        help="wall time, or the process's CPU time (all its threads, gloo's included): steadier on a shared machine",
    )
    p.add_argument("--modes", default="local,shared,sync,syncbn,bn")
    p.add_argument("--baseline", default="local")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if args.world == 1:
            worker(0, args, store)
        else:
            torch.multiprocessing.spawn(worker, args=(args, store), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
