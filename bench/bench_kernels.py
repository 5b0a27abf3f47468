#!/usr/bin/env python
r"""The generated code of compiled batchnorm and compiled Batch Renorm, timed without the Python around it.

``bench_layers.py`` times a compiled layer's whole training step: dynamo's guards, AOTAutograd's runtime
wrappers, the autograd engine, and the code inductor generated. This script separates the last part. For each
shape and format it compiles the training step (``y = layer(x); torch.autograd.grad(y, [x, weight, bias], g)``)
of ``torch.nn.BatchNorm2d`` (``BatchNorm1d`` for the 1d shape) and of ``lightning_brn.BatchRenorm2d(rmax=3,
dmax=5)``, takes the forward and backward modules inductor wrote (:func:`torch._inductor.utils.run_and_get_code`)
and times their ``call`` directly: the generated C++ kernels plus the allocation of their outputs. Inputs are
each module's own example arguments (``get_args``), filled with values in [0.5, 1.5] (no NaN or denormal
slows either side). Interleaved, shuffled rounds as in ``bench_layers.py``; the paired ratio is the median over
rounds of renorm's time over batchnorm's in the same round, with a distribution-free 95% interval.

The difference between ``bench_layers.py``'s compiled column and this one is the fixed per-call cost of the
compiled step, which ``bench_overhead.py`` measures on its own. CPU only: on CUDA the generated code launches
asynchronous Triton kernels, which ``bench_layers.py --device cuda`` times with synchronization.

Usage::

    python bench/bench_kernels.py --threads 1 --clock cpu
    python bench/bench_kernels.py --shapes 3,4 --formats contiguous
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shlex
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

import torch
from torch import nn

import lightning_brn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import malloc_note, pin_malloc  # noqa: E402
from bench_layers import (  # noqa: E402
    DMAX,
    MOMENTUM,
    RMAX,
    SHAPE_1D,
    SHAPES_2D,
    code_version,
    cpu_name,
    paired_ratio,
    time_interleaved,
    warm_up,
)

PASSES = ("forward", "backward")


def generated_modules(step: Callable[[], None], tmp: str, tag: str) -> dict[str, object]:
    """Run ``step`` (whose first call compiles) with inductor's caches off and return the forward and backward
    modules inductor generated, imported from ``tmp``, keyed ``"forward"`` / ``"backward"``."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    with inductor_config.patch(force_disable_caches=True):
        _, sources = run_and_get_code(step)
    found: dict[str, object] = {}
    for i, src in enumerate(sources):
        kind = next((p for p in PASSES if f"_{p}']" in src), None)
        if kind is None or kind in found:
            raise RuntimeError(f"{tag}: expected one forward and one backward graph, got {len(sources)} graphs")
        path = os.path.join(tmp, f"{tag}_{kind}_{i}.py")
        with open(path, "w") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location(f"{tag}_{kind}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        found[kind] = mod
    if set(found) != set(PASSES):
        raise RuntimeError(f"{tag}: expected a forward and a backward graph, got {sorted(found)}")
    return found


def kernel_call(mod: object) -> Callable[[], None]:
    """``mod.call`` on its example arguments (floating ones filled with values in [0.5, 1.5])."""
    args = mod.get_args()  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(0)
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a.uniform_(0.5, 1.5, generator=gen)
    call = mod.call  # type: ignore[attr-defined]

    def run() -> None:
        call(list(args))  # ``call`` clears the list it is given

    return run


def bench_shape(shape: tuple[int, ...], fmt: str, args: argparse.Namespace, tmp: str, seed: int) -> dict:
    c = shape[1]
    one_d = len(shape) == 2
    bn = (nn.BatchNorm1d if one_d else nn.BatchNorm2d)(c)
    brn = (lightning_brn.BatchRenorm1d if one_d else lightning_brn.BatchRenorm2d)(
        c, momentum=MOMENTUM, rmax=RMAX, dmax=DMAX
    )
    x = torch.randn(shape)
    g = torch.randn(shape)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    steps: dict[str, Callable[[], None]] = {}
    for tag, mod in (("bn", bn), ("brn", brn)):
        cm = torch.compile(mod)

        def step(cm: nn.Module = cm, mod: nn.Module = mod) -> None:
            torch.autograd.grad(cm(x), [x, mod.weight, mod.bias], g)

        for kind, gen_mod in generated_modules(step, tmp, f"{tag}_{'_'.join(map(str, shape))}_{fmt}").items():
            steps[f"{tag} {kind}"] = kernel_call(gen_mod)
    errors: dict[str, str] = {}
    warm_up(steps, args.warmup, torch.device("cpu"), errors)
    if errors:
        raise RuntimeError(f"{shape} {fmt}: {errors}")
    times, inner = time_interleaved(
        steps, "bn forward", reps=args.reps, sample_ms=args.sample_ms, probes=3, max_inner=500, clock=args.clock,
        device=torch.device("cpu"), seed=seed,
    )
    for tag in ("bn", "brn"):  # forward + backward of the same round
        times[tag] = [f + b for f, b in zip(times[f"{tag} forward"], times[f"{tag} backward"])]
    return {"shape": shape, "fmt": fmt, "times": times, "errors": {}, "inner": inner}


def us(res: dict, name: str) -> str:
    return f"{statistics.median(res['times'][name]) * 1e6:.1f}"


def table(results: list[dict]) -> str:
    out = [
        "### Generated code alone (median us per call; renorm / batchnorm: median of the per-round ratios, 95% "
        "interval in parentheses)\n",
        "| shape | format | bn forward | brn forward | brn / bn, forward | bn backward | brn backward "
        "| brn / bn, backward | brn / bn, forward + backward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shape = "(" + ", ".join(map(str, r["shape"])) + ")"
        out.append(
            f"| {shape} | {r['fmt']} | {us(r, 'bn forward')} | {us(r, 'brn forward')} "
            f"| {paired_ratio(r, 'brn forward', 'bn forward')} | {us(r, 'bn backward')} | {us(r, 'brn backward')} "
            f"| {paired_ratio(r, 'brn backward', 'bn backward')} | {paired_ratio(r, 'brn', 'bn')} |"
        )
    return "\n".join(out) + "\n"


def header(args: argparse.Namespace, argv: list[str]) -> str:
    return "\n".join(
        [
            "## Compiled batchnorm vs compiled Batch Renorm: the generated forward and backward code alone",
            "",
            f"- command: `{shlex.join(['python', 'bench/bench_kernels.py', *argv])}`",
            f"- run: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
            f"code: {code_version()}",
            f"- torch {torch.__version__}, lightning_brn {lightning_brn.__version__}, device: {cpu_name()}, "
            f"threads {torch.get_num_threads()}, clock {args.clock}, {args.reps} repetitions",
            f"- allocator: {malloc_note()}",
            f"- renorm: rmax={RMAX}, dmax={DMAX}, momentum={MOMENTUM}; timed: the `call` of the forward and of the "
            "backward module inductor generated for the training step (kernels and output allocation; no guards, "
            "no runtime wrappers, no autograd engine)",
            "",
        ]
    )


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="comma-separated indices into the shape list (0-4 2d, 5 = 1d)")
    p.add_argument("--formats", default="contiguous,channels_last", help="memory formats for the 4d shapes")
    p.add_argument("--reps", type=int, default=41, help="timed repetitions per variant (default 41)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per variant (default 3)")
    p.add_argument("--sample-ms", type=float, default=20.0, help="length of one timed sample (default 20)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="cpu (default): time.process_time")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--out", default=None, help="also write the output (markdown) to this file")
    p.add_argument("--malloc", choices=("pinned", "default"), default="pinned", help="see bench/_common.py")
    args = p.parse_args(argv)
    for flag, value in (("--reps", args.reps), ("--warmup", args.warmup), ("--threads", args.threads)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if not args.sample_ms > 0:
        p.error(f"--sample-ms must be > 0, got {args.sample_ms}")
    all_shapes = [*SHAPES_2D, SHAPE_1D]
    if args.shapes is None:
        shapes = all_shapes
    else:
        try:
            shapes = [all_shapes[int(i)] for i in args.shapes.split(",")]
        except (ValueError, IndexError):
            p.error(f"--shapes {args.shapes!r}: expected comma-separated indices in 0-{len(all_shapes) - 1}")
    formats = args.formats.split(",")
    bad = [f for f in formats if f not in ("contiguous", "channels_last")]
    if bad:
        p.error(f"--formats {args.formats!r}: expected contiguous and/or channels_last, got {bad}")
    pin_malloc(args.malloc)  # every argument checked first: the re-executed run would refuse it again
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, shape in enumerate(shapes):
            for fmt in (["contiguous"] if len(shape) == 2 else formats):
                results.append(bench_shape(shape, fmt, args, tmp, seed=i))
    text = header(args, argv) + table(results) + f"\nTotal benchmark time: {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
