"""Which moving-average rate alpha suits a short Batch Renorm run? (issue 5)

Trains a small CNN on Fashion-MNIST with batchnorm and with Batch Renorm (the paper's schedule
fitted to the run by ``RenormSchedule.for_run``) for a few run lengths and several alphas, and
reports validation accuracy (eval mode, i.e. with the moving averages) per config and seed as a
markdown table, also written to ``bench/results/momentum_study.md``.

Plain PyTorch loop on CPU, one thread; the IDX files are read with gzip + numpy (no download).

Usage::

    python bench/momentum_study.py                       # the default study (~10 min of one core)
    python bench/momentum_study.py --steps 300 --seeds 0 --alphas 0.01 0.1 --out /tmp/x.md  # smoke test
"""

from __future__ import annotations

import argparse
import gzip
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

import lightning_brn
from lightning_brn import BatchRenorm2d, RenormSchedule

DATA = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results" / "momentum_study.md"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    x = torch.from_numpy(read_idx(DATA / f"{prefix}-images-idx3-ubyte.gz").copy()).float().div_(255.0)
    y = torch.from_numpy(read_idx(DATA / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    x = (x - 0.2860) / 0.3530  # Fashion-MNIST mean / std
    return x.unsqueeze(1), y


def make_net(norm: Callable[[int], nn.Module]) -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, 16, 1),
        *block(16, 32, 2),
        *block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


class Batches:
    """Index batches: i.i.d. (random), or non-i.i.d. (``classes_per_batch`` labels, equally many images each)."""

    def __init__(self, y: torch.Tensor, batch: int, classes_per_batch: Optional[int], gen: torch.Generator) -> None:
        self.y, self.batch, self.k, self.gen = y, batch, classes_per_batch, gen
        self.by_class = [torch.nonzero(y == c).flatten() for c in range(10)]

    def __call__(self) -> torch.Tensor:
        if self.k is None:
            return torch.randint(len(self.y), (self.batch,), generator=self.gen)
        labels = torch.randperm(10, generator=self.gen)[: self.k]
        per = self.batch // self.k
        parts = [self.by_class[c][torch.randint(len(self.by_class[c]), (per,), generator=self.gen)] for c in labels.tolist()]
        return torch.cat(parts)


def train_eval(
    kind: str,
    alpha: Optional[float],
    steps: int,
    seed: int,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    batch: int,
    classes_per_batch: Optional[int],
    lr: float,
) -> float:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    if kind == "bn":
        net = make_net(lambda c: nn.BatchNorm2d(c))  # torch's default momentum 0.1 (eval statistics only)
        schedule = None
    else:
        assert alpha is not None
        net = make_net(lambda c: BatchRenorm2d(c, momentum=alpha))
        schedule = RenormSchedule.for_run(steps, momentum=alpha)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batches = Batches(ytr, batch, classes_per_batch, torch.Generator().manual_seed(1000 + seed))
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for step in range(steps):
        if schedule is not None:
            schedule.apply(net, step)
        idx = batches()
        loss = loss_fn(net(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(yte), 1000):
            correct += (net(xte[i : i + 1000]).argmax(1) == yte[i : i + 1000]).sum().item()
    return 100.0 * correct / len(yte)


def main(argv: Optional[list[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[500, 3000], help="run lengths (optimizer steps)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3], help="renorm momenta to try")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--classes-per-batch", type=int, default=None, help="non-i.i.d. batches: labels per batch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    xtr, ytr = load("train")
    xte, yte = load("test")
    data = (xtr, ytr, xte, yte)
    seeds = list(args.seeds)
    batches = "i.i.d." if args.classes_per_batch is None else f"non-i.i.d. ({args.classes_per_batch} labels per batch)"

    rows: list[str] = []
    t_start = time.perf_counter()
    for steps in args.steps:
        rule = RenormSchedule.momentum_for_run(steps)
        configs: list[tuple[str, Optional[float], str]] = [("bn", None, "batchnorm (momentum 0.1)")]
        alphas = sorted(set(args.alphas) | {rule})
        for a in alphas:
            configs.append(("brn", a, f"renorm alpha={a:g}" + (" (rule)" if a == rule else "")))
        sched = RenormSchedule.for_run(steps)
        print(
            f"# {steps} steps: for_run -> warmup {sched.warmup_steps}, dmax at {sched.dmax_steps}, "
            f"rmax at {sched.rmax_steps}; rule alpha = {rule:g}",
            flush=True,
        )
        for kind, alpha, label in configs:
            accs = []
            for seed in seeds:
                t0 = time.perf_counter()
                acc = train_eval(kind, alpha, steps, seed, data, args.batch, args.classes_per_batch, args.lr)
                accs.append(acc)
                print(f"  {label:32s} seed {seed}: {acc:.2f}%  ({time.perf_counter() - t0:.1f}s)", flush=True)
            mean = statistics.fmean(accs)
            rows.append(
                f"| {steps} | {label} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | **{mean:.2f}** |"
            )
    elapsed = time.perf_counter() - t_start

    header = (
        f"| steps | config | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |\n"
        "|---|---|" + "---|" * len(seeds) + "---|"
    )
    text = "\n".join(
        [
            "# Moving-average rate (alpha) for short Batch Renorm runs",
            "",
            f"Fashion-MNIST, 3-conv CNN (16/32/64 channels, norm after each conv), batch {args.batch}, {batches} batches,",
            f"SGD nesterov momentum 0.9, one-cycle lr {args.lr}, weight decay 5e-4. Renorm uses "
            "`RenormSchedule.for_run(steps, momentum=alpha)` (the paper's 5k/25k/40k of 130k scaled to the run).",
            "Validation accuracy (%) on the 10k test images in eval mode (moving averages).",
            "",
            header,
            *rows,
            "",
            f"Command: `python bench/momentum_study.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
            f"torch {torch.__version__}, lightning_brn {lightning_brn.__version__}, {platform.processor() or platform.machine()}, "
            f"1 thread, {elapsed:.0f} s in all.",
            "",
        ]
    )
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
