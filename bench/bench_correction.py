"""Cost of recording the correction statistics (``track_correction``) in a training step (issue 5).

Times forward + backward of a small convnet of ``BatchRenorm2d`` layers in training mode with
``track_correction`` off and on, in the same process, alternating the two settings in blocks so
drift in machine load hits both alike, and prints a markdown table of the medians.

Note that :class:`lightning_brn.callbacks.BatchRenormScheduler` switches recording on only in the
logged steps (every ``log_every_n_steps``), so in a real run the "on" cost is paid in one step of
every ``log_every_n_steps`` (50 by default); this benchmark times the worst case, every step.

Usage::

    python bench/bench_correction.py                 # CPU, one thread
    python bench/bench_correction.py --device cuda   # GPU (also: --compile)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Optional

import torch
from torch import nn

import lightning_brn
from lightning_brn import BatchRenorm2d


def make_net(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(depth):
        layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), BatchRenorm2d(width, rmax=3.0, dmax=5.0), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def set_tracking(net: nn.Module, on: bool) -> None:
    for m in net.modules():
        if lightning_brn.is_batch_renorm(m):
            m.track_correction = on


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: Optional[list[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=16, help="input height = width")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--reps", type=int, default=20, help="timed steps per block")
    p.add_argument("--blocks", type=int, default=8, help="alternating off/on blocks")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the net (one graph per setting)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = make_net(args.width, args.depth).to(device).train()
    # Warm the moving averages so r and d are realistic rather than all on their bounds.
    with torch.no_grad():
        for _ in range(20):
            net(torch.randn(args.batch, 3, args.size, args.size, device=device))
    model = torch.compile(net) if args.compile else net
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    def step() -> None:
        out = model(x)
        out.sum().backward()

    times: dict[bool, list[float]] = {False: [], True: []}
    for on in (False, True):  # warm-up (and compilation) of both settings
        set_tracking(net, on)
        for _ in range(5):
            step()
    for _ in range(args.blocks):
        for on in (False, True):
            set_tracking(net, on)
            for _ in range(args.reps):
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                times[on].append(time.perf_counter() - t0)
    stats = next(m for m in net.modules() if lightning_brn.is_batch_renorm(m)).correction_stats()

    # The layer on its own (forward only, training mode): where the recording's extra ops show most.
    layer = BatchRenorm2d(args.width, rmax=3.0, dmax=5.0).to(device).train()
    xl = torch.randn(args.batch, args.width, args.size, args.size, device=device)
    with torch.no_grad():
        for _ in range(20):
            layer(xl)
    layer_times: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        for _ in range(args.blocks):
            for on in (False, True):
                layer.track_correction = on
                for _ in range(args.reps * 5):
                    sync(device)
                    t0 = time.perf_counter()
                    layer(xl)
                    sync(device)
                    layer_times[on].append(time.perf_counter() - t0)

    off_ms = statistics.median(times[False]) * 1e3
    on_ms = statistics.median(times[True]) * 1e3
    l_off = statistics.median(layer_times[False]) * 1e6
    l_on = statistics.median(layer_times[True]) * 1e6
    rel = lambda v: 100.0 * (v - off_ms) / off_ms  # noqa: E731
    q = lambda v, k: statistics.quantiles(v, n=4)[k] * 1e3  # noqa: E731
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    lines = [
        f"Training step (forward + backward) of a {args.depth}-layer convnet of BatchRenorm2d({args.width}), "
        f"input {args.batch}x3x{args.size}x{args.size}, {device.type} ({dev_name}), "
        f"{'compiled' if args.compile else 'eager'}, {args.threads} thread(s); "
        f"median of {len(times[False])} steps per setting, alternating blocks of {args.reps}.",
        "",
        "| track_correction | median ms | quartiles ms | vs off |",
        "|---|---|---|---|",
        f"| off | {off_ms:.3f} | {q(times[False], 0):.3f} - {q(times[False], 2):.3f} | - |",
        f"| on (every step) | {on_ms:.3f} | {q(times[True], 0):.3f} - {q(times[True], 2):.3f} | {rel(on_ms):+.1f}% |",
        "",
        f"One BatchRenorm2d({args.width}) forward alone, input {args.batch}x{args.width}x{args.size}x{args.size}, "
        f"training mode, median of {len(layer_times[False])} calls per setting:",
        "",
        "| track_correction | median us | quartiles us | vs off |",
        "|---|---|---|---|",
        f"| off | {l_off:.1f} | {q(layer_times[False], 0) * 1e3:.1f} - {q(layer_times[False], 2) * 1e3:.1f} | - |",
        f"| on | {l_on:.1f} | {q(layer_times[True], 0) * 1e3:.1f} - {q(layer_times[True], 2) * 1e3:.1f} | "
        f"{100.0 * (l_on - l_off) / l_off:+.1f}% ({l_on - l_off:+.1f} us) |",
        "",
        f"Last recorded stats of the first layer: {', '.join(f'{k}={v:.3f}' for k, v in stats.items())}.  ",
        f"torch {torch.__version__}; command: `python bench/bench_correction.py {' '.join(argv) if argv else ''}`",
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
