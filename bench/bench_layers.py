#!/usr/bin/env python
r"""Speed and saved-memory benchmark of Batch Renorm against batchnorm (issues 2 and 22, "Speed and memory", "Speed as
users run it").

Training mode, forward + backward (``torch.autograd.grad(y, [x, weight, bias], grad)`` with a fixed
random ``grad``), float32. For every shape and memory format it builds, with the same weights:

- ``bn``: ``torch.nn.BatchNorm2d`` (``BatchNorm1d`` for the 1d shape), eager;
- ``brn``: ``lightning_brn.BatchRenorm2d(rmax=3, dmax=5)`` with running statistics set so that r and
  d clip on some channels (realistic: the clamp's both branches are live), eager;
- ``literal``: Algorithm 1 written from autograd ops (mean, mean of squares, sqrt, clamp, detach for
  r and d), what typical third-party implementations do;
- ``bn compiled`` / ``brn compiled``: ``torch.compile`` of the two modules (default mode);
- with ``microbatch_size=4`` (shapes whose batch 4 divides): ``brn mb4`` and ``literal mb4`` eager,
  and ``brn mb4 compiled``;
- ``brn eager, Python path`` (and ``brn mb4 ..., Python path``): the same renorm modules with the C++ CPU
  kernels switched off (``lightning_brn.cpu_kernels.use_cpp(False)``), i.e. the pure-PyTorch implementation that
  CUDA, half precision and machines without a compiler use. Eager ``brn`` is the default path: on CPU,
  float32, the C++ kernels when they are built (the header says whether they are);
- ``copy``: ``out.copy_(x)`` into a preallocated tensor of the same shape and memory format, the memory-bound
  reference of the throughput table.

Timing modes (``--modes``, default ``cpu1,wall`` on CPU, ``wall`` on CUDA): ``cpu1`` is one thread
(``torch.set_num_threads(1)``) timed with the CPU time of the process (``time.process_time``: a process that waits
for a core is not charged for the wait, steady on a shared machine); ``wall`` is torch's default thread count at
start-up timed with ``time.perf_counter``, as users run it. In general ``cpu<N>`` / ``wall<N>`` (N threads; no N:
torch's default). Every configuration is timed once per mode, one mode after the other, with the thread count
switched between them; compiled variants run code generated for each mode's thread count (inductor's CPU kernels fix
their OpenMP thread count when generated; dynamo guards on the count and recompiles in the mode's warm-up). ``--threads N`` / ``--clock cpu|wall`` (the options of earlier
versions) define a single mode instead and cannot be combined with ``--modes``.

Within a mode all variants of one shape are timed interleaved (each repetition runs every variant once, in a
shuffled order) after warm-up; the time tables (one per mode) show medians and ratios to eager batchnorm (compiled
renorm also against compiled batchnorm). The paired-ratio table, every mode side by side, divides each repetition's
renorm time by batchnorm's from the same round, so that a slow spell of a shared machine cancels out, and gives the
median of those ratios with a distribution-free 95% interval (order statistics; 41 repetitions: the 14th to the 28th
smallest ratio): an interval that contains 1 means the run cannot tell the two apart.

Memory throughput (one table per mode): a training step must move at least 5 x the tensor's bytes (the forward
reads x and writes y; the backward reads x and dy and writes dx); that minimum divided by the median step time is
the step's GB/s, and the copy's GB/s is 2 x the tensor's bytes over its median time. The fraction of the copy's is
the paired median over rounds (2.5 x copy time / step time) with its 95% interval: how close the step comes to the
memory-bound limit.

Memory is the bytes of the unique storages saved for backward (the same in every mode),
counted with :class:`torch.autograd.graph.saved_tensors_hooks` during one forward; the INPUT's storage
IS INCLUDED when a variant saves it (every variant here does), so subtract the "input MiB" column to
get the extra memory a layer keeps alive. On CUDA the tables also give
``torch.cuda.max_memory_allocated`` during one forward + backward, above the memory allocated before it.

Run ``python bench/bench_layers.py --help`` for the options; ``--quick`` is a short smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

import lightning_brn
from lightning_brn import cpu_kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import malloc_note, pin_malloc  # noqa: E402

SHAPES_2D = [(32, 64, 56, 56), (32, 256, 14, 14), (8, 64, 112, 112), (4, 512, 7, 7), (2, 64, 56, 56)]
SHAPE_1D = (256, 1024)
RMAX, DMAX, MOMENTUM, EPS = 3.0, 5.0, 0.01, 1e-5
MICRO = 4
MIB = 2.0**20
PY_VARIANTS = {"brn_py": "brn", "brn_mb_py": "brn_mb"}  # the Python path of these modules (C++ kernels off)
# the layer sources code_version() hashes: the training step and what it dispatches to
LAYER_SOURCES = (
    "functional.py", "layers.py", "cpu_kernels.py", "csrc/renorm_cpu.cpp", "algorithm.py", "routes/__init__.py",
    "routes/aten.py", "routes/compiled.py",
)
STEP_BYTES, COPY_BYTES = 5, 2  # tensor sizes a training step moves at least (x, y; x, dy, dx) and a copy moves (x, out)
# the paired-ratio columns: (variant, reference, column name before the mode's label)
PAIRS = (
    ("brn", "bn", "brn / bn"),
    ("brn_c", "bn_c", "brn compiled / bn compiled"),
    ("brn_mb", "bn", f"brn mb{MICRO} / bn"),
    ("brn_mb_c", "bn_c", f"brn mb{MICRO} compiled / bn compiled"),
)


class Mode(NamedTuple):
    """One timing set-up: a clock and a thread count."""

    name: str  # as given to --modes: "cpu1", "wall", "wall4", ...
    clock: str  # "cpu": time.process_time, the CPU time of the process; "wall": time.perf_counter
    threads: int

    @property
    def label(self) -> str:
        """``1 thread CPU time`` / ``wall, 2 threads``: how the tables name the mode."""
        n = f"{self.threads} thread{'' if self.threads == 1 else 's'}"
        return f"{n} CPU time" if self.clock == "cpu" else f"wall, {n}"


def parse_modes(spec: str, default_threads: int) -> list[Mode]:
    """``"cpu1,wall"`` as modes: ``cpu<N>`` / ``wall<N>``, N threads (no N: ``default_threads``)."""
    modes = []
    for item in (i.strip() for i in spec.split(",")):
        m = re.fullmatch(r"(cpu|wall)(\d*)", item)
        if not m or m.group(2) and int(m.group(2)) < 1:
            raise ValueError(f"expected cpu<N> or wall<N> (N >= 1 threads, no N: torch's default), got {item!r}")
        modes.append(Mode(item, m.group(1), int(m.group(2)) if m.group(2) else default_threads))
    labels = [m.label for m in modes]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a mode given twice: {', '.join(labels)}")
    return modes


class LiteralBatchRenorm(nn.Module):
    """Algorithm 1 of the paper built from autograd ops, line by line (the baseline to beat).

    Keeps the moving standard deviation ``running_std`` as the paper does. With ``microbatch_size``
    each group of consecutive examples gets its own statistics, and the moving averages move towards
    the mean over groups.
    """

    def __init__(self, num_features: int, microbatch_size: Optional[int] = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.microbatch_size = microbatch_size

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        groups = 1 if self.microbatch_size is None else n // self.microbatch_size
        xg = x.view(groups, n // groups, *x.shape[1:])  # a view, also for channels_last
        dims = [1] + list(range(3, xg.dim()))
        bshape = (1, 1, c) + (1,) * (x.dim() - 2)
        mu_b = xg.mean(dims, keepdim=True)
        sigma_b = torch.sqrt(EPS + ((xg - mu_b) ** 2).mean(dims, keepdim=True))
        mu = self.running_mean.view(bshape)
        sigma = self.running_std.view(bshape)
        r = torch.clamp(sigma_b / sigma, 1.0 / RMAX, RMAX).detach()
        d = torch.clamp((mu_b - mu) / sigma, -DMAX, DMAX).detach()
        x_hat = (xg - mu_b) / sigma_b * r + d
        y = self.weight.view(bshape) * x_hat + self.bias.view(bshape)
        with torch.no_grad():
            self.running_mean += MOMENTUM * (mu_b.mean(0).view(c) - self.running_mean)
            self.running_std += MOMENTUM * (sigma_b.mean(0).view(c) - self.running_std)
        return y.view(x.shape)


# ----------------------------------------------------------------------------- helpers
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")
    return "FAIL " + (msg[:70] + "..." if len(msg) > 73 else msg)


def make_step(mod: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    params = [x] + [p for p in mod.parameters()]

    def step() -> None:
        y = mod(x)
        torch.autograd.grad(y, params, grad)

    return step


def python_path(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the C++ CPU kernels switched off."""

    def run() -> None:
        with cpu_kernels.use_cpp(False):
            step()

    return run


def saved_bytes(mod: nn.Module, x: Tensor) -> tuple[int, int]:
    """(bytes of unique saved storages, number of saved tensors) of one training forward."""
    storages: dict[tuple, int] = {}
    count = [0]

    def pack(t: Tensor) -> Tensor:
        count[0] += 1
        st = t.untyped_storage()
        storages[(st.data_ptr(), str(t.device), st.nbytes())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mod(x)
    del y
    return sum(storages.values()), count[0]


def cuda_peak(step: Callable[[], None], device: torch.device) -> int:
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def set_realistic_running_stats(brn: nn.Module, lit: nn.Module, c: int, gen: torch.Generator) -> None:
    """Running statistics such that r = sigma_B / sigma spans ~[0.2, 5] and d ~[-8, 8] (input ~ N(0, 1)).

    With rmax = 3 and dmax = 5 about a quarter of the channels clip r, and a fifth clip d.
    """
    sigma = torch.exp(torch.empty(c).uniform_(-1.6, 1.6, generator=gen))
    mu = -torch.empty(c).uniform_(-8.0, 8.0, generator=gen) * sigma
    with torch.no_grad():
        brn.running_mean.copy_(mu)
        brn.running_var.copy_(sigma.square() - EPS)
        lit.running_mean.copy_(mu)
        lit.running_std.copy_(sigma)


def warm_up(steps: dict[str, Callable[[], None]], n: int, device: torch.device, errors: dict[str, str]) -> None:
    """Run every step ``n`` times; a step that raises is dropped from ``steps`` and reported in ``errors``."""
    for name in list(steps):
        try:
            for _ in range(n):
                steps[name]()
            sync(device)
        except Exception as e:  # noqa: BLE001 - reported in the table cell
            errors[name] = short_error(e)
            del steps[name]


def time_interleaved(
    steps: dict[str, Callable[[], None]],
    ref: str,
    *,
    reps: int,
    sample_ms: float,
    probes: int,
    max_inner: int,
    clock: str,
    device: torch.device,
    seed: int,
) -> tuple[dict[str, list[float]], int]:
    """Seconds per call of every step, ``reps`` samples each: every round runs each step once, in an order shuffled
    by ``random.Random(seed)``, ``inner`` calls per sample, so that a sample of ``ref`` lasts about ``sample_ms``
    (from the fastest of ``probes`` timed calls of ``ref``; at most ``max_inner``). ``clock``: ``"cpu"``
    (``time.process_time``) or ``"wall"``. Returns the samples and ``inner``."""
    t_ref = float("inf")
    for _ in range(probes):
        t0 = time.perf_counter()
        steps[ref]()
        sync(device)
        t_ref = min(t_ref, time.perf_counter() - t0)
    inner = max(1, min(max_inner, round(sample_ms / 1000.0 / max(t_ref, 1e-6))))
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            st = steps[name]
            sync(device)
            t0 = timer()
            for _ in range(inner):
                st()
            sync(device)
            times[name].append((timer() - t0) / inner)
    return times, inner


# ----------------------------------------------------------------------------- one configuration
def bench_config(
    shape: tuple[int, ...], fmt: str, args: argparse.Namespace, device: torch.device, seed: int, modes: list[Mode]
) -> dict:
    """Times every variant of one shape and format in each of ``modes``; the result's ``"modes"`` maps a mode's name
    to its ``{"times", "med", "inner"}`` (see :func:`in_mode`)."""
    torch.set_num_threads(modes[0].threads)  # the compiled variants are first compiled under the first mode's count
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    one_d = len(shape) == 2
    bn_cls = nn.BatchNorm1d if one_d else nn.BatchNorm2d
    brn_cls = lightning_brn.BatchRenorm1d if one_d else lightning_brn.BatchRenorm2d

    weight = torch.empty(c).uniform_(0.5, 1.5, generator=gen)
    bias = torch.empty(c).uniform_(-0.5, 0.5, generator=gen)

    bn = bn_cls(c)
    brn = brn_cls(c, momentum=MOMENTUM, rmax=RMAX, dmax=DMAX)
    lit = LiteralBatchRenorm(c)
    set_realistic_running_stats(brn, lit, c, gen)
    for m in (bn, brn, lit):
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
    mods: dict[str, nn.Module] = {"bn": bn, "brn": brn, "literal": lit}
    micro = shape[0] % MICRO == 0  # N = 4: one group, the whole batch
    if micro and not args.no_micro:
        brn_mb = copy.deepcopy(brn)
        brn_mb.microbatch_size = MICRO
        lit_mb = copy.deepcopy(lit)
        lit_mb.microbatch_size = MICRO
        mods["brn_mb"] = brn_mb
        mods["literal_mb"] = lit_mb
    for m in mods.values():
        m.to(device).train()

    x = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    x = x.to(device).requires_grad_(True)
    g = g.to(device)

    # Fraction of channels where r / d clip, on the first batch (realistic-clipping evidence).
    probe = copy.deepcopy(brn)
    probe.track_correction = True
    probe(x)
    clip = probe.correction_stats()
    del probe

    steps: dict[str, Callable[[], None]] = {k: make_step(m, x, g) for k, m in mods.items()}
    if device.type == "cpu" and cpu_kernels.available():
        for name, src in PY_VARIANTS.items():
            if src in mods:
                steps[name] = python_path(make_step(mods[src], x, g))
    copy_src, copy_out = x.detach(), torch.empty_like(x)  # empty_like keeps the memory format

    def copy_step() -> None:
        copy_out.copy_(copy_src)

    steps["copy"] = copy_step
    errors: dict[str, str] = {}
    compile_s: dict[str, float] = {}
    if not args.no_compile:
        compiled = [("bn_c", "bn"), ("brn_c", "brn")]
        if "brn_mb" in mods:
            compiled.append(("brn_mb_c", "brn_mb"))
        for name, src in compiled:
            torch._dynamo.reset()  # fresh cache per configuration: no recompile limit, static shapes
            try:
                cm = torch.compile(copy.deepcopy(mods[src]))
                st = make_step(cm, x, g)
                t0 = time.perf_counter()
                st()
                sync(device)
                compile_s[name] = time.perf_counter() - t0
                mods[name] = cm
                steps[name] = st
            except Exception as e:  # noqa: BLE001 - reported in the table cell
                errors[name] = short_error(e)

    by_mode: dict[str, dict] = {}
    for k, mode in enumerate(modes):
        # Inductor's CPU kernels fix their OpenMP thread count when generated; dynamo guards on the thread count, so
        # under a new count the warm-up's first call recompiles them for it (and a count seen before reuses its graph).
        torch.set_num_threads(mode.threads)
        warm_up(steps, args.warmup, device, errors)
        times, inner = time_interleaved(
            steps, "bn", reps=args.reps, sample_ms=args.sample_ms, probes=3, max_inner=200, clock=mode.clock,
            device=device, seed=seed + k,
        )
        by_mode[mode.name] = {"times": times, "med": {n: statistics.median(v) for n, v in times.items()}, "inner": inner}

    mem: dict[str, str] = {}
    peak: dict[str, str] = {}
    for name in steps:
        if name == "copy":
            continue
        try:
            with cpu_kernels.use_cpp(False) if name in PY_VARIANTS else contextlib.nullcontext():
                nbytes, count = saved_bytes(mods[PY_VARIANTS.get(name, name)], x)
            mem[name] = f"{nbytes / MIB:.2f} ({count})" if count else "n/a (no hook call)"
        except Exception as e:  # noqa: BLE001
            mem[name] = short_error(e)
        if device.type == "cuda":
            peak[name] = f"{cuda_peak(steps[name], device) / MIB:.2f}"
    return {
        "shape": shape,
        "fmt": fmt,
        "modes": by_mode,
        "errors": errors,
        "mem": mem,
        "peak": peak,
        "clip": clip,
        "compile_s": compile_s,
        "bytes": x.numel() * x.element_size(),
        "input_mib": x.numel() * x.element_size() / MIB,
        "micro": "brn_mb" in mods,
    }


def in_mode(res: dict, mode: Mode) -> dict:
    """``res`` with the ``"times"``, ``"med"`` and ``"inner"`` of ``mode`` at its top level, as the cell helpers
    (:func:`fmt_time`, :func:`paired_ratio`) read them."""
    return {**res, **res["modes"][mode.name]}


# ----------------------------------------------------------------------------- tables
def fmt_time(res: dict, name: str, ref: Optional[str] = "bn", ref2: Optional[str] = None) -> str:
    if name in res["errors"]:
        return res["errors"][name]
    if name not in res["med"]:
        return "skipped"
    t = res["med"][name]
    cell = f"{t * 1e3:.3f}"
    if ref is not None and ref in res["med"]:
        cell += f" ({t / res['med'][ref]:.2f}x)"
    if ref2 is not None and ref2 in res["med"]:
        cell += f" [{t / res['med'][ref2]:.2f}x]"
    return cell


def median_interval_ranks(n: int, level: float = 0.95) -> Optional[tuple[int, int]]:
    """0-based ranks (lo, hi) of the sorted sample whose values bound a distribution-free interval for the median
    with coverage >= ``level`` (order statistics: P(lo < rank of the median <= hi) from Binomial(n, 1/2)); ``None``
    when ``n`` is too small for that coverage (n < 6 at 95%)."""
    tail, k = 0.0, 0
    while True:
        p_next = tail + math.comb(n, k) / 2.0**n  # P(Binomial(n, 1/2) <= k)
        if p_next > (1.0 - level) / 2.0:
            break
        tail, k = p_next, k + 1
    return None if k == 0 else (k - 1, n - k)


def paired_ratio(res: dict, name: str, ref: str) -> str:
    """Median over repetitions of (time of ``name`` / time of ``ref`` in the same shuffled round), with its 95%
    interval: the two were timed seconds apart, so a slow spell of the machine cancels out of each ratio."""
    if name in res["errors"]:
        return res["errors"][name]
    if name not in res["times"] or ref not in res["times"]:
        return "-"
    ratios = sorted(a / b for a, b in zip(res["times"][name], res["times"][ref]))
    cell = f"{statistics.median(ratios):.3f}x"
    ranks = median_interval_ranks(len(ratios))
    if ranks is not None:
        cell += f" ({ratios[ranks[0]]:.3f}-{ratios[ranks[1]]:.3f})"
    return cell


def shape_cell(res: dict) -> str:
    return "(" + ", ".join(str(s) for s in res["shape"]) + ")"


def copy_fraction(res: dict, name: str) -> str:
    """Paired median over rounds of the GB/s of ``name`` (at least ``STEP_BYTES`` tensors moved) over the copy's
    (``COPY_BYTES``), with its 95% interval."""
    if name in res["errors"]:
        return res["errors"][name]
    if name not in res["times"] or "copy" not in res["times"]:
        return "-"
    scale = STEP_BYTES / COPY_BYTES
    ratios = sorted(scale * c / t for c, t in zip(res["times"]["copy"], res["times"][name]))
    cell = f"{statistics.median(ratios):.2f}"
    ranks = median_interval_ranks(len(ratios))
    return cell + (f" ({ratios[ranks[0]]:.2f}-{ratios[ranks[1]]:.2f})" if ranks is not None else "")


def gbps(res: dict, name: str, nbytes: int) -> str:
    return f"{nbytes / res['med'][name] / 1e9:.1f}" if name in res["med"] else "-"


def tables(results: list[dict], device: torch.device, modes: list[Mode]) -> str:
    out = []
    for mode in modes:
        rs = [in_mode(r, mode) for r in results]
        out.append(
            f"### Time, forward + backward, {mode.label} (median ms; (x) = ratio to eager batchnorm; "
            "[x] = ratio to compiled batchnorm)\n"
        )
        out.append("| shape | format | bn eager | brn eager | literal Alg. 1 | bn compiled | brn compiled | brn eager, Python path |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in rs:
            out.append(
                f"| {shape_cell(r)} | {r['fmt']} | {fmt_time(r, 'bn', None)} | {fmt_time(r, 'brn')} | "
                f"{fmt_time(r, 'literal')} | {fmt_time(r, 'bn_c')} | {fmt_time(r, 'brn_c', 'bn', 'bn_c')} | "
                f"{fmt_time(r, 'brn_py')} |"
            )
        micro = [r for r in rs if r["micro"]]
        if micro:
            out.append(
                f"\n### microbatch_size={MICRO}, {mode.label} (median ms; (x) = ratio to eager batchnorm on the whole "
                "batch; goal <= 1.3x)\n"
            )
            out.append(
                f"| shape | format | bn eager | brn mb{MICRO} eager | literal mb{MICRO} | bn compiled "
                f"| brn mb{MICRO} compiled | brn mb{MICRO} eager, Python path |"
            )
            out.append("|---|---|---|---|---|---|---|---|")
            for r in micro:
                out.append(
                    f"| {shape_cell(r)} | {r['fmt']} | {fmt_time(r, 'bn', None)} | {fmt_time(r, 'brn_mb')} | "
                    f"{fmt_time(r, 'literal_mb')} | {fmt_time(r, 'bn_c')} | {fmt_time(r, 'brn_mb_c', 'bn', 'bn_c')} | "
                    f"{fmt_time(r, 'brn_mb_py')} |"
                )
        out.append("")
    out.append(
        "### Paired ratios (median over repetitions of renorm's time / batchnorm's in the same round, in each timing "
        "mode: " + "; ".join(m.label for m in modes) + "; in parentheses a distribution-free 95% interval for that "
        "median)\n"
    )
    out.append("| shape | format | " + " | ".join(f"{head}, {m.label}" for _, _, head in PAIRS for m in modes) + " |")
    out.append("|---|---|" + "---|" * (len(PAIRS) * len(modes)))
    for r in results:
        cells = [paired_ratio(in_mode(r, m), name, ref) for name, ref, _ in PAIRS for m in modes]
        out.append(f"| {shape_cell(r)} | {r['fmt']} | " + " | ".join(cells) + " |")
    for mode in modes:
        out.append(
            f"\n### Memory throughput, {mode.label} (GB/s = bytes moved at least / median time: a training step moves "
            f"at least {STEP_BYTES} x the tensor's bytes, the forward reads x and writes y, the backward reads x and dy "
            f"and writes dx; the copy `out.copy_(x)` moves {COPY_BYTES} x; 'of copy' = paired median over rounds of the "
            "step's GB/s / the copy's, with its 95% interval)\n"
        )
        out.append("| shape | format | tensor MiB | copy GB/s | bn eager GB/s | bn eager, of copy | brn eager GB/s | brn eager, of copy |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in (in_mode(r, mode) for r in results):
            out.append(
                f"| {shape_cell(r)} | {r['fmt']} | {r['input_mib']:.2f} | {gbps(r, 'copy', COPY_BYTES * r['bytes'])} | "
                f"{gbps(r, 'bn', STEP_BYTES * r['bytes'])} | {copy_fraction(r, 'bn')} | "
                f"{gbps(r, 'brn', STEP_BYTES * r['bytes'])} | {copy_fraction(r, 'brn')} |"
            )
    names = ["bn", "brn", "literal", "bn_c", "brn_c", "brn_mb", "literal_mb", "brn_mb_c", "brn_py", "brn_mb_py"]
    heads = [
        "bn", "brn", "literal", "bn comp.", "brn comp.", f"brn mb{MICRO}", f"literal mb{MICRO}", f"brn mb{MICRO} comp.",
        "brn Python path", f"brn mb{MICRO} Python path",
    ]
    out.append(
        "\n### Saved for backward (MiB of unique storages, input included; (n) = saved tensors; the same in every "
        "timing mode)"
        + ("; CUDA peak above baseline (MiB) after the slash" if device.type == "cuda" else "")
        + "\n"
    )
    out.append("| shape | format | input MiB | " + " | ".join(heads) + " | r clipped | d clipped |")
    out.append("|---|---|---|" + "---|" * len(heads) + "---|---|")
    for r in results:
        cells = []
        for n in names:
            if n in r["errors"]:
                cells.append(r["errors"][n])
            elif n in r["mem"]:
                cells.append(r["mem"][n] + (f" / {r['peak'][n]}" if n in r["peak"] else ""))
            else:
                cells.append("-")
        out.append(
            f"| {shape_cell(r)} | {r['fmt']} | {r['input_mib']:.2f} | " + " | ".join(cells)
            + f" | {r['clip']['r_clipped']:.0%} | {r['clip']['d_clipped']:.0%} |"
        )
    return "\n".join(out)


def code_version() -> str:
    """Git commit (and whether the tree is dirty) plus a hash of the layer sources, so a table names its code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lightning_brn"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "unknown", ""
    pkg = os.path.dirname(lightning_brn.__file__)
    h = hashlib.sha256()
    for name in LAYER_SOURCES:
        try:
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(f.read())
        except OSError:
            pass
    return f"git {head or 'unknown'}{' + uncommitted changes in lightning_brn/' if dirty else ''}; sha256({', '.join(LAYER_SOURCES)}) {h.hexdigest()[:12]}"


def header(args: argparse.Namespace, device: torch.device, modes: list[Mode], default_threads: int) -> str:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    cmd = shlex.join(["python"] + sys.argv)
    clocks = {"cpu": "CPU time of the process, time.process_time", "wall": "wall clock, time.perf_counter"}
    lines = [
        "## BatchRenorm vs BatchNorm: training forward + backward, float32",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, python {platform.python_version()}, lightning_brn from "
        f"{os.path.dirname(lightning_brn.__file__)} ({code_version()})",
        f"- device: {device.type}: {dev}; torch threads by default: {default_threads}; os.cpu_count: {os.cpu_count()}",
        "- timing modes, each configuration timed in each, in this order: "
        + "; ".join(f"`{m.name}` = {m.label} ({clocks[m.clock]}, torch.set_num_threads({m.threads}))" for m in modes),
        f"- renorm: rmax={RMAX}, dmax={DMAX}, momentum={MOMENTUM}, running stats set so r and d clip on some "
        f"channels (see the last columns); repetitions={args.reps} per mode (interleaved, shuffled), "
        f"warm-up={args.warmup}, one sample ~{args.sample_ms} ms of eager batchnorm",
        "- step = `y = layer(x); torch.autograd.grad(y, [x, weight, bias], fixed_random_grad)`",
        f"- allocator: {malloc_note()}",
        "- eager renorm on this device: "
        + (
            f"C++ CPU kernels (lightning_brn/csrc/renorm_cpu.cpp, built with {' '.join(cpu_kernels.compile_flags())})"
            if device.type == "cpu" and cpu_kernels.available()
            else "Python path (torch ops" + (f"; C++ kernels unavailable: {cpu_kernels.build_error()}" if cpu_kernels.build_error() else "") + ")"
        ),
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    default_threads = torch.get_num_threads()  # torch's choice at start-up: what users' runs get
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="short run: few repetitions, short samples")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant and mode (default 41; quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant and mode (default 3; quick 1)")
    p.add_argument("--sample-ms", type=float, default=None, help="length of one timed sample (default 40; quick 10)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--no-micro", action="store_true", help=f"skip the microbatch_size={MICRO} columns")
    p.add_argument("--shapes", default=None, help="comma-separated indices into the shape list (0-4 2d, 5 = 1d)")
    p.add_argument("--formats", default="contiguous,channels_last", help="memory formats for the 4d shapes")
    p.add_argument(
        "--modes",
        default=None,
        help="timing modes, comma-separated, each timed in turn and shown side by side: cpu<N> = N threads, CPU time "
        "of the process (time.process_time; CPU device only); wall<N> = N threads, time.perf_counter; no N: torch's "
        f"default thread count ({default_threads} here). Default: cpu1,wall on CPU, wall on CUDA",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default=None,
        help="with or instead of --threads, a single timing mode instead of --modes (earlier versions' options): "
        "wall (default) = time.perf_counter; cpu = time.process_time",
    )
    p.add_argument(
        "--threads", type=int, default=None,
        help="with or instead of --clock, a single timing mode: torch.set_num_threads (default: torch's choice); "
        "--threads 1 --clock cpu is --modes cpu1",
    )
    p.add_argument("--out", default=None, help="also write the output (markdown) to this file")
    p.add_argument(
        "--malloc", choices=("pinned", "default"), default="pinned",
        help="pinned (default): re-run under glibc tunables that keep freed blocks for reuse (see bench/_common.py); "
        "default: the allocator as it is",
    )
    args = p.parse_args(argv)
    if argv is None:
        pin_malloc(args.malloc)
    args.reps = args.reps or (5 if args.quick else 41)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.sample_ms = args.sample_ms or (10.0 if args.quick else 40.0)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but torch.cuda.is_available() is False")
    if args.threads is not None or args.clock is not None:
        if args.modes is not None:
            p.error("--threads / --clock define a single timing mode: give either them or --modes (e.g. cpu1, wall4)")
        if args.threads is not None and args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        args.modes = f"{args.clock or 'wall'}{args.threads or ''}"
    elif args.modes is None:
        args.modes = "cpu1,wall" if device.type == "cpu" else "wall"
    try:
        modes = parse_modes(args.modes, default_threads)
    except ValueError as e:
        p.error(f"--modes {args.modes!r}: {e}")
    if device.type != "cpu" and any(m.clock == "cpu" for m in modes):
        p.error("cpu clock modes (--modes cpu<N>, --clock cpu) measure host CPU time: use wall with --device cuda")
    torch.manual_seed(0)
    if device.type == "cpu":
        cpu_kernels.available()  # build (or load) the C++ kernels before any timing

    all_shapes: list[tuple[int, ...]] = [*SHAPES_2D, SHAPE_1D]
    try:
        idx = range(len(all_shapes)) if args.shapes is None else [int(i) for i in args.shapes.split(",")]
    except ValueError:
        p.error(f"--shapes: expected comma-separated integers, got {args.shapes!r}")
    for i in idx:
        if not 0 <= i < len(all_shapes):
            p.error(f"--shapes: index {i} out of range 0..{len(all_shapes) - 1} (shapes: {all_shapes})")
    formats = [f.strip() for f in args.formats.split(",")]
    for f in formats:
        if f not in ("contiguous", "channels_last"):
            p.error(f"--formats: unknown memory format {f!r}, expected contiguous or channels_last")

    head = header(args, device, modes, default_threads)
    print(head, flush=True)
    t_start = time.perf_counter()
    results = []
    try:
        for i in idx:
            shape = all_shapes[i]
            for fmt in formats if len(shape) == 4 else ["contiguous"]:
                t0 = time.perf_counter()
                res = bench_config(shape, fmt, args, device, seed=1000 + i, modes=modes)
                results.append(res)
                comp = ", ".join(f"{k} {v:.1f}s" for k, v in res["compile_s"].items())
                inner = ", ".join(f"{k} {v['inner']}" for k, v in res["modes"].items())
                print(
                    f"  done {shape} {fmt} in {time.perf_counter() - t0:.1f}s (inner: {inner}; first call of compiled: "
                    f"{comp or '-'})",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        torch.set_num_threads(default_threads)
    body = tables(results, device, modes)
    footer = f"\nTotal benchmark time: {time.perf_counter() - t_start:.0f} s."
    print("\n" + body + "\n" + footer, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(head + "\n\n" + body + "\n" + footer + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
