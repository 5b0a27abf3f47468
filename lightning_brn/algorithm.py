r"""The per-channel maths of Algorithm 1 (Ioffe, 2017, https://arxiv.org/abs/1702.03275), written once.

Every Python route of the training step (:mod:`lightning_brn.routes`) and the synchronized layer
(:mod:`lightning_brn.distributed`) call :func:`renorm_step`; the C++ CPU kernels (``csrc/renorm_cpu.cpp``) are the
same maths in C++, tested against it.

Storage convention (batchnorm's, so that state dicts are interchangeable): ``running_mean`` holds the paper's moving
mean :math:`\mu` and ``running_var`` holds :math:`\sigma^2 - \epsilon`, where :math:`\sigma` is the paper's moving
*standard deviation* (which already contains :math:`\epsilon`). Inference is then exactly batchnorm's.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["renorm_correction", "renorm_step"]

Number = Union[float, Tensor]


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


def renorm_step(
    batch_mean: Tensor,
    batch_std: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    rmax: Number,
    dmax: Number,
    momentum: Number,
    eps: float,
    correction_stats: Optional[Tensor] = None,
    nonfinite_count: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    r"""One training step's per-channel work: r and d from the moving averages as they are, then the
    moving-average update, in place (no gradient).

    .. math::
        \mu \leftarrow \mu + \alpha(\mu_B - \mu), \qquad \sigma \leftarrow \sigma + \alpha(\sigma_B - \sigma)

    stored as ``running_var = sigma**2 - eps``. With G microbatches (statistics of shape (G, C)) r and d are per
    group and the averages move once, towards the mean over groups of :math:`\mu_B` and of :math:`\sigma_B`. A
    channel whose statistics are not finite keeps its averages (one such call counts one in ``nonfinite_count``).

    Args:
        batch_mean: :math:`\mu_B`, shape (C,) or (G, C); its dtype is the dtype of the computation.
        batch_std: :math:`\sigma_B` (:math:`\epsilon` included), same shape.
        running_mean: :math:`\mu`, shape (C,), updated in place.
        running_var: :math:`\sigma^2 - \epsilon`, shape (C,), updated in place.
        rmax, dmax: the clipping bounds; floats or one-element tensors.
        momentum: the rate :math:`\alpha`; float or one-element tensor.
        eps: :math:`\epsilon`.
        correction_stats: optional (5,) float tensor that receives the sums over channels (and groups) of: r
            clipped, d clipped, :math:`|r-1|`, :math:`|d|`, and the count.
        nonfinite_count: optional one-element integer tensor (see above).

    Returns:
        ``(r, d)`` in the statistics' dtype, with the shape of ``batch_mean``.

    Example::

        >>> import torch
        >>> mean, var = torch.zeros(2), torch.ones(2) - 1e-5   # sigma = 1
        >>> r, d = renorm_step(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]), mean, var,
        ...                    rmax=1.5, dmax=0.5, momentum=0.5, eps=1e-5)
        >>> r.tolist(), d.tolist(), mean.tolist()
        ([1.5, 1.0], [0.5, 0.0], [0.5, 0.0])
    """
    with torch.no_grad():
        momentum = _as_scalar_tensor(momentum)
        sd = batch_mean.dtype
        rm = running_mean if running_mean.dtype == sd else running_mean.to(sd)
        rv = running_var if running_var.dtype == sd else running_var.to(sd)
        running_std = rv.add(eps).sqrt_()
        r_raw = batch_std / running_std
        d_raw = (batch_mean - rm).div_(running_std)
        r, d = _clip(r_raw, d_raw, rmax, dmax)
        if correction_stats is not None:
            dt = correction_stats.dtype
            correction_stats.copy_(
                torch.stack(
                    [
                        (r != r_raw).sum().to(dt),  # hit a bound
                        (d != d_raw).sum().to(dt),
                        (r - 1).abs_().sum().to(dt),
                        d.abs().sum().to(dt),
                        torch.full((), r.numel(), dtype=dt, device=correction_stats.device),
                    ]
                )
            )
        if batch_mean.dim() == 2:  # microbatches: move towards the mean over groups
            batch_mean = batch_mean.mean(0)
            batch_std = batch_std.mean(0)
        alpha = momentum.to(sd) if isinstance(momentum, Tensor) else momentum
        if isinstance(alpha, float) and alpha == 0.0:
            return r, d  # the averages stay exactly as they are
        # channels with non-finite statistics move towards the averages themselves: they stay exactly as they are
        finite = torch.isfinite(batch_mean) & torch.isfinite(batch_std)
        batch_mean = torch.where(finite, batch_mean, rm)
        batch_std = torch.where(finite, batch_std, running_std)
        if nonfinite_count is not None:
            nonfinite_count.add_((~finite).any().to(nonfinite_count.dtype))
        # sigma += alpha (sigma_B - sigma) =: sigma + delta, stored as running_var += delta (2 sigma + delta): exact
        # when delta = 0, and no cancellation between sigma^2 and eps for channels whose variance is far below eps
        delta = (batch_std - running_std).mul_(alpha)
        var_step = delta.add(running_std, alpha=2.0).mul_(delta)
        if rm is running_mean:
            running_mean.lerp_(batch_mean, alpha)
            running_var.add_(var_step).clamp_min_(0.0)
        else:
            running_mean.copy_(rm.lerp(batch_mean, alpha))
            running_var.copy_(rv.add(var_step).clamp_min_(0.0))
        return r, d


def _as_scalar_tensor(value: Number) -> Number:
    """A one-element tensor (the layers pass (1,) slices of their schedule buffer) as a 0-dim one, which takes part in
    no type promotion; anything else as it is."""
    return value.reshape(()) if isinstance(value, Tensor) and value.dim() > 0 and value.numel() == 1 else value


def _clip(r_raw: Tensor, d_raw: Tensor, rmax: Number, dmax: Number) -> tuple[Tensor, Tensor]:
    rmax, dmax = (_as_scalar_tensor(v) for v in (rmax, dmax))
    rmin = rmax.reciprocal() if isinstance(rmax, Tensor) else 1.0 / rmax
    return r_raw.clamp(rmin, rmax), d_raw.clamp(-dmax, dmax)
