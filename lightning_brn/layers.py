r"""Batch Renormalization modules, drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

The modules hold state and decide the mode; the maths is in :func:`lightning_brn.functional.batch_renorm`.
Parameters and persistent buffers carry batchnorm's names and meaning (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), so state dicts move between
``torch.nn.BatchNorm2d`` and :class:`BatchRenorm2d` with ``strict=True`` in both directions.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import type_before_parametrizations

from lightning_brn.validation import (
    check_bool,
    check_dmax,
    check_eps,
    check_microbatch_size,
    check_momentum,
    check_rmax,
)
from lightning_brn.functional import batch_renorm
from lightning_brn.routes import shape_only

__all__ = [
    "BatchRenormBase", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormAct2d", "is_batch_renorm",
    "set_renorm_hyperparameters",
]

# torch.fx (and timm's fx feature extraction) records one call per layer instead of tracing into it.
torch.fx.wrap("_traced_batch_renorm")
# one module global (a guard of its own in compiled graphs) rather than the chain torch.compiler.is_compiling
_is_compiling = torch.compiler.is_compiling


def _traced_batch_renorm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    schedule: Tensor,
    eps: float,
    microbatch_size: Optional[int],
    correction_stats: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    nonfinite_count: Optional[Tensor] = None,
) -> Tensor:
    """The call an fx graph (``torch.fx.symbolic_trace``, timm's and torchvision's fx feature extractors) records for
    one layer: :func:`lightning_brn.functional.batch_renorm` with (rmax, dmax, momentum) read from the layer's
    schedule buffer each time the graph runs.

    The graph takes the buffer itself as an argument (a ``get_attr``), not slices of it, which fx would record as
    tensor constants: persistent buffers of the graph's own, so that its state dict would not be the model's. The
    traced module shares the buffer with the layer, so it follows new values assigned to the layer (and
    :func:`set_renorm_hyperparameters` writes it in the graph itself), until the traced module is moved or cast
    (fx's copy of the layer is a plain ``nn.Module``, which copies the buffer, and ``.half()`` rounds it); trace
    again after that."""
    return batch_renorm(
        input, running_mean, running_var, weight, bias, training, schedule[2:3], eps, schedule[0:1], schedule[1:2],
        microbatch_size, correction_stats, num_batches_tracked, nonfinite_count,
    )


# The schedule-controlled hyper-parameters live in one non-persistent float64 buffer ``_schedule`` =
# (rmax, dmax, momentum): assigning a new value is an in-place write, so a compiled graph reads them from one
# graph input (no guard on their values, no recompile), and the state dict stays batchnorm's.
_CORRECTION_FIELDS = ("r_clipped", "d_clipped", "abs_r_minus_1", "abs_d", "count")


def _distributed_initialized() -> bool:
    """Whether a ``torch.distributed`` default process group exists (the layers then share their moving averages)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# (torch.fx.is_fx_tracing is also true under torch.export; older torch has only that one)
_is_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


class BatchRenormBase(nn.Module):
    """Common state and plumbing of the Batch Renorm layers (mirrors ``torch.nn.modules.batchnorm._NormBase``).

    Public so that other modules (the surgery, the synchronized layer) can subclass and type against it; the 1d,
    2d and 3d classes add only their input check. Build those, not this class.
    """

    # Version 2 is batchnorm's buffer layout (with ``num_batches_tracked``); see _load_from_state_dict.
    _version = 2
    __constants__ = ["track_running_stats", "eps", "num_features", "affine"]

    num_features: int
    eps: float
    affine: bool
    track_running_stats: bool
    track_correction: bool
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        rmax: float = 1.0,
        dmax: float = 0.0,
        microbatch_size: Optional[int] = None,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got num_features={num_features!r}")
        eps_v = check_eps(eps)
        momentum_v = check_momentum(momentum)
        rmax_v = check_rmax(rmax)
        dmax_v = check_dmax(dmax)
        mbs = check_microbatch_size(microbatch_size)
        check_bool("affine", affine)
        check_bool("track_running_stats", track_running_stats)
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = eps_v
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.track_correction = False
        self._microbatch_size = mbs
        if self.affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
            self.bias = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(self.num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(self.num_features, **factory_kwargs))
            self.running_mean: Optional[Tensor]
            self.running_var: Optional[Tensor]
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory_kwargs.items() if k != "dtype"}),
            )
            self.num_batches_tracked: Optional[Tensor]
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        # Python mirrors of the buffer: eager forwards read these (no tensor conversions, no device sync).
        self._rmax_value, self._dmax_value, self._momentum_value = rmax_v, dmax_v, momentum_v
        # one (3,) tensor, read in compiled graphs as three one-element slices: not 0-d tensors, which torch.compile
        # turns into symbolic floats guarded in Python on every call, and one graph input instead of three
        self.register_buffer("_schedule", self._schedule_tensor(device), persistent=False)
        self.register_buffer(
            "_correction", torch.zeros(len(_CORRECTION_FIELDS), dtype=torch.float32, device=device), persistent=False
        )
        # training batches whose statistics were not finite in some channel (those channels' averages were held)
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self._nonfinite_reported = 0
        self.reset_parameters()

    @staticmethod
    def _schedule_dtype(device: Optional[Union[torch.device, str]]) -> torch.dtype:
        return torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64

    def _schedule_tensor(self, device: Optional[Union[torch.device, str]]) -> Tensor:
        """(rmax, dmax, momentum) from the Python mirrors, as the ``_schedule`` buffer holds them on ``device``."""
        values = [self._rmax_value, self._dmax_value, self._momentum_value]
        return torch.tensor(values, dtype=self._schedule_dtype(device), device=device)

    # ----------------------------------------------------------------- hyper-parameters
    @property
    def rmax(self) -> float:
        """Upper clip of r (r in [1/rmax, rmax]); assign a float >= 1 at any time."""
        return self._rmax_value

    @rmax.setter
    def rmax(self, value: float) -> None:
        v = check_rmax(value)
        self._schedule[0] = v
        self._rmax_value = v

    @property
    def dmax(self) -> float:
        """Clip of d (d in [-dmax, dmax]); assign a float >= 0 at any time."""
        return self._dmax_value

    @dmax.setter
    def dmax(self, value: float) -> None:
        v = check_dmax(value)
        self._schedule[1] = v
        self._dmax_value = v

    @property
    def momentum(self) -> float:
        """The moving-average rate alpha in [0, 1]; assign at any time."""
        return self._momentum_value

    @momentum.setter
    def momentum(self, value: float) -> None:
        v = check_momentum(value)
        self._schedule[2] = v
        self._momentum_value = v

    @property
    def microbatch_size(self) -> Optional[int]:
        """Examples per independently normalized group in training, or ``None`` (the whole batch)."""
        return self._microbatch_size

    @microbatch_size.setter
    def microbatch_size(self, value: Optional[int]) -> None:
        self._microbatch_size = check_microbatch_size(value)

    def correction_stats(self) -> dict[str, float]:
        """What the correction did in the last training step (needs ``track_correction = True``).

        Returns a dict with the fraction of channels whose r and d hit a clipping bound
        (``r_clipped``, ``d_clipped``), and the mean of |r - 1| and |d| after clipping
        (``abs_r_minus_1``, ``abs_d``), averaged over channels (and microbatch groups).
        """
        vals = self._correction.tolist()
        count = max(vals[4], 1.0)
        return {name: v / count for name, v in zip(_CORRECTION_FIELDS[:4], vals[:4])}

    def correction_record(self) -> Tensor:
        """The on-device record behind :meth:`correction_stats`, as sums: (r clipped, d clipped, sum |r - 1|,
        sum |d|, count) over channels (and groups) of the last training step with ``track_correction = True``.

        The buffer itself (float32, shape (5,)), so that a caller can sum it over layers and read it with one
        device sync; zero it with ``correction_record().zero_()``.
        """
        return self._correction

    def nonfinite_counter(self) -> Tensor:
        """The on-device 0-d int64 counter behind :attr:`nonfinite_batches` (the buffer itself: sum it over layers
        and read it with one device sync)."""
        return self._nonfinite

    @property
    def nonfinite_batches(self) -> int:
        """Training batches so far whose statistics were not finite (``inf`` / ``nan``) in at least one channel.

        Those channels' moving averages were left as they were, so one bad batch (an ``inf`` pixel, an overflow
        under autocast) does not poison r, d and every later step. The first such batch is reported with a
        :class:`RuntimeWarning` (at once on CPU; on other devices, or in compiled graphs, when the layer leaves
        training mode, or by :class:`~lightning_brn.callbacks.BatchRenormScheduler`). Not part of the state dict.
        """
        nonfinite = self._buffers.get("_nonfinite")
        return 0 if nonfinite is None or shape_only(nonfinite) else int(nonfinite.item())

    def report_nonfinite(self) -> int:
        """Warn once if training batches with non-finite statistics were seen since the last report; their count.

        Examples::

            >>> import torch, warnings
            >>> from lightning_brn import BatchRenorm1d
            >>> m = BatchRenorm1d(2)
            >>> with warnings.catch_warnings(record=True) as caught:
            ...     warnings.simplefilter("always")
            ...     _ = m(torch.tensor([[1.0, float("inf")], [2.0, 0.0]]))
            >>> m.nonfinite_batches, m.running_var[1].item(), len(caught)
            (1, 1.0, 1)
        """
        count = self.nonfinite_batches
        if count > self._nonfinite_reported:
            if self._nonfinite_reported == 0:
                warnings.warn(
                    f"{type_before_parametrizations(self).__name__}({self.num_features}): {count} training batch(es) "
                    "had non-finite statistics (inf or nan) in some channels; those channels' moving averages were "
                    "left unchanged, so the model keeps training. Later ones are counted in "
                    "`layer.nonfinite_batches` (and logged as brn/nonfinite_batches by BatchRenormScheduler); check "
                    "the data, the learning rate or the loss scaling",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._nonfinite_reported = count
        return count

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling: say what works instead of failing on a
        # type annotation deep inside (the training step runs custom operators that TorchScript cannot compile)
        raise TypeError(
            f"{type_before_parametrizations(self).__name__} cannot be compiled by torch.jit.script: call "
            "lightning_brn.revert_model(model) first (plain batchnorm holding the learned moving averages, which "
            "scripts, exports and fuses), or use torch.compile / torch.export for the renorm layers themselves"
        )

    def train(self, mode: bool = True) -> "BatchRenormBase":
        if not mode and self.training:
            self.report_nonfinite()  # devices and compiled graphs where the forward does not check each step
        return super().train(mode)

    # ----------------------------------------------------------------- state
    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            assert self.weight is not None and self.bias is not None
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "BatchRenormBase":  # type: ignore[override]
        # ``.half()`` / ``.to(dtype)`` must not round the schedule's values nor the recorded statistics:
        # those buffers follow the module's device but keep their own dtype, converted from the originals.
        keep = {
            "_schedule": (self._buffers["_schedule"], self._schedule_dtype),
            "_correction": (self._buffers["_correction"], lambda device: torch.float32),
        }
        was_meta = self._buffers["_nonfinite"] is not None and self._buffers["_nonfinite"].device.type == "meta"
        super()._apply(fn, recurse)
        nonfinite = self._buffers["_nonfinite"]
        if was_meta and nonfinite is not None and nonfinite.device.type != "meta":
            nonfinite.zero_()  # to_empty from the meta device leaves the counter uninitialized
        for name, (original, want_dtype) in keep.items():
            converted = self._buffers[name]
            assert original is not None and converted is not None
            want = want_dtype(converted.device)
            if converted.dtype != want:
                self._buffers[name] = original.to(device=converted.device, dtype=want)
        # The Python mirrors are the schedule's values: ``to_empty`` (e.g. after building on the meta device)
        # leaves the buffers uninitialized, and compiled graphs read the buffers.
        self.refresh_schedule_buffer()
        return self

    def refresh_schedule_buffer(self) -> None:
        """Writes ``rmax``, ``dmax`` and ``momentum`` into the buffer compiled graphs read them from, for code that
        changed the module's buffers wholesale (``to_empty``, an average of the buffers, ``load_state_dict`` of a
        whole-module copy)."""
        schedule = self._buffers["_schedule"]
        if schedule is not None and schedule.device.type != "meta":
            with torch.no_grad():
                schedule.copy_(self._schedule_tensor(schedule.device))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        buffers = self._buffers
        if "_schedule" not in buffers and "_rmax" in buffers:
            # a whole module pickled by an earlier revision, with three one-element schedule buffers
            old = buffers["_rmax"]
            for name in ("_rmax", "_dmax", "_momentum"):
                buffers.pop(name, None)
                self._non_persistent_buffers_set.discard(name)
            device = None if old is None else old.device
            self.register_buffer("_schedule", self._schedule_tensor(device), persistent=False)
        if "_nonfinite" not in buffers:  # a whole module pickled before the counter existed
            device = buffers["_schedule"].device if buffers.get("_schedule") is not None else None
            self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.__dict__.setdefault("_nonfinite_reported", 0)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # Batchnorm checkpoints from before num_batches_tracked existed (as _NormBase does).
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "track_running_stats={track_running_stats}, rmax={rmax}, dmax={dmax}, "
            "microbatch_size={microbatch_size}".format(
                num_features=self.num_features,
                eps=self.eps,
                momentum=self.momentum,
                affine=self.affine,
                track_running_stats=self.track_running_stats,
                rmax=self.rmax,
                dmax=self.dmax,
                microbatch_size=self.microbatch_size,
            )
        )

    # ----------------------------------------------------------------- forward
    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    #: How the moving averages are shared across processes (:mod:`lightning_brn.distributed`): ``None`` decides at the
    #: first training forward (shared over the default process group when it has several ranks), ``False`` keeps them
    #: local, or a :class:`lightning_brn.distributed.RunningStatsSharing` set by ``share_running_stats``.
    running_stats_sharing: Any = None

    def forward(self, input: Tensor) -> Tensor:
        sharing = self.running_stats_sharing
        if sharing is None and self.training and _distributed_initialized():
            from lightning_brn.distributed import default_running_stats_sharing

            sharing = self.running_stats_sharing = default_running_stats_sharing(self)
        if sharing:  # one process pays for none of this
            return sharing(self, input)
        return self.renorm_forward(input)

    def renorm_forward(self, input: Tensor) -> Tensor:
        """The layer's own forward, without sharing its moving averages with other processes."""
        # compiling first: torch.compile then installs no guards on torch.fx's tracing state
        compiling = _is_compiling()
        tracing = not compiling and _is_fx_symbolic_tracing()
        if not tracing:
            self._check_input(input)
        # As in batchnorm: batch statistics in training, and in eval when there are no running stats.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        # batchnorm's counter, counted by batch_renorm once the input passed its checks (and so recorded in an fx
        # graph's one call); in training only, as batchnorm counts (an eval call with the running statistics removed
        # uses batch statistics but counts nothing). Passed in ordinary eval mode too, where batch_renorm counts
        # nothing: the fx graphs of the two modes then have the same nodes (unless track_correction is on)
        counted = self.track_running_stats and (self.training or not use_batch_stats)
        num_batches_tracked = self.num_batches_tracked if counted else None
        microbatch_size = self._microbatch_size if self.training else None  # microbatches split training batches
        correction = self._correction if (self.track_correction and self.training) else None
        nonfinite = self._nonfinite if (self.training and self.track_running_stats) else None
        running_mean = self.running_mean if pass_running else None
        running_var = self.running_var if pass_running else None
        if tracing:  # the graph reads the schedule buffer when it runs (see _traced_batch_renorm)
            return _traced_batch_renorm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats, self._schedule, self.eps,
                microbatch_size, correction, num_batches_tracked, nonfinite,
            )
        if compiling:
            # tensors: slices of one graph input, so new values never trigger a recompilation
            schedule = self._schedule
            rmax, dmax, momentum = schedule[0:1], schedule[1:2], schedule[2:3]
        else:
            rmax, dmax, momentum = self._rmax_value, self._dmax_value, self._momentum_value
        out = batch_renorm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps, rmax, dmax,
            microbatch_size, correction, num_batches_tracked, nonfinite,
        )
        # the first non-finite batch is reported at once where reading the counter costs no device sync (compiled
        # graphs read nothing here: each Python value read would be a guard)
        if not compiling and nonfinite is not None and self._nonfinite_reported == 0 and nonfinite.device.type == "cpu":
            if not shape_only(nonfinite) and nonfinite.item():
                self.report_nonfinite()
        return out

    def _check_input(self, input: Tensor) -> None:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type_before_parametrizations(self).__name__}({self.num_features}) got input with {input.shape[1]} channels "
                f"(shape {tuple(input.shape)}): expected {self.num_features} channels in dim 1"
            )


class BatchRenorm1d(BatchRenormBase):
    r"""Batch Renormalization over a 2D or 3D input (Ioffe, 2017, https://arxiv.org/abs/1702.03275).

    .. math::
        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d, \qquad y = \gamma \hat x + \beta, \qquad
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\!\left(\tfrac{\sigma_B}{\sigma}\right),\;
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\!\left(\tfrac{\mu_B - \mu}{\sigma}\right)

    in training, with :math:`\sigma_B` including :math:`\epsilon`, r and d constants for autograd and
    the moving averages :math:`\mu, \sigma` updated after r and d are computed; in eval mode it is
    batchnorm's inference with the moving averages. With ``rmax=1, dmax=0`` it is exactly batchnorm.

    Args:
        num_features: number of channels C.
        eps: :math:`\epsilon` inside the square root. Default: 1e-5.
        momentum: the paper's moving-average rate :math:`\alpha` in [0, 1]. Default: 0.01.
        affine: learnable :math:`\gamma, \beta`. Default: ``True``.
        track_running_stats: keep moving averages. Without them there is nothing to renormalize
            against: r = 1, d = 0 and batch statistics are used in training and eval, exactly
            batchnorm with ``track_running_stats=False``. Default: ``True``.
        rmax: clip of r, >= 1; readable and assignable as ``layer.rmax``. Default: 1.0.
        dmax: clip of d, >= 0; readable and assignable as ``layer.dmax``. Default: 0.0.
        microbatch_size: normalize groups of this many consecutive examples separately in
            training (paper section 4.2): each group gets its own statistics, r and d (all from the
            moving averages before the step), and the moving averages then move once towards the
            mean over groups of :math:`\mu_B` and of :math:`\sigma_B`. Eval ignores it.
            Default: ``None`` (the whole batch).

    Running statistics are stored as batchnorm does: ``running_mean`` is :math:`\mu` and
    ``running_var`` is :math:`\sigma^2 - \epsilon`, although the average is taken over :math:`\sigma`.

    Shape:
        - Input: (N, C) or (N, C, L); Output: same shape.

    Examples::

        >>> import torch
        >>> from lightning_brn import BatchRenorm1d
        >>> m = BatchRenorm1d(100, rmax=3.0, dmax=5.0)
        >>> m(torch.randn(20, 100)).shape
        torch.Size([20, 100])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (N, C) or (N, C, L), got {input.dim()}D input of shape {tuple(input.shape)}")


class BatchRenorm2d(BatchRenormBase):
    r"""Batch Renormalization over a 4D input (N, C, H, W) (Ioffe, 2017, https://arxiv.org/abs/1702.03275).

    .. math::
        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d, \qquad y = \gamma \hat x + \beta

    See :class:`BatchRenorm1d` for the definition of r, d and all arguments.

    Shape:
        - Input: (N, C, H, W); Output: same shape and memory format (channels_last is kept).

    Examples::

        >>> import torch
        >>> from lightning_brn import BatchRenorm2d
        >>> m = BatchRenorm2d(16, rmax=3.0, dmax=5.0, microbatch_size=4)
        >>> y = m(torch.randn(8, 16, 10, 10))
        >>> m.rmax = 1.5  # takes effect at the next forward
        >>> m.eval()(torch.randn(2, 16, 10, 10)).shape
        torch.Size([2, 16, 10, 10])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (N, C, H, W), got {input.dim()}D input of shape {tuple(input.shape)}")


class BatchRenorm3d(BatchRenormBase):
    r"""Batch Renormalization over a 5D input (N, C, D, H, W) (Ioffe, 2017, https://arxiv.org/abs/1702.03275).

    See :class:`BatchRenorm1d` for the maths and the arguments.

    Shape:
        - Input: (N, C, D, H, W); Output: same shape.

    Examples::

        >>> import torch
        >>> from lightning_brn import BatchRenorm3d
        >>> BatchRenorm3d(4)(torch.randn(2, 4, 3, 5, 5)).shape
        torch.Size([2, 4, 3, 5, 5])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (N, C, D, H, W), got {input.dim()}D input of shape {tuple(input.shape)}")


class BatchRenormAct2d(BatchRenorm2d):
    r"""Batch Renorm + dropout/activation: the counterpart of timm's ``BatchNormAct2d``.

    Same ``drop`` and ``act`` children and constructor options as ``timm.layers.BatchNormAct2d``,
    so :func:`lightning_brn.convert_model` keeps a timm model's fused activations. The renorm
    options (``rmax``, ``dmax``, ``microbatch_size``) are keyword-only.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as :class:`BatchRenorm2d`.
        apply_act: apply the activation. Default: ``True``.
        act_layer: activation class, instance factory or timm name. Default: ``nn.ReLU``.
        act_kwargs: extra keyword arguments of the activation.
        inplace: in-place activation. Default: ``True``.
        drop_layer: class of a dropout-like layer applied before the activation, or ``None``.

    Examples::

        >>> import torch
        >>> from lightning_brn import BatchRenormAct2d
        >>> m = BatchRenormAct2d(8, act_layer="silu", rmax=2.0)
        >>> m.act
        SiLU(inplace=True)
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        act_kwargs: Optional[dict[str, Any]] = None,
        inplace: bool = True,
        drop_layer: Optional[type[nn.Module]] = None,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        rmax: float = 1.0,
        dmax: float = 0.0,
        microbatch_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            rmax=rmax,
            dmax=dmax,
            microbatch_size=microbatch_size,
            device=device,
            dtype=dtype,
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act: Optional[nn.Module] = None
        if apply_act:
            from timm.layers import create_act_layer

            kwargs = dict(act_kwargs or {})
            kwargs.setdefault("inplace", inplace)
            act = create_act_layer(act_layer, **kwargs)
        self.act = nn.Identity() if act is None else act

    def forward(self, input: Tensor) -> Tensor:
        x = super().forward(input)
        x = self.drop(x)
        x = self.act(x)
        return x


def is_batch_renorm(module: nn.Module) -> bool:
    """``True`` for any Batch Renorm layer of this package (1d, 2d, 3d, Act2d)."""
    return isinstance(module, BatchRenormBase)


def set_renorm_hyperparameters(model: nn.Module, rmax: float, dmax: float, momentum: float) -> int:
    """Sets ``rmax``, ``dmax`` and ``momentum`` of every Batch Renorm layer of ``model``; returns how many were set.

    The one place where these values are written (:meth:`lightning_brn.RenormSchedule.apply` and
    :class:`~lightning_brn.callbacks.BatchRenormScheduler` call it). Also reaches the renorm calls that an fx graph
    recorded (``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor``, timm's fx feature
    extraction): such a graph holds plain modules in place of the layers, and reads the values from the schedule
    buffer it took from them, which is written here. Values are checked before anything is written.

    Examples::

        >>> import torch
        >>> from torchvision.models.feature_extraction import create_feature_extractor
        >>> from lightning_brn import BatchRenorm2d, set_renorm_hyperparameters
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchRenorm2d(4))
        >>> extractor = create_feature_extractor(model, {"1": "out"})
        >>> set_renorm_hyperparameters(extractor, rmax=2.0, dmax=1.0, momentum=0.1)
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    values = (check_rmax(rmax), check_dmax(dmax), check_momentum(momentum))
    count = 0
    for module in model.modules():
        if isinstance(module, BatchRenormBase):
            module.rmax, module.dmax, module.momentum = values
            count += 1
        elif isinstance(module, torch.fx.GraphModule):
            for buffer in _traced_schedule_buffers(module):
                with torch.no_grad():
                    buffer.copy_(torch.tensor(values, dtype=buffer.dtype))
                count += 1
    return count


def _traced_schedule_buffers(graph_module: torch.fx.GraphModule) -> list[Tensor]:
    """The schedule buffers read by the renorm calls an fx graph recorded (one per call, shared ones once)."""
    found: dict[int, Tensor] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is not _traced_batch_renorm:
            continue
        schedule = node.args[6] if len(node.args) > 6 else node.kwargs.get("schedule")
        if isinstance(schedule, torch.fx.Node) and schedule.op == "get_attr":
            owner, _, name = str(schedule.target).rpartition(".")
            tensor = getattr(graph_module.get_submodule(owner) if owner else graph_module, name)
            if isinstance(tensor, Tensor):
                found.setdefault(id(tensor), tensor)
    return list(found.values())
