"""Whole models, one training step: batchnorm against the same model after ``convert_model``, eager and compiled.

``bench_layers.py`` times one layer on its own; users train models. This script times the training step of
timm models in the small-batch regime Batch Renorm is for (default: batches of 8 at 64x64): ``loss =
cross_entropy(model(x), y)`` and ``torch.autograd.grad(loss, parameters)``, for

- ``bn``: the timm model as built (``BatchNorm2d`` or timm's ``BatchNormAct2d``);
- ``brn``: ``convert_model(copy of bn, rmax=3, dmax=5)`` (the paper's late-training clip; every layer does the
  full renorm step);
- ``bn compiled`` / ``brn compiled``: ``torch.compile`` of each (default mode), the model compiled as a whole.

The four variants run interleaved (each repetition runs every variant once, in shuffled order) after warm-up.
The table gives the median time of batchnorm per step and, for renorm, the median over repetitions of renorm's
time divided by batchnorm's in the same round (eager by eager, compiled by compiled), with a distribution-free
95% interval for that median (an interval that contains 1 means the run cannot tell the two apart).

Usage::

    python bench/bench_model.py                                  # CPU, one thread, CPU time
    python bench/bench_model.py --models resnet18 --batch 4      # a subset
    python bench/bench_model.py --device cuda --clock wall       # on a GPU machine
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import lightning_brn
from lightning_brn import cpu_kernels, convert_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import malloc_note, pin_malloc  # noqa: E402
from bench_layers import (  # noqa: E402
    code_version,
    cpu_name,
    paired_ratio,
    short_error,
    sync,
    time_interleaved,
    warm_up,
)

MODELS = ("resnet18", "efficientnet_b0", "mobilenetv3_large_100")
RMAX, DMAX = 3.0, 5.0
VARIANTS = ("bn", "brn", "bn compiled", "brn compiled")


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)

    return step


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    import timm

    torch.manual_seed(0)
    bn = timm.create_model(name, pretrained=False, num_classes=10).to(device).train()
    brn = convert_model(copy.deepcopy(bn), rmax=RMAX, dmax=DMAX, microbatch_size=args.microbatch_size)
    n_layers = sum(1 for m in brn.modules() if lightning_brn.is_batch_renorm(m))
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        bn = bn.to(memory_format=torch.channels_last)
        brn = brn.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    models: dict[str, nn.Module] = {"bn": bn, "brn": brn}
    errors: dict[str, str] = {}
    compile_s: dict[str, float] = {}
    steps: dict[str, Callable[[], None]] = {"bn": make_step(bn, x, y), "brn": make_step(brn, x, y)}
    if not args.no_compile:
        torch._dynamo.reset()
        for src in ("bn", "brn"):
            key = f"{src} compiled"
            try:
                st = make_step(torch.compile(models[src]), x, y)
                t0 = time.perf_counter()
                st()
                sync(device)
                compile_s[key] = time.perf_counter() - t0
                steps[key] = st
            except Exception as e:  # noqa: BLE001 - reported in the table cell
                errors[key] = short_error(e)
    warm_up(steps, args.warmup, device, errors)
    if "bn" not in steps:
        raise RuntimeError(f"{name}: eager batchnorm, the reference of every ratio, failed: {errors['bn']}")
    times, inner = time_interleaved(
        steps, "bn", reps=args.reps, sample_ms=args.sample_ms, probes=2, max_inner=50, clock=args.clock,
        device=device, seed=0,
    )
    return {"name": name, "layers": n_layers, "times": times, "errors": errors, "compile_s": compile_s, "inner": inner}


def ms(res: dict, name: str) -> str:
    if name in res["errors"]:
        return res["errors"][name]
    if name not in res["times"]:
        return "-"
    return f"{statistics.median(res['times'][name]) * 1e3:.2f}"


def table(results: list[dict], args: argparse.Namespace) -> str:
    fmt = "channels_last" if args.channels_last else "NCHW"
    out = [
        "### Training step of a whole model (median ms; renorm / batchnorm: median of the per-round ratios, "
        "95% interval in parentheses)\n",
        "| model | renorm layers | input | bn eager (ms) | brn / bn, eager | bn compiled (ms) | brn compiled / bn compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shape = f"({args.batch}, 3, {args.size}, {args.size}) {fmt}"
        comp = ("-", "-") if args.no_compile else (ms(r, "bn compiled"), paired_ratio(r, "brn compiled", "bn compiled"))
        out.append(f"| {r['name']} | {r['layers']} | {shape} | {ms(r, 'bn')} | {paired_ratio(r, 'brn', 'bn')} | {comp[0]} | {comp[1]} |")
    return "\n".join(out) + "\n"


def header(args: argparse.Namespace, device: torch.device, argv: list[str]) -> str:
    import timm

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return "\n".join(
        [
            "## Whole models, training step: batchnorm vs convert_model (Batch Renorm), eager and compiled",
            "",
            f"- command: `{shlex.join(['python', 'bench/bench_model.py', *argv])}`",
            f"- run: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; code: {code_version()}",
            f"- torch {torch.__version__}, timm {timm.__version__}, lightning_brn {lightning_brn.__version__}, "
            f"{platform.machine()}, device: {dev}, threads {torch.get_num_threads()}, clock {args.clock}, "
            f"{args.reps} repetitions, C++ kernels: {'yes' if device.type == 'cpu' and cpu_kernels.available() else 'no'}",
            f"- allocator: {malloc_note()}",
            f"- step = `loss = cross_entropy(model(x), y); torch.autograd.grad(loss, parameters)`, train mode, float32; "
            f"renorm layers: rmax={RMAX}, dmax={DMAX}, microbatch_size={args.microbatch_size}; compiled renorm: "
            "Route.COMPILED (`lightning_brn.routes`), fused with neighbouring ops",
            "",
        ]
    )


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated timm model names (default {','.join(MODELS)})")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--channels-last", action="store_true", help="channels_last input and model")
    p.add_argument(
        "--microbatch-size", type=int, default=None,
        help="microbatch_size of the renorm layers (paper section 4.2; batchnorm normalizes the whole batch)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--reps", type=int, default=41, help="timed repetitions per variant (default 41)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant (default 2)")
    p.add_argument("--sample-ms", type=float, default=200.0, help="length of one timed sample (default 200)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="cpu: time.process_time (default; CPU only)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--out", default=None, help="also write the output (markdown) to this file")
    p.add_argument("--malloc", choices=("pinned", "default"), default="pinned", help="see bench/README.md")
    given = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if argv is None:
        pin_malloc(args.malloc)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        p.error("--clock cpu measures host CPU time: use --clock wall with --device cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but torch.cuda.is_available() is False")
    if args.microbatch_size is not None and (args.microbatch_size < 1 or args.batch % args.microbatch_size):
        p.error(f"--microbatch-size must be >= 1 and divide --batch {args.batch}, got {args.microbatch_size}")
    for flag, value in (("--batch", args.batch), ("--size", args.size), ("--reps", args.reps)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    if device.type == "cpu":
        cpu_kernels.available()  # build (or load) the C++ kernels before any timing
    results = []
    for name in [m for m in args.models.split(",") if m]:
        t0 = time.perf_counter()
        res = bench_model(name, args, device)
        comp = ", ".join(f"{k} {v:.0f}s" for k, v in res["compile_s"].items())
        print(f"  done {name} in {time.perf_counter() - t0:.0f}s (inner={res['inner']}; first compiled call: {comp or '-'})", file=sys.stderr)
        results.append(res)
    text = header(args, device, given) + table(results, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
