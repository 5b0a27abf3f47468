"""Set-up shared by the benchmark scripts: a pinned glibc allocator.

With glibc's default malloc, freeing a block of tens of MiB can hand its pages back to the kernel (``trim``, or
``munmap`` of a block above the dynamic mmap threshold), and the next step's allocation of the same size then
page-faults on every 4 KiB page: ~1-2 ms per 25 MiB tensor, charged to whichever variant happens to allocate
next. Timings of the large shapes swung by up to 1.5x between runs that way. The benchmarks therefore re-run
themselves once with glibc's mmap and trim thresholds raised (``GLIBC_TUNABLES``), so that freed blocks are
reused, as in the steady state of a training loop; every variant runs under the same allocator.
``--malloc default`` keeps the allocator as it is.
"""

from __future__ import annotations

import os
import platform
import sys

GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"


def pin_malloc(mode: str) -> None:
    """With ``mode == "pinned"`` on glibc, re-executes this script under :data:`GLIBC_TUNABLES` (once; a
    ``GLIBC_TUNABLES`` already set by the caller is kept as it is)."""
    if mode != "pinned" or "GLIBC_TUNABLES" in os.environ:
        return
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def malloc_note() -> str:
    """One line for a result's header: the allocator settings the run used."""
    tunables = os.environ.get("GLIBC_TUNABLES")
    if tunables:
        return f"glibc malloc with GLIBC_TUNABLES={tunables} (freed blocks are reused, no page faults per step)"
    return "the platform's default allocator (`--malloc default`)"
