"""Fixed cost of one training step of one layer, eager and compiled: renorm against batchnorm on tiny inputs.

On an input of a few hundred values the arithmetic is negligible, so the time of ``y = layer(x)`` plus
``torch.autograd.grad(y, [x, weight, bias], g)`` is the per-layer, per-step overhead: Python, dispatch,
autograd, and for ``torch.compile`` the graph's wrappers and the calls it makes (batchnorm: one generated
kernel; renorm: the generated kernels of ``Route.COMPILED``). The four variants run interleaved in a
shuffled order, blocks of ``--inner`` steps, and the table shows medians in microseconds and the
difference to batchnorm in the same mode. The last row repeats the measurement on a larger input for
scale. With ``--in-model L`` each variant is instead a model of L blocks (1x1 convolution, the norm layer, ReLU),
compiled as one graph, and the brackets show the difference per layer: the fixed cost of one norm layer inside a
compiled model, where the graph's wrappers are shared by all its layers.

Usage::

    python bench/bench_overhead.py                   # CPU, one thread, CPU time
    python bench/bench_overhead.py --shape 4,512,7,7 # another input
    python bench/bench_overhead.py --in-model 16 --shape 4,32,2,2 --scale-shape 8,64,28,28  # inside a model
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

import lightning_brn
from lightning_brn import BatchRenorm2d, cpu_kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import malloc_note, pin_malloc  # noqa: E402


def _step(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    torch.autograd.grad(fn(x), [x, *module.parameters()], g)


def _model(norm: Callable[[int], nn.Module], c: int, layers: int) -> nn.Module:
    """``layers`` blocks of 1x1 convolution, ``norm(c)`` and ReLU."""
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Conv2d(c, c, 1), norm(c), nn.ReLU()]
    return nn.Sequential(*blocks)


def measure(
    shape: tuple[int, ...], reps: int, inner: int, clock: Callable[[], float], layers: int = 0
) -> dict[str, float]:
    """Median microseconds per step of eager/compiled batchnorm and renorm on an input of ``shape``: one layer, or
    with ``layers`` > 0 a model of that many blocks (:func:`_model`)."""
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape).requires_grad_()
    g = torch.randn(shape)
    if layers:
        bn, brn = _model(nn.BatchNorm2d, c, layers), _model(lambda n: BatchRenorm2d(n, rmax=3.0, dmax=5.0), c, layers)
    else:
        bn, brn = nn.BatchNorm2d(c), BatchRenorm2d(c, rmax=3.0, dmax=5.0)
    torch._dynamo.reset()
    variants = {
        "bn eager": (bn, bn),
        "bn compiled": (torch.compile(bn), bn),
        "brn eager": (brn, brn),
        "brn compiled": (torch.compile(brn), brn),
    }
    for fn, module in variants.values():  # compile and warm up
        for _ in range(3):
            _step(fn, module, x, g)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            fn, module = variants[name]
            t0 = clock()
            for _ in range(inner):
                _step(fn, module, x, g)
            samples[name].append((clock() - t0) / inner * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4,64,1,1", help="N,C,H,W of the tiny input (default 4,64,1,1)")
    p.add_argument("--scale-shape", default="4,512,7,7", help="N,C,H,W of the second, larger input")
    p.add_argument("--reps", type=int, default=40, help="timed blocks per variant (default 40)")
    p.add_argument("--inner", type=int, default=20, help="steps per timed block (default 20)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="cpu: time.process_time (default)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument(
        "--in-model", type=int, default=0, metavar="L",
        help="time a model of L blocks (1x1 conv, norm, ReLU) instead of one layer; brackets: difference per layer",
    )
    p.add_argument(
        "--malloc", choices=("pinned", "default"), default="pinned",
        help="pinned (default): re-run under glibc tunables that keep freed blocks for reuse (bench/_common.py)",
    )
    args = p.parse_args(argv)
    if args.in_model < 0:
        p.error(f"--in-model expects a number of blocks >= 0, got {args.in_model}")
    if argv is None:
        pin_malloc(args.malloc)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cpu_kernels.available()  # build or load the C++ kernels before timing
    rows = []
    for text in (args.shape, args.scale_shape):
        shape = tuple(int(v) for v in text.split(","))
        if len(shape) != 4:
            p.error(f"--shape/--scale-shape expect N,C,H,W, got {text!r}")
        rows.append((shape, measure(shape, args.reps, args.inner, clock, args.in_model)))
    if args.in_model:
        print(
            f"## Per-step cost of a compiled model of {args.in_model} blocks (1x1 conv, norm, ReLU), "
            f"forward + backward (median us; in brackets: (renorm - batchnorm) / {args.in_model}, per layer)\n"
        )
    else:
        print("## Per-step cost of one layer, forward + backward (median us; in brackets: renorm - batchnorm)\n")
    flag = f" --in-model {args.in_model}" if args.in_model else ""
    print(f"- command: `python bench/bench_overhead.py --shape {args.shape} --scale-shape {args.scale_shape}{flag}`")
    print("- compiled renorm: Route.COMPILED (x * scale + shift, batchnorm's backward)")
    print(
        f"- torch {torch.__version__}, lightning_brn {lightning_brn.__version__}, {platform.processor() or platform.machine()}, "
        f"threads {torch.get_num_threads()}, clock {args.clock}, {args.reps} blocks of {args.inner} steps, "
        f"C++ kernels: {'yes' if cpu_kernels.available() else 'no'}"
    )
    print(f"- allocator: {malloc_note()}\n")
    print("| input | bn eager | brn eager | bn compiled | brn compiled |")
    print("|---|---|---|---|---|")
    per = max(args.in_model, 1)
    for shape, t in rows:
        eager, compiled = (t["brn eager"] - t["bn eager"]) / per, (t["brn compiled"] - t["bn compiled"]) / per
        print(
            f"| {shape} | {t['bn eager']:.1f} | {t['brn eager']:.1f} [{eager:+.1f}] "
            f"| {t['bn compiled']:.1f} | {t['brn compiled']:.1f} [{compiled:+.1f}] |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
