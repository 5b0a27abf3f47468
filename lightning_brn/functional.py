r"""Functional Batch Renormalization (Ioffe, 2017, https://arxiv.org/abs/1702.03275).

:func:`batch_renorm` is what the layers of :mod:`lightning_brn.layers` call, as ``torch.nn.BatchNorm2d`` calls
:func:`torch.nn.functional.batch_norm`: it checks its arguments, answers inference with batchnorm's own inference,
and hands a training step to the route :func:`lightning_brn.routes.choose_route` picks (the table of routes is in
:mod:`lightning_brn.routes`). The per-channel maths is in :mod:`lightning_brn.algorithm`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lightning_brn import cpu_kernels
from lightning_brn.algorithm import renorm_correction, renorm_step
from lightning_brn.routes import Route, choose_route
from lightning_brn.routes.aten import batch_renorm_aten
from lightning_brn.routes.compiled import batch_renorm_compiled, batch_renorm_compiled_cpp
from lightning_brn.validation import check_dmax, check_eps, check_microbatch_size, check_momentum, check_rmax

# one module global (a guard of its own in compiled graphs) rather than the chain torch.compiler.is_compiling
_is_compiling = torch.compiler.is_compiling

__all__ = ["batch_renorm", "renorm_correction", "renorm_step"]

Number = Union[float, Tensor]


def batch_renorm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Number = 0.01,
    eps: float = 1e-5,
    rmax: Number = 1.0,
    dmax: Number = 0.0,
    microbatch_size: Optional[int] = None,
    correction_stats: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    nonfinite_count: Optional[Tensor] = None,
) -> Tensor:
    r"""Batch Renormalization over the channel dimension (dim 1) of ``input``.

    Training (Algorithm 1 of https://arxiv.org/abs/1702.03275), per channel:

    .. math::
        \sigma_B = \sqrt{\epsilon + \tfrac1m \textstyle\sum (x - \mu_B)^2},\quad
        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d,\quad y = \gamma \hat x + \beta

    with ``r``, ``d`` from :func:`renorm_correction` using the moving averages *before* this step,
    treated as constants by autograd; then :math:`\mu \leftarrow \mu + \alpha(\mu_B - \mu)` and
    :math:`\sigma \leftarrow \sigma + \alpha(\sigma_B - \sigma)`, stored in place as
    ``running_var = sigma**2 - eps``.

    A channel whose batch statistics are not finite (an ``inf`` or ``nan`` in the batch, an overflow under
    autocast) keeps its moving averages as they were: one bad batch cannot poison them, and so r, d and every
    later step, for good. Pass ``nonfinite_count`` to count such batches.

    Inference (``training=False`` with running statistics) is exactly batchnorm's inference.
    Without running statistics (``None``), batch statistics are used in both modes and r = 1, d = 0:
    there is nothing to renormalize against, so the result is plain batchnorm.

    Args:
        input: (N, C, *) tensor.
        running_mean: moving mean :math:`\mu`, shape (C,), updated in place in training; or ``None``.
        running_var: :math:`\sigma^2 - \epsilon`, shape (C,), updated in place in training; or ``None``.
        weight: :math:`\gamma`, shape (C,), or ``None`` (1).
        bias: :math:`\beta`, shape (C,), or ``None`` (0).
        training: use batch statistics and renormalize. Default: ``False``.
        momentum: the moving-average rate :math:`\alpha` in [0, 1]; float or one-element tensor. Default: 0.01.
        eps: :math:`\epsilon` > 0, inside the square root. Default: 1e-5.
        rmax: :math:`r_{max} \ge 1`; float or one-element tensor. Default: 1.0.
        dmax: :math:`d_{max} \ge 0`; float or one-element tensor. Default: 0.0.
        microbatch_size: if set to k, each group of k consecutive examples is normalized and
            renormalized with its own statistics (paper section 4.2); the moving averages move once
            per call towards the mean over groups of :math:`\mu_B` and of :math:`\sigma_B`.
        correction_stats: optional float tensor of shape (5,) that receives, in place, the sums over
            channels (and groups) of: r clipped, d clipped, :math:`|r-1|`, :math:`|d|`, and the count.
        num_batches_tracked: optional counter (batchnorm's ``num_batches_tracked``), incremented in place by one
            per call with ``training=True``, once the input has passed every check (a rejected input counts no
            batch); calls with ``training=False`` count nothing, with or without running statistics.
        nonfinite_count: optional one-element int64 tensor, incremented in place by one per training call with
            running statistics in which some channel's batch statistics were not finite (and its moving averages
            were therefore held).

    Shape:
        - Input: (N, C, *); Output: same shape (and memory format) as the input. An empty input gives an
          empty output and moves no moving average, as in batchnorm.

    Raises:
        ValueError: for an input with fewer than 2 dimensions, ``eps <= 0``; in training with running
            statistics for ``momentum`` outside [0, 1], ``rmax < 1`` or ``dmax < 0`` (given as numbers:
            tensors are not read); in training for a ``microbatch_size`` below 1 or not dividing the
            batch, or one value per channel (and group).
        TypeError: for a ``num_batches_tracked`` that is not a one-element tensor.

    Examples::

        >>> import torch
        >>> x = torch.randn(8, 3, 4, 4)
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_renorm(x, mean, var, training=True, rmax=3.0, dmax=5.0)
        >>> y.shape
        torch.Size([8, 3, 4, 4])
    """
    if input.dim() < 2:
        raise ValueError(f"batch_renorm expects input of shape (N, C, *), got shape {tuple(input.shape)}")
    if (running_mean is None) != (running_var is None):
        given, missing = ("running_mean", "running_var") if running_var is None else ("running_var", "running_mean")
        raise ValueError(
            f"batch_renorm got {given} but {missing}=None: pass both running statistics (moving averages to "
            "renormalize against and update) or neither (batch statistics, as batchnorm without running stats)"
        )
    num_features = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != num_features:
            raise ValueError(
                f"{name} should contain {num_features} elements (one per channel of the input of shape "
                f"{tuple(input.shape)}) not {t.numel()}"
            )
    # Python numbers are checked in eager mode (lightning_brn.validation); a compiled graph may hold them as symbolic
    # values, and gets them from a layer, which checked them when they were set
    eager = not _is_compiling()
    if microbatch_size is not None and eager:
        microbatch_size = check_microbatch_size(microbatch_size)
    if num_batches_tracked is not None and not (
        isinstance(num_batches_tracked, torch.Tensor) and num_batches_tracked.numel() == 1
    ):
        raise TypeError(
            "num_batches_tracked must be a one-element tensor (batchnorm's counter) or None, got "
            + (f"a tensor of shape {tuple(num_batches_tracked.shape)}" if isinstance(num_batches_tracked, torch.Tensor)
               else f"num_batches_tracked={num_batches_tracked!r}")
        )
    if eager and not isinstance(eps, Tensor):
        check_eps(eps)
    use_running = running_mean is not None and running_var is not None
    if not training and use_running:
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if use_running and eager:  # training with moving averages, the only use of momentum, rmax and dmax
        # Python numbers are checked here; tensors (the layers' schedule buffer, checked when set) are not read
        if not isinstance(momentum, Tensor):
            check_momentum(momentum)
        if not isinstance(rmax, Tensor):
            check_rmax(rmax)
        if not isinstance(dmax, Tensor):
            check_dmax(dmax)

    n = input.shape[0]
    groups = 1
    if microbatch_size is not None and training:
        if n % microbatch_size != 0:
            raise ValueError(
                f"microbatch_size={microbatch_size} does not divide the batch size {n}: "
                f"use a batch size that is a multiple of {microbatch_size}"
            )
        groups = n // microbatch_size or 1  # (no builtins here: each one would be a guard of a compiled graph)
    if input.numel() == 0:
        # As torch's batch_norm: an empty batch has no statistics. The output is empty and still depends on weight and
        # bias (zero gradients), the moving averages do not move, and batchnorm's counter counts the call.
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if correction_stats is not None:  # nothing was renormalized (count 0), not the previous batch's record
            correction_stats.zero_()
        return torch.nn.functional.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    values_per_channel = input.numel() // (num_features or 1) // groups
    if values_per_channel <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(input.shape)}"
            + (f" with microbatch_size={microbatch_size}" if groups > 1 else "")
        )

    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)

    route = choose_route(input, (weight, bias, running_mean, running_var), (rmax, dmax, momentum), use_running, groups)
    if route is Route.CPP:  # the same maths in one C++ operator (lightning_brn/csrc/renorm_cpu.cpp)
        op = cpu_kernels.cpu_op()
        assert op is not None
        return op(
            input, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, correction_stats,
            nonfinite_count,
        )
    if route is Route.ATEN:
        return batch_renorm_aten(
            input, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, correction_stats,
            nonfinite_count,
        )
    if route is Route.COMPILED_CPP:
        assert running_mean is not None and running_var is not None
        return batch_renorm_compiled_cpp(
            input, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, correction_stats,
            nonfinite_count,
        )
    return batch_renorm_compiled(
        input, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, correction_stats,
        nonfinite_count,
    )
