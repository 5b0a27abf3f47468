r"""Functional Batch Renormalization (Ioffe, 2017, https://arxiv.org/abs/1702.03275).

The maths of Algorithm 1 lives here; the modules in :mod:`lightning_brn.layers` only decide the mode
and which buffers to pass, as ``torch.nn.BatchNorm2d`` does with :func:`torch.nn.functional.batch_norm`.

Running statistics use batchnorm's storage convention so that state dicts are interchangeable:
``running_mean`` holds the paper's moving mean :math:`\mu` and ``running_var`` holds
:math:`\sigma^2 - \epsilon`, where :math:`\sigma` is the paper's moving *standard deviation*
(which already contains :math:`\epsilon`). Inference is then exactly
``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)``.

Why this is as fast as batchnorm: ``r`` and ``d`` are constants for the backward pass, so with the
batch statistics in hand the training output is batchnorm's training output with weight
:math:`\gamma r` and bias :math:`\beta + \gamma d`. The forward pass computes the statistics once
(with batchnorm's own statistics kernel), normalizes with batchnorm's elementwise kernel, and the
backward pass is batchnorm's own backward kernel fed those per-channel constants. Saved for backward:
the input plus per-channel vectors, the same memory as batchnorm (up to a few vectors of C values).

On CPU, for float32/float64 in eager mode, the whole training step runs in one C++ operator with its own
autograd node (``lightning_brn/csrc/renorm_cpu.cpp``, built once per machine on first use, see
:mod:`lightning_brn.cpu_kernels`; ``LIGHTNING_BRN_CPP=0`` turns it off): the same maths without Python in the loop,
with its own vectorized statistics, elementwise and backward kernels (faster than aten's batchnorm kernels
on contiguous NCHW data). CUDA, half precision under autocast and machines without a C++ compiler use the
Python path below; both paths are tested against each other and against a literal Algorithm 1.

Under ``torch.compile`` the same maths is written from primitives for inductor to fuse
(:class:`_RenormCompiled`), with the moving-average update in the opaque custom operator
``lightning_brn::renorm_update`` so that no compiled backward can recompute r and d from buffers the
forward already updated. On CPU (float32/float64, with running statistics) compiled graphs instead take one of
two routes: without microbatches the step is written as ``x * scale + shift`` per channel with batchnorm's
backward (weight ``gamma * r``) (:func:`_batch_renorm_inline`), which inductor fuses into one forward and one
backward kernel, with the statistics, r, d and gamma * r in one (5, C) tensor the partitioner saves rather than
recomputes, and which it fuses with the model's neighbouring ops (an activation, a residual add) as it does
batchnorm; microbatches call the C++ operators ``lightning_brn_cpu::renorm_fwd`` / ``renorm_bwd``, opaque to
the compiler. Under
``torch._functorch.config.activation_memory_budget`` < 1 (or ``aggressive_recomputation``), where the
partitioner may recompute what it would otherwise save, every compiled graph with running statistics takes the
inline route with r and d saved by a ``MUST_SAVE`` selective-checkpoint policy. The route is decided once per
traced graph (:func:`_compiled_route`, a constant with no guard; only the microbatch test stays in the graph, where
sizes may be symbolic), and the traced code reads few globals: every global, builtin or helper function a trace reads
becomes a guard that the compiled graph checks on each call.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

from lightning_brn import cpu_kernels
from lightning_brn.validation import check_dmax, check_eps, check_microbatch_size, check_momentum, check_rmax

# one module global (a guard of its own in compiled graphs) rather than the chain torch.compiler.is_compiling
_is_compiling = torch.compiler.is_compiling

__all__ = ["batch_renorm", "renorm_correction", "set_compiled_inline_limit"]

Number = Union[float, Tensor]

_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics are computed in float32 for half inputs, in the input dtype otherwise."""
    return torch.float32 if x.dtype in _REDUCED_PRECISION else x.dtype


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), in stat dtype (call without autograd)."""
    if x.is_cuda and x.dtype in (torch.float32, *_REDUCED_PRECISION):
        # CUDA's batchnorm statistics kernel: float32 accumulation, returns (mean, invstd).
        mean, invstd = torch.batch_norm_stats(x, 0.0)
        return mean, invstd.reciprocal().square_()
    if x.dtype in _REDUCED_PRECISION:
        x = x.float()
    if _shape_only(x):  # meta or fake tensors (measure_flops, FakeTensorMode): the kernel below has neither version
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        return mean, var
    # batchnorm's own CPU statistics kernel; running stats None: nothing is updated.
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def _group_stats(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """(G, C) means and biased variances of G consecutive groups of the batch (call without autograd)."""
    k = x.shape[0] // groups
    stats = [_batch_stats(x[g * k : (g + 1) * k]) for g in range(groups)]
    return torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])


class _RenormBN(torch.autograd.Function):
    """Training-mode Batch Renorm on batchnorm's own kernels.

    Forward (autograd off): batch statistics with batchnorm's statistics kernel, r and d and the in-place
    moving-average update (:func:`_renorm_step`), then, with ``w = gamma * r`` and ``b = beta + gamma * d``
    per channel (and per group), the output is eval-mode batchnorm of the *batch* statistics with weight
    ``w`` and bias ``b``: one elementwise pass. Since r and d are constants, the input gradient is
    batchnorm's training backward with weight ``w``, and by the chain rule the gradients of gamma and
    beta are ``r * dL/dw + d * dL/db`` and ``dL/db``. Saved for backward: the input and per-channel vectors,
    as batchnorm. With ``groups`` > 1, each group of consecutive examples has its own statistics, r and d.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        rmax: Number,
        dmax: Number,
        momentum: Number,
        eps: float,
        groups: int,
        correction_stats: Optional[Tensor],
        nonfinite_count: Optional[Tensor] = None,
    ) -> Tensor:
        # (N, C) features in microbatches: a few vectorized ops over the (G, k, C) view beat G calls of each
        # batchnorm kernel on rows this short. Other layouts call the kernels once per group.
        vectorized = groups > 1 and x.dim() == 2
        ctx.vectorized = vectorized
        if vectorized:
            x3 = x.view(groups, -1, x.shape[1]).to(_stat_dtype(x))
            mean = x3.mean(1)
            var = (x3 - mean.unsqueeze(1)).square_().mean(1)
        else:
            mean, var = _batch_stats(x) if groups == 1 else _group_stats(x, groups)
        std = var.add(eps).sqrt_()
        param_dtype = torch.float32 if mean.dtype in _REDUCED_PRECISION else mean.dtype
        if weight is not None and weight.dtype in (torch.float32, torch.float64):
            param_dtype = weight.dtype
        if running_mean is not None and running_var is not None:
            r, d = _renorm_step(
                mean, std, running_mean, running_var, rmax, dmax, momentum, eps, correction_stats, nonfinite_count
            )
        else:
            r = torch.ones_like(mean)
            d = torch.zeros_like(mean)
        if mean.dtype != param_dtype:
            mean, var, std, r, d = (t.to(param_dtype) for t in (mean, var, std, r, d))
        ctx.weight_dtype = None if weight is None else weight.dtype
        if weight is not None and weight.dtype != param_dtype:
            weight = weight.to(param_dtype)
        if bias is not None and bias.dtype != param_dtype:
            bias = bias.to(param_dtype)
        if weight is None:
            w_eff = r
            b_eff = d if bias is None else d + bias
        else:
            w_eff = weight * r
            b_eff = weight * d if bias is None else torch.addcmul(bias, weight, d)
        invstd = std.reciprocal_()
        if groups == 1:
            # Eval-mode batchnorm with the *batch* statistics is exactly the training output.
            out = torch.batch_norm(x, w_eff, b_eff, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        else:
            scale = w_eff * invstd
            shift = b_eff - mean * scale
            # channels-last data as a plain (G, M, C) view, so the broadcast runs along contiguous channels
            cl = _memory_format(x) != torch.contiguous_format
            bshape, _ = _group_layout(x, groups, cl)
            # write into a tensor of the input's shape and memory format (contiguous for any other strides, as
            # batchnorm's output): the output must not be a view
            out = torch.empty_like(x, memory_format=_memory_format(x))
            out_g = _grouped(out, groups, cl)  # a view of ``out`` (same memory format as x)
            if x.dtype == scale.dtype:
                torch.addcmul(shift.view(bshape), _grouped(x, groups, cl), scale.view(bshape), out=out_g)
            else:  # half inputs: the affine step in float32 (shift cancels the mean), rounded once
                out_g.copy_(torch.addcmul(shift.view(bshape), _grouped(x, groups, cl).to(scale.dtype), scale.view(bshape)))
        ctx.save_for_backward(x, w_eff, mean, invstd, r, d)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, w_eff, mean, invstd, r, d = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_affine = need_w or need_b
        if ctx.vectorized:
            # batchnorm's backward per (group, channel), written out over the (G, k, C) view
            groups, c = mean.shape
            grad_x, grad_b_eff, grad_w_eff = _bn_backward_formula(
                x.view(groups, -1, c).to(mean.dtype), grad_out.reshape(groups, -1, c).to(mean.dtype),
                mean, invstd, w_eff, (groups, 1, c), [1],
            )
            grad_x = grad_x.view(x.shape).to(x.dtype)
        elif mean.dim() == 1:
            grad_out = grad_out.contiguous(memory_format=_memory_format(x))
            grad_x, grad_w_eff, grad_b_eff = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, w_eff, None, None, mean, invstd, True, ctx.eps, [need_x, need_affine, need_affine]
            )
        else:
            grad_out = grad_out.contiguous(memory_format=_memory_format(x))
            # batchnorm's backward kernel per group into slices of the outputs (on CPU the kernel still
            # copies each group's result in; aten has no in-place per-group backward on CPU)
            groups = mean.shape[0]
            k = x.shape[0] // groups
            grad_x = torch.empty_like(x)
            grad_w_eff = torch.empty_like(w_eff)
            grad_b_eff = torch.empty_like(w_eff)
            for g in range(groups):
                sl = slice(g * k, (g + 1) * k)
                torch.ops.aten.native_batch_norm_backward.out(
                    grad_out[sl], x[sl], w_eff[g], None, None, mean[g], invstd[g], True, ctx.eps, [True, True, True],
                    out0=grad_x[sl], out1=grad_w_eff[g], out2=grad_b_eff[g],
                )
        grad_weight = grad_bias = None
        if need_w and ctx.weight_dtype is not None:
            grad_weight = torch.addcmul(grad_w_eff * r, grad_b_eff, d)
            if grad_weight.dim() == 2:
                grad_weight = grad_weight.sum(0)
        if need_b:
            grad_bias = grad_b_eff if grad_b_eff.dim() == 1 else grad_b_eff.sum(0)
        if grad_weight is not None and grad_weight.dtype != ctx.weight_dtype:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        if grad_bias is not None and grad_bias.dtype != ctx.weight_dtype:
            grad_bias = grad_bias.to(ctx.weight_dtype)
        return grad_x if need_x else None, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def renorm_correction(
    batch_mean: Tensor,
    batch_std: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    rmax: Number,
    dmax: Number,
) -> tuple[Tensor, Tensor]:
    r"""The clipped correction of Algorithm 1, as constants (no gradient).

    .. math::
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\left(\frac{\sigma_B}{\sigma}\right), \qquad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\left(\frac{\mu_B - \mu}{\sigma}\right)

    Args:
        batch_mean: :math:`\mu_B`, shape (C,) or (G, C).
        batch_std: :math:`\sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}`, same shape.
        running_mean: :math:`\mu`, shape (C,).
        running_std: :math:`\sigma` (contains :math:`\epsilon`), shape (C,).
        rmax: upper bound of r (>= 1); float or one-element tensor.
        dmax: bound of |d| (>= 0); float or one-element tensor.

    Returns:
        ``(r, d)``, detached, with the shape of ``batch_mean``.

    Example::

        >>> import torch
        >>> r, d = renorm_correction(torch.tensor([0.5]), torch.tensor([4.0]), torch.tensor([0.0]),
        ...                          torch.tensor([1.0]), rmax=3.0, dmax=0.1)
        >>> r.item(), round(d.item(), 6)
        (3.0, 0.1)
    """
    with torch.no_grad():
        return _clip(batch_std / running_std, (batch_mean - running_mean) / running_std, rmax, dmax)


def _as_scalar_tensor(value: Number) -> Number:
    """A one-element tensor (the layers pass (1,) slices of their schedule buffer) as a 0-dim one, which takes part in
    no type promotion; anything else as it is."""
    return value.reshape(()) if isinstance(value, Tensor) and value.dim() > 0 and value.numel() == 1 else value


def _clip(r_raw: Tensor, d_raw: Tensor, rmax: Number, dmax: Number) -> tuple[Tensor, Tensor]:
    # one-element tensors as 0-dim ones: bounds never promote r and d to their dtype
    rmax, dmax = (_as_scalar_tensor(v) for v in (rmax, dmax))
    rmin = rmax.reciprocal() if isinstance(rmax, Tensor) else 1.0 / rmax
    return r_raw.clamp(rmin, rmax), d_raw.clamp(-dmax, dmax)


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

    if not eager:
        return _batch_renorm_composite(
            input, running_mean, running_var, weight, bias, momentum, eps, rmax, dmax, groups, correction_stats,
            nonfinite_count,
        )

    if not use_running:
        running_mean = running_var = None
    if input.device.type == "cpu" and input.dtype in _CPP_DTYPES and _cpp_eligible(
        input.dtype, (weight, bias, running_mean, running_var), (rmax, dmax, momentum)
    ) and not _shape_only(input):
        op = cpu_kernels.cpu_op()
        if op is not None:  # the same maths in one C++ operator (lightning_brn/csrc/renorm_cpu.cpp)
            return op(
                input, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, correction_stats,
                nonfinite_count,
            )
    return _RenormBN.apply(
        input, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, correction_stats,
        nonfinite_count,
    )


_CPP_DTYPES = (torch.float32, torch.float64)


def _shape_only(x: Tensor) -> bool:
    """Whether ``x`` carries shapes but no data: a meta tensor, or a fake one (``FakeTensorMode``, which Lightning's
    ``measure_flops`` and tracers use); the C++ operators and aten's statistics kernel need data."""
    return x.device.type == "meta" or is_fake(x)


def _cpp_eligible(
    dtype: torch.dtype, per_channel: tuple[Optional[Tensor], ...], hyper: tuple[Number, ...] = ()
) -> bool:
    """Per-channel tensors of the input's dtype (or None) and Python-number hyper-parameters (the eager C++
    operator takes floats; tensor hyper-parameters, as in fx-traced graphs, take the Python path)."""
    for a in per_channel:
        if not _per_channel_ok(a, dtype):
            return False
    return all(isinstance(h, (float, int)) and not isinstance(h, bool) for h in hyper)


def _per_channel_ok(t: Optional[Tensor], dtype: torch.dtype) -> bool:
    """A per-channel tensor the C++ operators and the compiled inline step take as it is: absent, or a contiguous
    vector of the input's dtype on the CPU."""
    return t is None or (t.dtype == dtype and t.dim() == 1 and t.is_contiguous() and t.device.type == "cpu")


def _renorm_step(
    mean_b: Tensor,
    std_b: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    rmax: Number,
    dmax: Number,
    momentum: Number,
    eps: float,
    correction_stats: Optional[Tensor],
    nonfinite_count: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    r"""r and d from the moving averages as they are, then the moving-average update, in place.

    ``mean_b`` and ``std_b`` (:math:`\sigma_B`, eps included) are (C,) or (G, C) for G microbatches; the moving
    averages then move once towards the mean over groups. A channel whose statistics are not finite keeps its
    averages (counted in ``nonfinite_count``). Hyper-parameters may be Python floats (eager: no conversions) or
    one-element tensors (compiled graphs). Returns r and d in the statistics' dtype.
    """
    momentum = _as_scalar_tensor(momentum)
    sd = mean_b.dtype
    rm = running_mean if running_mean.dtype == sd else running_mean.to(sd)
    rv = running_var if running_var.dtype == sd else running_var.to(sd)
    running_std = rv.add(eps).sqrt_()
    r_raw = std_b / running_std
    d_raw = (mean_b - rm).div_(running_std)
    r, d = _clip(r_raw, d_raw, rmax, dmax)
    if correction_stats is not None:
        correction_stats.copy_(
            torch.stack(
                [
                    (r != r_raw).sum().to(correction_stats.dtype),  # hit a bound
                    (d != d_raw).sum().to(correction_stats.dtype),
                    (r - 1).abs_().sum().to(correction_stats.dtype),
                    d.abs().sum().to(correction_stats.dtype),
                    torch.full((), r.numel(), dtype=correction_stats.dtype, device=correction_stats.device),
                ]
            )
        )
    if mean_b.dim() == 2:  # microbatches: move towards the mean over groups
        mean_b = mean_b.mean(0)
        std_b = std_b.mean(0)
    alpha = momentum.to(sd) if isinstance(momentum, Tensor) else momentum
    if isinstance(alpha, float) and alpha == 0.0:
        return r, d  # the averages stay exactly as they are
    # channels with non-finite statistics move towards the averages themselves: they stay exactly as they are
    finite = torch.isfinite(mean_b) & torch.isfinite(std_b)
    mean_b = torch.where(finite, mean_b, rm)
    std_b = torch.where(finite, std_b, running_std)
    if nonfinite_count is not None:
        nonfinite_count.add_((~finite).any().to(nonfinite_count.dtype))
    # mu += alpha (mu_B - mu); sigma += alpha (sigma_B - sigma) =: sigma + delta, stored as
    # running_var = sigma^2 - eps, i.e. running_var += delta (2 sigma + delta): exact when delta = 0, and no
    # cancellation between sigma^2 and eps for channels whose variance is far below eps
    delta = (std_b - running_std).mul_(alpha)
    var_step = delta.add(running_std, alpha=2.0).mul_(delta)
    if rm is running_mean:
        running_mean.lerp_(mean_b, alpha)
        running_var.add_(var_step).clamp_min_(0.0)
    else:
        running_mean.copy_(rm.lerp(mean_b, alpha))
        running_var.copy_(rv.add(var_step).clamp_min_(0.0))
    return r, d


def _as_tensor(value: Number) -> Tensor:
    return value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)


@torch.library.custom_op(
    "lightning_brn::renorm_update", mutates_args=("running_mean", "running_var", "correction_stats", "nonfinite_count")
)
def _renorm_update_op(
    mean_b: Tensor,
    std_b: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    rmax: Tensor,
    dmax: Tensor,
    momentum: Tensor,
    eps: float,
    correction_stats: Optional[Tensor],
    nonfinite_count: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """r and d from the moving averages, then the moving-average update (and the optional record).

    An opaque operator for compilers: AOTAutograd's partitioner may otherwise recompute r and d in the
    backward graph from the running buffers *after* this step's in-place update, which silently
    corrupts the gradients. As an operator, its outputs are saved, never recomputed.
    """
    return _renorm_step(
        mean_b, std_b, running_mean, running_var,
        rmax.to(mean_b.device), dmax.to(mean_b.device), momentum.to(mean_b.device), eps, correction_stats,
        nonfinite_count,
    )


@_renorm_update_op.register_fake
def _renorm_update_fake(
    mean_b, std_b, running_mean, running_var, rmax, dmax, momentum, eps, correction_stats, nonfinite_count=None
):
    return torch.empty_like(mean_b), torch.empty_like(mean_b)


def _grouped(x: Tensor, groups: int, channels_last: bool) -> Tensor:
    """``x`` as (G, k, C, *spatial), or as (G, k * prod(spatial), C) for channels-last data (a plain 3-D
    layout compilers reduce well). Non-contiguous inputs are reshaped (copied) into that layout."""
    if channels_last:
        return x.movedim(1, -1).reshape(groups, -1, x.shape[1])
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])


def _ungrouped(t: Tensor, like: Tensor, channels_last: bool) -> Tensor:
    if channels_last:
        return t.view(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)
    return t.view(like.shape)


def _group_layout(x: Tensor, groups: int, channels_last: bool) -> tuple[tuple[int, ...], list[int]]:
    """Broadcast shape of (G, C) statistics against :func:`_grouped` ``x``, and its reduction dims."""
    c = x.shape[1]
    if channels_last:
        return (groups, 1, c), [1]
    return (groups, 1, c) + (1,) * (x.dim() - 2), [1] + list(range(3, x.dim() + 1))


def _bn_backward_formula(
    x: Tensor, dy: Tensor, mean: Tensor, invstd: Tensor, w_eff: Tensor, bshape: tuple[int, ...], dims: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Batchnorm's training backward written out, statistics of shape ``bshape`` reduced over ``dims``.

    Returns ``(grad_x, sum(dy), sum(dy * xhat))``; the last two are the gradients of the effective bias and weight.
    """
    m = x.numel() // mean.numel()
    xhat = (x - mean.view(bshape)).mul_(invstd.view(bshape))
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * xhat).sum(dims)
    correction = xhat.mul_((sum_dy_xhat / m).view(bshape)).add_((sum_dy / m).view(bshape))
    grad_x = torch.sub(dy, correction).mul_((w_eff * invstd).view(bshape))
    return grad_x, sum_dy, sum_dy_xhat


class _RenormCompiled(torch.autograd.Function):
    """The compiled-graph twin of :class:`_RenormBN`: the same maths from primitives inductor fuses.

    Statistics, r and d come in as constants; the backward is batchnorm's backward formula written out
    (what inductor generates for compiled batchnorm), so the compiled graph saves the same tensors and
    does the same reductions as compiled batchnorm, instead of differentiating through ``var_mean``.
    Shapes: ``mean``, ``invstd``, ``r``, ``d`` are (G, C); ``weight`` and ``bias`` (C,) or ``None``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        mean: Tensor,
        invstd: Tensor,
        r: Tensor,
        d: Tensor,
    ) -> Tensor:
        groups, c = mean.shape
        w_eff = r if weight is None else weight.to(r.dtype) * r
        b_eff = d if weight is None else weight.to(d.dtype) * d
        if bias is not None:
            b_eff = b_eff + bias.to(d.dtype)
        scale = w_eff * invstd
        shift = b_eff - mean * scale
        ctx.save_for_backward(x, w_eff, mean, invstd, r, d)
        ctx.has_weight = weight is not None
        if groups == 1:
            cshape = (c,) + (1,) * (x.dim() - 2)
            return (x.to(mean.dtype) * scale.view(cshape) + shift.view(cshape)).to(x.dtype)
        cl = _memory_format(x) != torch.contiguous_format
        ctx.channels_last = cl
        bshape, _ = _group_layout(x, groups, cl)
        out = _grouped(x, groups, cl).to(mean.dtype) * scale.view(bshape) + shift.view(bshape)
        # the output must not be a view (an in-place activation may follow); inductor fuses the copy away
        return _ungrouped(out, x, cl).to(x.dtype).clone(memory_format=torch.preserve_format)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, w_eff, mean, invstd, r, d = ctx.saved_tensors
        groups, c = mean.shape
        if groups == 1:  # reduce over (N, *spatial) of the input as it is: no views for the compiler
            xv, dy = x.to(mean.dtype), grad_out.to(mean.dtype)
            bshape = (c,) + (1,) * (x.dim() - 2)
            dims = [0] + list(range(2, x.dim()))
            w_v, inv_v, mean_v = w_eff[0], invstd[0], mean[0]
        else:
            cl = ctx.channels_last
            xv, dy = _grouped(x, groups, cl).to(mean.dtype), _grouped(grad_out, groups, cl).to(mean.dtype)
            bshape, dims = _group_layout(x, groups, cl)
            w_v, inv_v, mean_v = w_eff, invstd, mean
        grad_x, sum_dy, sum_dy_xhat = _bn_backward_formula(xv, dy, mean_v, inv_v, w_v, bshape, dims)
        sum_dy = sum_dy.view(groups, c)
        sum_dy_xhat = sum_dy_xhat.view(groups, c)
        grad_weight = (sum_dy_xhat * r + sum_dy * d).sum(0) if ctx.has_weight else None
        grad_bias = sum_dy.sum(0)
        grad_x = grad_x.view(x.shape) if groups == 1 else _ungrouped(grad_x, x, ctx.channels_last)
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None, None


def _batch_renorm_composite(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: Number,
    eps: float,
    rmax: Number,
    dmax: Number,
    groups: int,
    correction_stats: Optional[Tensor],
    nonfinite_count: Optional[Tensor] = None,
) -> Tensor:
    """Algorithm 1 for compilers: statistics and the step as graph ops, then :class:`_RenormCompiled`.

    On CPU (float32/float64, with running statistics) inputs without microbatches take
    :func:`_batch_renorm_inline`, which the compiler fuses into one forward and one backward kernel (and with the
    model's neighbouring ops); microbatches call the functional C++ operator ``lightning_brn_cpu::renorm_fwd``
    (and its backward), opaque to the compiler, and copy the running statistics it returns into the buffers
    (:func:`_compiled_route` decides, once per traced graph).

    What this traces is kept lean on purpose: every global, builtin and helper function the trace touches becomes a
    guard that the compiled graph checks on each call, so the route is one constant and the hot path reads only
    tensors."""
    if not (x.is_contiguous() or _memory_format(x) != torch.contiguous_format):
        x = x.contiguous()  # the output is laid out like a dense input, as in eager mode
    has_running = running_mean is not None and running_var is not None
    per_channel_ok = (
        _per_channel_ok(weight, x.dtype) and _per_channel_ok(bias, x.dtype)
        and _per_channel_ok(running_mean, x.dtype) and _per_channel_ok(running_var, x.dtype)
    )
    route = _compiled_route(x.device.type, x.dtype, has_running, per_channel_ok)
    if route != "generic" and route != "must_save":  # the microbatch test in the graph: the sizes may be symbolic
        route = "inline" if _inline_eligible(x, groups) else route
    if route == "inline" or route == "must_save":
        assert running_mean is not None and running_var is not None
        return _batch_renorm_inline(
            x, running_mean, running_var, weight, bias, momentum, eps, rmax, dmax, groups, correction_stats,
            route == "must_save", nonfinite_count,
        )
    if route == "cpp":  # microbatches (or an input above _INLINE_MAX_NUMEL), and the C++ operators are built
        assert running_mean is not None and running_var is not None
        out, _, running, record = torch.ops.lightning_brn_cpu.renorm_fwd(
            x, weight, bias, running_mean, running_var, _as_tensor(rmax), _as_tensor(dmax), _as_tensor(momentum),
            eps, groups, correction_stats is not None,
        )
        with torch.no_grad():
            running_mean.copy_(running[0])
            running_var.copy_(running[1])
            if correction_stats is not None:
                correction_stats.copy_(record[:5])
            if nonfinite_count is not None:
                nonfinite_count.add_((record[5] > 0).to(nonfinite_count.dtype))
        return out
    mean_b, var_b = _composite_stats(x, groups)
    with torch.no_grad():
        std_b = torch.sqrt(var_b + eps)
        if running_mean is not None and running_var is not None:
            r, d = _renorm_update_op(
                mean_b, std_b, running_mean, running_var,
                _as_tensor(rmax), _as_tensor(dmax), _as_tensor(momentum), eps, correction_stats, nonfinite_count,
            )
        else:
            r = torch.ones_like(mean_b)
            d = torch.zeros_like(mean_b)
    out = _RenormCompiled.apply(x, weight, bias, mean_b, std_b.reciprocal(), r, d)
    return out


# Compiled CPU graphs without microbatches: the largest input (in values) that takes the inline step, larger ones
# calling the C++ operators; None: no limit (the default). A layer on its own runs faster through the C++ operators
# once it holds a few hundred thousand values (bench/bench_layers.py), but in a compiled model the inline step
# fuses with the neighbouring activation or residual add, forward and backward, as batchnorm does, and an opaque
# operator cannot, so whole models train slower through the C++ operators (``bench/bench_model.py --cpp-route``;
# figures in docs/performance.md). Tests and ``bench_overhead.py --cpp-route`` set -1 to take them at every size.
_INLINE_MAX_NUMEL: Optional[int] = None


def set_compiled_inline_limit(max_numel: Optional[int]) -> Optional[int]:
    """Route compiled CPU graphs (no microbatches) by input size, for benchmarks and tests: inputs of at most
    ``max_numel`` values take the inline step, larger ones the C++ operators (``None``: no limit, the default;
    ``-1``: the C++ operators at every size). Applies to graphs traced afterwards; returns the previous limit.

    Examples::

        >>> previous = set_compiled_inline_limit(-1)
        >>> set_compiled_inline_limit(previous)
        -1
    """
    global _INLINE_MAX_NUMEL
    if max_numel is not None and (isinstance(max_numel, bool) or not isinstance(max_numel, int) or max_numel < -1):
        raise ValueError(f"max_numel must be None or an int >= -1, got max_numel={max_numel!r}")
    previous, _INLINE_MAX_NUMEL = _INLINE_MAX_NUMEL, max_numel
    return previous


@torch.compiler.assume_constant_result
def _compiled_route(device_type: str, dtype: torch.dtype, has_running: bool, per_channel_ok: bool) -> str:
    """How a compiled graph runs the training step, as far as it does not depend on the input's size:
    ``"must_save"`` (:func:`_batch_renorm_inline` with r and d saved by a selective-checkpoint policy), ``"cpp"``
    (the inline step without microbatches, the C++ operators with), ``"cpu"`` (the same without the C++
    operators: :class:`_RenormCompiled` for microbatches) or ``"generic"`` (:class:`_RenormCompiled`: CUDA and the
    rest).

    Decided once, while the graph is traced, and baked in as a constant with no guard: the partitioner that splits
    this graph runs right after, under the settings read here, so a compiled graph stays consistent with them, and
    none of these reads (three of them calls into Python) is repeated on every call of the compiled graph."""
    if has_running and _partitioner_may_recompute():
        return "must_save"
    if device_type == "cpu" and dtype in _CPP_DTYPES and has_running and per_channel_ok:
        return "cpp" if cpu_kernels.compiled_op_ready() else "cpu"
    return "generic"


def _partitioner_may_recompute() -> bool:
    """Whether AOTAutograd's partitioner is configured to recompute ops outside its allowlist (the
    ``select_scatter`` of :func:`_pack_constants` included): an activation memory budget below 1,
    ``aggressive_recomputation``, or the allowlist ban lifted. A budget of 0 (recompute everything from the graph
    inputs) honours nothing and is refused."""
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


def _inline_eligible(x: Tensor, groups: int) -> bool:
    """Whether a compiled CPU graph takes the inline step for ``x`` (tested in the graph: sizes may be symbolic)."""
    return groups == 1 and (_INLINE_MAX_NUMEL is None or x.numel() <= _INLINE_MAX_NUMEL)


def _batch_renorm_inline(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: Number,
    eps: float,
    rmax: Number,
    dmax: Number,
    groups: int,
    correction_stats: Optional[Tensor],
    must_save: bool,
    nonfinite_count: Optional[Tensor] = None,
) -> Tensor:
    """Algorithm 1 as batchnorm of the input with weight ``gamma * r`` and bias ``beta + gamma * d`` (r and d
    constants), written for compilers (running statistics given, input contiguous or channels-last;
    half-precision inputs computed in float32).

    The compiler fuses the statistics, the step and the normalization into one forward kernel, and
    batchnorm's backward (:class:`_InlineRenorm`) into one backward kernel. G microbatches are batchnorm over
    (k, G * C, *): each group of k examples is a block of channels with its own statistics.

    r and d must reach the backward as computed here, from the averages before this step's update: AOTAutograd's
    partitioner would otherwise be free to recompute them in the backward from the buffers, which by then hold
    the updated averages (a hazard of the partitioner itself).
    By default they reach it, with the batch mean, 1/sigma_B and gamma * r, in one (5, C) tensor built by
    ``select_scatter`` (:func:`_pack_constants`), an operator the partitioner's default settings never
    recompute, so it saves that tensor (or rows of it). With ``must_save`` (set when its settings allow
    recomputing it, see :func:`_partitioner_may_recompute`) the tensor comes out of a selective-checkpoint
    region whose policy is ``MUST_SAVE``, which the partitioner honours at any budget above 0.
    """
    x_dtype = x.dtype
    if x.element_size() < 4:
        x = x.float()  # float16/bfloat16: statistics and normalization in float32, as in eager mode
    n, c = x.shape[0], x.shape[1]
    k = n // groups
    # (N, C, *) as (k, G * C, *): example j of group g is row j, channels g * C .. g * C + C - 1
    xs = x if groups == 1 else x.reshape(groups, k, *x.shape[1:]).transpose(0, 1).reshape(k, groups * c, *x.shape[2:])
    stat_shape = (c,) if groups == 1 else (groups, c)
    # the statistics over (N, *spatial) as one trailing dim past 5-D: reduction dims without builtins (guards)
    xr = xs if xs.dim() <= 5 else xs.flatten(2)
    with torch.no_grad():
        var_b, mean_b = torch.var_mean(xr, dim=(0, 2, 3, 4)[: xr.dim() - 1], correction=0)
        mean_b = mean_b.view(stat_shape)
        std_b = var_b.view(stat_shape).add(eps).sqrt()
    # mean, 1/sigma_B, r, d, gamma * r: the backward's only per-channel input, from the averages before the update
    # below, saved rather than recomputed (see the docstring)
    if must_save:
        from torch.utils.checkpoint import checkpoint

        packed = checkpoint(
            _packed_constants, mean_b, std_b, running_mean, running_var, weight, rmax, dmax, eps,
            use_reentrant=False, context_fn=_must_save_context,
        )
    with torch.no_grad():  # hyper-parameters or running statistics that require grad get none, as in eager mode
        r, d = _renorm_step(
            mean_b, std_b, running_mean, running_var, rmax, dmax, momentum, eps, correction_stats, nonfinite_count
        )
        if not must_save:
            packed = _pack_constants(mean_b, std_b, r, d, weight)
    if groups > 1:
        packed = packed.view(5, groups * c)
        if weight is not None:
            weight = weight.repeat(groups)
        if bias is not None:
            bias = bias.repeat(groups)
    y = _InlineRenorm.apply(xs, weight, bias, packed, eps)
    if groups > 1:
        y = y.reshape(k, groups, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        y = y.contiguous(memory_format=_memory_format(x))
    return y.to(x_dtype)


# one module global (a guard of its own) rather than torch.ops.aten.native_batch_norm_backward, a chain of four
_native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward


class _InlineRenorm(torch.autograd.Function):
    """y = x * scale + shift per channel, with ``packed`` = (mean, 1/sigma_B, r, d, gamma * r) constants; the
    backward is batchnorm's (``aten.native_batch_norm_backward`` with weight gamma * r), so a compiler fuses each
    pass into one kernel and saves only the input and ``packed``. The forward reads the rows of ``packed`` by
    indexing and the backward by ``unbind``: the partitioner then saves ``packed`` itself, one tensor, rather than
    the rows of one shared ``unbind``. gamma * r has a row of its own so that the backward's elementwise loop
    reads one per-channel weight, as batchnorm's does, rather than multiplying gamma by r for every value."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], packed: Tensor, eps: float
    ) -> Tensor:
        mean, invstd, d, w_eff = packed[0], packed[1], packed[3], packed[4]
        b_eff = d if weight is None else weight.to(d.dtype) * d
        if bias is not None:
            b_eff = b_eff + bias.to(d.dtype)
        scale = w_eff * invstd
        cshape = (x.shape[1],) + (1,) * (x.dim() - 2)
        ctx.save_for_backward(x, packed)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return x * scale.view(cshape) + (b_eff - mean * scale).view(cshape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, packed = ctx.saved_tensors
        mean, invstd, r, d, w_eff = packed.unbind(0)
        grad_x, grad_w_eff, grad_b_eff = _native_batch_norm_backward(
            grad_out, x, w_eff, None, None, mean, invstd, True, ctx.eps, [True, True, True]
        )
        grad_weight = None if ctx.weight_dtype is None else (grad_w_eff * r + grad_b_eff * d).to(ctx.weight_dtype)
        grad_bias = grad_b_eff if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, None


def _packed_constants(
    mean_b: Tensor, std_b: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], rmax: Number,
    dmax: Number, eps: float,
) -> Tensor:
    """:func:`_pack_constants` with r and d computed here from the moving averages (no autograd): the body of the
    ``MUST_SAVE`` region of :func:`_batch_renorm_inline`."""
    with torch.no_grad():
        sd = mean_b.dtype
        running_std = (running_var.to(sd) + eps).sqrt()
        r, d = renorm_correction(mean_b, std_b, running_mean.to(sd), running_std, rmax, dmax)
        return _pack_constants(mean_b, std_b, r, d, weight)


def _pack_constants(mean_b: Tensor, std_b: Tensor, r: Tensor, d: Tensor, weight: Optional[Tensor]) -> Tensor:
    """(5, *mean_b.shape): the batch mean, 1/sigma_B, r, d and gamma * r (r without a weight), without autograd,
    for :class:`_InlineRenorm`.

    Written into rows by ``select_scatter``, which inductor lowers to one elementwise write fused into the forward
    kernel, and which AOTAutograd's partitioner does not recompute under its default settings (no scatter is in
    its allowlist). ``torch.stack`` has the second property too, but on CPU inductor lays a concatenation out as
    views of one buffer that the compiled graph builds on every call, and the partitioner then saved those views,
    several tensors instead of one, a fixed cost per layer and step (``bench/bench_overhead.py`` measures it)."""
    with torch.no_grad():
        w_eff = r if weight is None else weight.to(r.dtype) * r
        packed = mean_b.new_empty((5, *mean_b.shape))
        for i, t in enumerate((mean_b, std_b.reciprocal(), r, d, w_eff)):
            packed = torch.select_scatter(packed, t, 0, i)
        return packed


def _must_save_context():  # type: ignore[no-untyped-def]
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_SAVE)


def _composite_stats(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """(G, C) batch means and biased variances of ``x`` in the statistics dtype, without gradient."""
    c = x.shape[1]
    stat_dtype = _stat_dtype(x)
    with torch.no_grad():
        if groups == 1:
            var_b, mean_b = torch.var_mean(x.detach().to(stat_dtype), dim=[0] + list(range(2, x.dim())), correction=0)
            return mean_b.view(1, c), var_b.view(1, c)
        cl = _memory_format(x) != torch.contiguous_format
        xg = _grouped(x.detach(), groups, cl).to(stat_dtype)
        var_b, mean_b = torch.var_mean(xg, dim=_group_layout(x, groups, cl)[1], correction=0)  # (G, C)
        return mean_b, var_b
