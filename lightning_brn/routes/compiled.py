"""``Route.COMPILED`` and ``Route.COMPILED_CPP``: the training step inside ``torch.compile``.

The step is written as ``y = x * scale + shift`` per channel with batchnorm's backward (weight ``gamma * r``), from
ops inductor fuses: the statistics, the step and the normalization into one forward kernel, the backward into one
backward kernel, each fused with the model's neighbouring ops (an activation, a residual add) as inductor does for
batchnorm. G microbatches are batchnorm over (k, G * C, \\*).

r and d must reach the backward as computed here, from the averages *before* this step's in-place update:
AOTAutograd's partitioner would otherwise be free to recompute them in the backward from the buffers, which by
then hold the updated averages. They reach it, with the batch mean, 1/sigma_B and gamma * r, in one (5, C) tensor
built by ``select_scatter`` (:func:`_pack_for_backward`), an operator the partitioner's default settings never
recompute, so it saves that tensor. Where its settings allow recomputing it (:func:`partitioner_may_recompute`),
the tensor is built inside a selective-checkpoint region whose policy is ``MUST_SAVE``, which the partitioner
honours at any budget above 0.

``Route.COMPILED_CPP`` (CPU, microbatches) calls the functional C++ operators instead, opaque to the compiler: they
return the saved constants and the updated running statistics, which are copied into the buffers.

What this traces is kept lean on purpose: every global, builtin and helper function a trace reads becomes a guard
that the compiled graph checks on each call.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lightning_brn.algorithm import renorm_correction, renorm_step
from lightning_brn.routes import channels_as_groups, groups_as_channels, memory_format, partitioner_may_recompute

__all__ = ["batch_renorm_compiled", "batch_renorm_compiled_cpp"]

Number = Union[float, Tensor]

# one module global (a guard of its own) rather than torch.ops.aten.native_batch_norm_backward, a chain of four
_native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward


def batch_renorm_compiled(
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
    nonfinite_count: Optional[Tensor],
) -> Tensor:
    """``Route.COMPILED``: one training step in a compiled graph (arguments checked by
    :func:`lightning_brn.functional.batch_renorm`); half-precision inputs are computed in float32."""
    x_dtype = x.dtype
    if not (x.is_contiguous() or memory_format(x) != torch.contiguous_format):
        x = x.contiguous()  # the output is laid out like a dense input, as in eager mode
    if x.element_size() < 4:
        x = x.float()
    c = x.shape[1]
    xs = groups_as_channels(x, groups)
    stat_shape = (c,) if groups == 1 else (groups, c)
    # the statistics over (N, *spatial) as one trailing dim past 5-D: reduction dims without builtins (guards)
    xr = xs if xs.dim() <= 5 else xs.flatten(2)
    with torch.no_grad():
        var_b, mean_b = torch.var_mean(xr, dim=(0, 2, 3, 4)[: xr.dim() - 1], correction=0)
        mean_b = mean_b.view(stat_shape)
        std_b = var_b.view(stat_shape).add(eps).sqrt()
    has_running = running_mean is not None and running_var is not None
    must_save = has_running and partitioner_may_recompute()
    if must_save:
        from torch.utils.checkpoint import checkpoint

        packed = checkpoint(
            _constants_from_averages, mean_b, std_b, running_mean, running_var, weight, rmax, dmax, eps,
            use_reentrant=False, context_fn=_must_save_context,
        )
    with torch.no_grad():  # hyper-parameters or running statistics that require grad get none, as in eager mode
        if has_running:
            r, d = renorm_step(
                mean_b, std_b, running_mean, running_var, rmax, dmax, momentum, eps, correction_stats, nonfinite_count
            )
        else:
            r, d = torch.ones_like(mean_b), torch.zeros_like(mean_b)
        if not must_save:
            packed = _pack_for_backward(mean_b, std_b, r, d, weight)
    if groups > 1:
        packed = packed.view(5, groups * c)
        if weight is not None:
            weight = weight.repeat(groups)
        if bias is not None:
            bias = bias.repeat(groups)
    y = _ScaleShift.apply(xs, weight, bias, packed, eps)
    return channels_as_groups(y, x, groups).to(x_dtype)


def batch_renorm_compiled_cpp(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    rmax: Number,
    dmax: Number,
    momentum: Number,
    eps: float,
    groups: int,
    correction_stats: Optional[Tensor],
    nonfinite_count: Optional[Tensor],
) -> Tensor:
    """``Route.COMPILED_CPP``: the functional C++ operator ``lightning_brn_cpu::renorm_fwd`` (its autograd formula
    calls ``renorm_bwd``), then the running statistics and the record it returns copied into the buffers."""
    if not (x.is_contiguous() or memory_format(x) != torch.contiguous_format):
        x = x.contiguous()
    out, _, running, record = torch.ops.lightning_brn_cpu.renorm_fwd(
        x, weight, bias, running_mean, running_var, _as_tensor(rmax), _as_tensor(dmax), _as_tensor(momentum), eps,
        groups, correction_stats is not None,
    )
    with torch.no_grad():
        running_mean.copy_(running[0])
        running_var.copy_(running[1])
        if correction_stats is not None:
            correction_stats.copy_(record[:5])
        if nonfinite_count is not None:
            nonfinite_count.add_((record[5] > 0).to(nonfinite_count.dtype))
    return out


def _as_tensor(value: Number) -> Tensor:
    return value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)


class _ScaleShift(torch.autograd.Function):
    """y = x * scale + shift per channel, with ``packed`` = (mean, 1/sigma_B, r, d, gamma * r) constants; the
    backward is batchnorm's (``aten.native_batch_norm_backward`` with weight gamma * r), so a compiler fuses each
    pass into one kernel and saves only the input and ``packed``. The forward reads the rows of ``packed`` by
    indexing and the backward by ``unbind``: the partitioner then saves ``packed`` itself, one tensor, rather than
    the rows of one shared ``unbind``. gamma * r has a row of its own so that the backward's elementwise loop
    reads one per-channel weight, as batchnorm's does."""

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
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.eps = eps
        return (x * scale.view(cshape) + (b_eff - mean * scale).view(cshape)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, packed = ctx.saved_tensors
        mean, invstd, r, d, w_eff = packed.unbind(0)
        grad_x, grad_w_eff, grad_b_eff = _native_batch_norm_backward(
            grad_out, x, w_eff, None, None, mean, invstd, True, ctx.eps, [True, True, True]
        )
        grad_weight = None if ctx.weight_dtype is None else (grad_w_eff * r + grad_b_eff * d).to(ctx.weight_dtype)
        grad_bias = None if ctx.bias_dtype is None else grad_b_eff.to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


def _constants_from_averages(
    mean_b: Tensor, std_b: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], rmax: Number,
    dmax: Number, eps: float,
) -> Tensor:
    """:func:`_pack_for_backward` with r and d from the moving averages as they are: the body of the ``MUST_SAVE``
    region (the update itself runs outside it, in :func:`renorm_step`)."""
    with torch.no_grad():
        sd = mean_b.dtype
        running_std = (running_var.to(sd) + eps).sqrt()
        r, d = renorm_correction(mean_b, std_b, running_mean.to(sd), running_std, rmax, dmax)
        return _pack_for_backward(mean_b, std_b, r, d, weight)


def _pack_for_backward(mean_b: Tensor, std_b: Tensor, r: Tensor, d: Tensor, weight: Optional[Tensor]) -> Tensor:
    """(5, \\*mean_b.shape): the batch mean, 1/sigma_B, r, d and gamma * r (r without a weight), without autograd.

    Written into rows by ``select_scatter``, which inductor lowers to one elementwise write fused into the forward
    kernel, and which AOTAutograd's partitioner does not recompute under its default settings (no scatter is in
    its allowlist). ``torch.stack`` has the second property too, but on CPU inductor lays a concatenation out as
    views of one buffer, and the partitioner then saves those views, several tensors instead of one."""
    with torch.no_grad():
        w_eff = r if weight is None else weight.to(r.dtype) * r
        packed = mean_b.new_empty((5, *mean_b.shape))
        for i, t in enumerate((mean_b, std_b.reciprocal(), r, d, w_eff)):
            packed = torch.select_scatter(packed, t, 0, i)
        return packed


def _must_save_context():  # type: ignore[no-untyped-def]
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_SAVE)
