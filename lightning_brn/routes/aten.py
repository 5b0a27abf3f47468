"""``Route.ATEN``: the eager training step on batchnorm's own aten kernels, for every device and dtype.

G microbatches run on views of the batch, without copies: the statistics and backward kernel once per group on
its slice, the normalization as one pass over a (G, k, C, \\*) view ((G, k * spatial, C) for channels-last data),
and (N, C) features as a few vectorized ops over the (G, k, C) view.

r and d are constants for the backward, so with the batch statistics in hand the training output is eval-mode
batchnorm of the *batch* statistics with weight ``gamma * r`` and bias ``beta + gamma * d``, and the input gradient
is batchnorm's training backward with weight ``gamma * r``; by the chain rule the gradients of gamma and beta are
``r * dL/dw + d * dL/db`` and ``dL/db``. Saved for backward: the input and per-channel vectors, as batchnorm.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_brn.algorithm import renorm_step
from lightning_brn.routes import memory_format, shape_only, stat_dtype

__all__ = ["batch_renorm_aten"]

Number = Union[float, Tensor]


def batch_renorm_aten(
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
    """One training step (arguments checked by :func:`lightning_brn.functional.batch_renorm`)."""
    return _RenormOnBatchNormKernels.apply(
        x, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, correction_stats,
        nonfinite_count,
    )


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, \\*) in the statistics dtype, with batchnorm's kernels."""
    if x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        mean, invstd = torch.batch_norm_stats(x, 0.0)  # float32 accumulation, returns (mean, invstd)
        return mean, invstd.reciprocal().square_()
    x = x.to(stat_dtype(x))
    if shape_only(x):  # meta or fake tensors: the statistics kernel has no version for them
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        return mean, var
    return torch.batch_norm_update_stats(x, None, None, 0.0)  # running stats None: nothing is updated


def _group_stats(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """(G, C) means and biased variances of G consecutive groups of the batch (call without autograd)."""
    k = x.shape[0] // groups
    stats = [_batch_stats(x[g * k : (g + 1) * k]) for g in range(groups)]
    return torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])


class _RenormOnBatchNormKernels(torch.autograd.Function):
    """Training-mode Batch Renorm on batchnorm's own kernels.

    Forward (autograd off): batch statistics with batchnorm's statistics kernel, r and d and the in-place
    moving-average update (:func:`renorm_step`), then, with ``w = gamma * r`` and ``b = beta + gamma * d``
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
            x3 = x.view(groups, -1, x.shape[1]).to(stat_dtype(x))
            mean = x3.mean(1)
            var = (x3 - mean.unsqueeze(1)).square_().mean(1)
        else:
            mean, var = _batch_stats(x) if groups == 1 else _group_stats(x, groups)
        std = var.add(eps).sqrt_()
        param_dtype = mean.dtype  # the statistics dtype: float32 for half inputs
        if weight is not None and weight.dtype in (torch.float32, torch.float64):
            param_dtype = weight.dtype
        if running_mean is not None and running_var is not None:
            r, d = renorm_step(
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
            cl = memory_format(x) != torch.contiguous_format
            bshape, _ = _group_layout(x, groups, cl)
            # write into a tensor of the input's shape and memory format (contiguous for any other strides, as
            # batchnorm's output): the output must not be a view
            out = torch.empty_like(x, memory_format=memory_format(x))
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
            grad_out = grad_out.contiguous(memory_format=memory_format(x))
            grad_x, grad_w_eff, grad_b_eff = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, w_eff, None, None, mean, invstd, True, ctx.eps, [need_x, need_affine, need_affine]
            )
        else:
            grad_out = grad_out.contiguous(memory_format=memory_format(x))
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


def _grouped(x: Tensor, groups: int, channels_last: bool) -> Tensor:
    """``x`` as (G, k, C, *spatial), or as (G, k * prod(spatial), C) for channels-last data (a plain 3-D
    layout compilers reduce well). Non-contiguous inputs are reshaped (copied) into that layout."""
    if channels_last:
        return x.movedim(1, -1).reshape(groups, -1, x.shape[1])
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])


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
