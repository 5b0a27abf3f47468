r"""Which implementation runs a training step: the route table and the one function that decides.

:func:`lightning_brn.functional.batch_renorm` checks its arguments, then asks :func:`choose_route`; inference is
batchnorm's own and takes no route. Every route computes the same Algorithm 1 (r and d from
:func:`lightning_brn.algorithm.renorm_step`, or its C++ twin), and the tests hold each of them to a literal float64
Algorithm 1 and to batchnorm at rmax = 1, dmax = 0.

============================  ==============================================  ==========================================
route                         taken when                                      implementation
============================  ==============================================  ==========================================
``Route.CPP``                 eager; CPU; float32/float64 input with          one C++ operator with its own autograd
                              per-channel tensors of its dtype (or ``None``); node: :mod:`lightning_brn.cpu_kernels`
                              Python-number hyper-parameters; the C++         (``csrc/renorm_cpu.cpp``)
                              kernels enabled and built
``Route.ATEN``                eager, anything else: CUDA, half precision,     batchnorm's aten kernels with weight
                              fx graphs (tensor hyper-parameters), meta and   gamma * r and bias beta + gamma * d:
                              fake tensors, ``LIGHTNING_BRN_CPP=0``           :mod:`lightning_brn.routes.aten`
``Route.COMPILED``            inside ``torch.compile``, unless the next row   ``x * scale + shift`` with batchnorm's
                              applies                                         backward, which inductor fuses with the
                                                                              neighbouring ops:
                                                                              :mod:`lightning_brn.routes.compiled`
``Route.COMPILED_CPP``        inside ``torch.compile`` with microbatches,     the functional C++ operators
                              running statistics and the conditions of        ``renorm_fwd`` / ``renorm_bwd``, opaque
                              ``Route.CPP`` on the tensors; not where the     to the compiler:
                              partitioner may recompute (below)               :func:`lightning_brn.routes.compiled.batch_renorm_compiled_cpp`
============================  ==============================================  ==========================================

``Route.COMPILED`` keeps r and d, computed from the averages before this step's update, for the backward; where
AOTAutograd's partitioner may recompute what it would otherwise save (:func:`partitioner_may_recompute`:
``activation_memory_budget`` < 1, ``aggressive_recomputation``) it saves them under a ``MUST_SAVE`` checkpoint
policy, and every compiled step with running statistics takes it.

Microbatches (``microbatch_size``) take the same routes. The C++ kernels and ``Route.ATEN`` read each group of k
examples in place (views); ``Route.COMPILED`` views G groups as batchnorm over (k, G * C, \*)
(:func:`groups_as_channels`), each group a block of channels with its own statistics, which inductor fuses.
"""

from __future__ import annotations

import enum
from typing import Optional, Union

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from lightning_brn import cpu_kernels

__all__ = [
    "Route", "choose_route", "channels_as_groups", "groups_as_channels", "memory_format", "partitioner_may_recompute",
    "shape_only", "stat_dtype",
]

# one module global (a guard of its own in compiled graphs) rather than the chain torch.compiler.is_compiling
_is_compiling = torch.compiler.is_compiling

_CPP_DTYPES = (torch.float32, torch.float64)
_PLAIN = (Tensor, torch.nn.Parameter)
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


class Route(str, enum.Enum):
    """A route of the training step (see the table in :mod:`lightning_brn.routes`)."""

    CPP = "cpp"
    ATEN = "aten"
    COMPILED = "compiled"
    COMPILED_CPP = "compiled_cpp"


def choose_route(
    input: Tensor,
    per_channel: tuple[Optional[Tensor], ...],
    hyper_parameters: tuple[Union[float, Tensor], ...],
    has_running_stats: bool,
    groups: int = 1,
) -> Route:
    """The route of one training step (the table in :mod:`lightning_brn.routes`).

    Args:
        input: the (N, C, \\*) input.
        per_channel: weight, bias, running_mean and running_var (``None`` where absent).
        hyper_parameters: rmax, dmax and momentum as the step receives them.
        has_running_stats: whether the step renormalizes against (and updates) running statistics.
        groups: the number of microbatches the batch is split into (1: none).

    Example::

        >>> import torch
        >>> x = torch.randn(4, 3, 2, 2, dtype=torch.float16)
        >>> choose_route(x, (None, None, None, None), (1.0, 0.0, 0.1), False)
        <Route.ATEN: 'aten'>
    """
    dtype = input.dtype
    per_channel_ok = input.is_cpu and dtype in _CPP_DTYPES
    if per_channel_ok:
        for t in per_channel:
            if t is not None and not _cpp_per_channel(t, dtype):
                per_channel_ok = False
                break
    if _is_compiling():
        # the microbatch test in the graph (sizes may be symbolic); the rest is one constant with no guard
        if groups > 1 and _compiled_cpp_possible(has_running_stats, per_channel_ok):
            return Route.COMPILED_CPP
        return Route.COMPILED
    if (
        per_channel_ok
        and all(type(h) is float or type(h) is int for h in hyper_parameters)  # Python numbers (not bool)
        and not shape_only(input)
        and cpu_kernels.available()
    ):
        return Route.CPP
    return Route.ATEN


@torch.compiler.assume_constant_result
def _compiled_cpp_possible(has_running_stats: bool, per_channel_ok: bool) -> bool:
    """Whether a compiled graph may call the functional C++ operators: decided once, while the graph is traced, and
    baked in as a constant with no guard (the partitioner that splits the graph runs right after, under the settings
    read here)."""
    return has_running_stats and per_channel_ok and not partitioner_may_recompute() and cpu_kernels.compiled_op_ready()


def _cpp_per_channel(t: Tensor, dtype: torch.dtype) -> bool:
    """A contiguous CPU vector of the input's dtype: what the C++ operator takes as it is."""
    return t.is_cpu and t.dtype == dtype and t.dim() == 1 and t.is_contiguous()


@torch.compiler.assume_constant_result
def partitioner_may_recompute() -> bool:
    """Whether AOTAutograd's partitioner is configured to recompute ops outside its allowlist: an activation memory
    budget below 1, ``aggressive_recomputation``, or the allowlist ban lifted. A budget of 0 (recompute everything
    from the graph inputs) honours no policy and is refused.

    Read while a graph is traced and baked in as a constant with no guard: the partitioner that splits the graph runs
    right after, under the settings read here."""
    cfg = torch._functorch.config
    budget = cfg.activation_memory_budget
    if budget <= 0:
        raise RuntimeError(
            f"batch renorm under torch.compile with torch._functorch.config.activation_memory_budget={budget}: "
            "a budget of 0 recomputes every activation from the graph inputs, r and d included, from running "
            "statistics this step has already updated, which would silently corrupt the gradients; "
            "expected a budget in (0, 1]"
        )
    return budget < 1 or cfg.aggressive_recomputation or not cfg.ban_recompute_not_in_allowlist


def shape_only(x: Tensor) -> bool:
    """Whether ``x`` carries shapes but no data: a meta tensor, or a fake one (``FakeTensorMode``, which Lightning's
    ``measure_flops`` and tracers use)."""
    if x.is_meta:
        return True
    if type(x) in _PLAIN and not (torch._is_functional_tensor(x) or _is_functorch_wrapped(x)):
        return False  # a plain tensor that wraps nothing holds data (fast: this runs on every training step)
    return is_fake(x)


def stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype statistics are computed in: float32 for half inputs, the input's dtype otherwise."""
    return torch.float32 if x.dtype in _REDUCED_PRECISION else x.dtype


def memory_format(x: Tensor) -> torch.memory_format:
    """``x``'s memory format: channels-last (3d) when it is laid out so and not also contiguous, else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def groups_as_channels(x: Tensor, groups: int) -> Tensor:
    """G microbatches of k examples, (N, C, \\*), as one batch (k, G * C, \\*): example j of group g is row j,
    channels g * C .. g * C + C - 1. ``x`` itself for one group, else a copy in ``x``'s memory format."""
    if groups == 1:
        return x
    n, c = x.shape[0], x.shape[1]
    k = n // groups
    out = torch.empty((k, groups * c, *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    out.view(k, groups, c, *x.shape[2:]).copy_(x.reshape(groups, k, c, *x.shape[2:]).transpose(0, 1))
    return out


def channels_as_groups(y: Tensor, like: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`groups_as_channels`: (k, G * C, \\*) back to a new tensor shaped and laid out as
    ``like``."""
    if groups == 1:
        return y
    n, c = like.shape[0], like.shape[1]
    k = n // groups
    out = torch.empty(like.shape, dtype=y.dtype, device=y.device, memory_format=memory_format(like))
    out.view(groups, k, c, *like.shape[2:]).copy_(y.reshape(k, groups, c, *like.shape[2:]).transpose(0, 1))
    return out
