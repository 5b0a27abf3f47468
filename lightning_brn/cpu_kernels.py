"""The optional C++ CPU kernels (``csrc/renorm_cpu.cpp``), built once per machine on first use.

``Route.CPP``: eager training steps on CPU tensors (float32/float64) run through one C++ operator with its own autograd
node: statistics, the per-channel step, the normalization and the backward without Python in the loop. On
small tensors that Python overhead is most of the time of a step; the kernels also compute statistics of
contiguous (NCHW) data faster than aten's batchnorm statistics kernel. ``Route.COMPILED_CPP``: compiled graphs with
microbatches call the functional forward and backward operators (``renorm_fwd`` / ``renorm_bwd``), whose autograd
formula is C++ as well; only their shapes for tracing are registered here. :mod:`lightning_brn.routes` says when
each route is taken.

The build uses :func:`torch.utils.cpp_extension.load` (a C++ compiler and ``ninja``) with ``-O3
-march=native``: the library is compiled for this machine's CPU and cached (``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``) under a name that includes a fingerprint of the CPU, so machines
sharing a home directory never load each other's builds. The first use on a machine takes ~20 s; later
processes load the cached library in milliseconds.

Environment: ``LIGHTNING_BRN_CPP=0`` turns the kernels off (``Route.ATEN`` and ``Route.COMPILED`` compute the same
maths with torch ops). If the build fails, a warning says why and those routes are used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

log = logging.getLogger("lightning_brn")

_SOURCE = Path(__file__).parent / "csrc" / "renorm_cpu.cpp"
_ENV = "LIGHTNING_BRN_CPP"
_lock = threading.Lock()
_op: Optional[Any] = None
_tried = False
_error: Optional[str] = None
_OFF, _ON = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes")


def _enabled_from_env() -> bool:
    value = os.environ.get(_ENV, "1")
    if value.strip().lower() in _OFF:
        return False
    if value.strip().lower() not in _ON:
        warnings.warn(
            f"{_ENV}={value!r} is not understood: expected one of {_ON[1:] + _OFF}; the C++ CPU kernels stay on",
            RuntimeWarning,
            stacklevel=2,
        )
    return True


_enabled = _enabled_from_env()


def _cpu_fingerprint() -> str:
    """A short hash of what a build depends on beyond its sources: the torch version (the library links against
    it) and, for ``-march=native``, the CPU model and flags (Linux), else the platform."""
    text = torch.__version__ + platform.machine() + platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def compile_flags() -> list[str]:
    """The C++ compiler flags of the kernels. ``-fopenmp``: ``at::parallel_for`` runs on torch's OpenMP threads only
    in code compiled with it (otherwise it is a serial loop); the library then uses the OpenMP runtime torch loaded,
    so ``torch.set_num_threads`` governs it."""
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native" if platform.machine().lower() in ("x86_64", "amd64") else "-mcpu=native")
    return flags


def _build() -> Any:
    from torch.utils import cpp_extension

    name = f"lightning_brn_cpu_{_cpu_fingerprint()}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not any(build_dir.glob("*.so")):
        log.warning("lightning_brn: compiling the C++ CPU kernels for this machine (one time, ~20 s) in %s", build_dir)
    cpp_extension.load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=compile_flags(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    _register_functional_ops()
    return torch.ops.lightning_brn_cpu.renorm_train.default


def _register_functional_ops() -> None:
    """Shapes (for tracing) of the functional ops used inside compiled graphs."""
    fwd = "lightning_brn_cpu::renorm_fwd"
    bwd = "lightning_brn_cpu::renorm_bwd"

    @torch.library.register_fake(fwd)
    def _fwd_fake(x, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, record):
        # out, saved (4, G, C) = mean, invstd, r, d, running (2, C) = new mean and var, record (6,): the clipping
        # record and the number of channels whose averages were held (statistics not finite)
        return (
            torch.empty_like(x),
            x.new_empty((4, groups, x.shape[1])),
            running_mean.new_empty((2, running_mean.shape[0])),
            x.new_empty((6,), dtype=torch.float64),
        )

    @torch.library.register_fake(bwd)
    def _bwd_fake(grad_out, x, weight, saved, groups):
        return torch.empty_like(x), x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))

    # their autograd formula is C++ (RenormFwdFunction in csrc/renorm_cpu.cpp): no Python in a compiled step


@torch.compiler.assume_constant_result
def compiled_op_ready() -> bool:
    """Whether the functional C++ ops are there for compiled graphs. Run for real while a graph is traced (building
    or loading the kernels then, like an eager step would) and baked into the graph as a constant."""
    return cpu_op() is not None


def cpu_op() -> Optional[Any]:
    """The C++ training operator, building or loading it on first call; ``None`` if disabled or unavailable."""
    global _op, _tried, _error
    if not _enabled:
        return None
    if _tried:
        return _op
    with _lock:
        if not _tried:
            try:
                _op = _build()
            except Exception as exc:  # no compiler, no ninja, unsupported platform: Route.ATEN still works
                _error = _summarize(exc)
                warnings.warn(
                    f"lightning_brn: the C++ CPU kernels could not be built ({_error}); using the Python "
                    f"implementation (same results, more overhead per step on small tensors). "
                    f"Set {_ENV}=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _op


def _summarize(exc: BaseException) -> str:
    """One line for a failed build: the first compiler error if there is one, else the exception's last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and "build stopped" not in ln]
    detail = errors[0] if errors else (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {detail}"[:500]


def available() -> bool:
    """Whether the C++ CPU kernels are enabled and built (builds them if needed)."""
    return cpu_op() is not None


def build_error() -> Optional[str]:
    """Why the last build failed, or ``None``."""
    return _error


def enabled() -> bool:
    return _enabled


@contextmanager
def use_cpp(flag: bool) -> Iterator[None]:
    """Turn the C++ CPU kernels on or off inside a block (tests and benchmarks compare both paths).

    Process-wide and not thread-safe. Graphs that ``torch.compile`` traced keep the choice made when they were
    traced."""
    global _enabled
    previous = _enabled
    _enabled = flag
    try:
        yield
    finally:
        _enabled = previous
