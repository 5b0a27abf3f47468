"""Set-up shared by the benchmark scripts: a pinned glibc allocator.

With glibc's default malloc, freeing a block of tens of MiB can hand its pages back to the kernel (``trim``, or
``munmap`` of a block above the dynamic mmap threshold), and the next step's allocation of the same size then
page-faults on every 4 KiB page: ~1-2 ms per 25 MiB tensor, charged to whichever variant happens to allocate
next. Timings of the large shapes swung by up to 1.5x between runs that way. The benchmarks therefore re-run
themselves once with glibc's mmap and trim thresholds raised (``GLIBC_TUNABLES``), so that freed blocks are
reused, as in the steady state of a training loop; every variant runs under the same allocator.
``--malloc default`` keeps the allocator as it is (and any ``GLIBC_TUNABLES`` the caller set).
"""

from __future__ import annotations

import os
import platform
import sys

GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"
_MARK = "LIGHTNING_BRN_BENCH_MALLOC"  # set in the re-executed process


def pin_malloc(mode: str) -> None:
    """With ``mode == "pinned"`` on glibc, re-executes this script (interpreter flags included) once, with
    :data:`GLIBC_TUNABLES` appended to any ``GLIBC_TUNABLES`` the caller set."""
    if mode != "pinned" or os.environ.get(_MARK) == "pinned":
        return
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    given = os.environ.get("GLIBC_TUNABLES")
    env = dict(os.environ, GLIBC_TUNABLES=f"{given}:{GLIBC_TUNABLES}" if given else GLIBC_TUNABLES)
    env[_MARK] = "pinned"
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def malloc_note() -> str:
    """One line for a result's header: the allocator settings the run used."""
    tunables = os.environ.get("GLIBC_TUNABLES")
    if os.environ.get(_MARK) == "pinned":
        return f"glibc malloc with GLIBC_TUNABLES={tunables} (freed blocks are reused, no page faults per step)"
    if tunables:
        return f"glibc malloc with the caller's GLIBC_TUNABLES={tunables} (`--malloc default`)"
    return "the platform's default allocator (`--malloc default`, or not glibc)"
