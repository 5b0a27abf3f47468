r"""Batch Renorm on many processes: moving averages shared by every rank, and a synchronized Batch Renorm.

The paper trained on 50 synchronized workers whose moving averages every worker's batch updated, while each worker
normalized its own minibatch (so r and d were per worker). The modes (``docs/distributed.md`` has the details):

- **shared averages** (default): each rank normalizes its own batch (or its microbatch groups), r and d per rank; the
  averages move towards the mean over ranks (and groups) of mu_B and sigma_B and are identical on every rank. Cost:
  one asynchronous all-reduce per step and process group of sum(2C + 1) values over the layers (about 53k floats
  for a ResNet-50), launched when the backward starts and waited for after the optimizer step.
- :class:`SyncBatchRenorm` (opt in: the class, :func:`convert_sync_batch_renorm`, ``convert_model(model, sync=True)``,
  or ``Trainer(sync_batchnorm=True)`` / :class:`~lightning_brn.plugins.RenormLayerSync` under Lightning): statistics
  of the whole process group's batch (one all-reduce of 2C + 1 values per layer in the forward, one of 2C in the
  backward, synchronous as in ``SyncBatchNorm``); r and d the same on every rank. Over a subgroup (the paper's microbatches spread over devices), the averages are shared as above.
- local (``share_running_stats(model, enabled=False)``): per-rank averages, which diverge; no collective.

**Shared averages** need no code: a Batch Renorm layer's first training forward in a process whose default process
group (``torch.distributed``) has several ranks attaches a :class:`RunningStatsSharing` to it (the layer's
``running_stats_sharing``). Each training forward then runs the layer's own step (r and d from the shared averages,
then this rank's update) and joins the step's bucket; the backward reaching any renorm output packs w * mu,
w * sigma and w of every layer in the bucket (w: the number of groups the batch normalized, 1 without microbatches)
into one flat buffer and launches one all-reduce of it; the weighted means are written into every layer's buffers
after the optimizer step, or earlier before a layer's next forward or its state dict. The averages are therefore identical on every rank after every step, and a rank-0
checkpoint holds what all ranks saw. The update is affine in (mu_B, sigma_B): averaging the ranks' updated
averages, from the same starting averages, is the update with the mean over ranks, exactly as one process
normalizing the ranks' batches as microbatches (``microbatch_size`` = per-rank batch). Under ``no_sync`` (gradient
accumulation) every forward still moves the averages, as in one process, and every forward is shared (one
all-reduce per micro-step). Eval forwards issue none. :func:`share_running_stats` chooses another process group
(say, the data-parallel dimension of a device mesh), and keeps the renorm buffers out of
``DistributedDataParallel``'s rank-0 broadcast (call it before wrapping the model). Under ``torch.compile`` each
layer's all-reduce is a functional collective in the graph, waited for in the same graph.

Every rank must run every layer's training forward the same number of times, as with ``SyncBatchNorm``.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_brn.algorithm import renorm_step
from lightning_brn.validation import check_eps
from lightning_brn.layers import BatchRenormBase, is_batch_renorm
from lightning_brn.routes import stat_dtype

__all__ = [
    "RunningStatsSharing",
    "SyncBatchRenorm",
    "SyncBatchRenormAct",
    "convert_sync_batch_renorm",
    "default_running_stats_sharing",
    "renorm_buffer_names",
    "revert_sync_batch_renorm",
    "share_running_stats",
    "wait_running_stats",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup (or None: the default group)

# buckets with an all-reduce to launch or to complete, completed by the optimizer step post-hook
_in_flight: "weakref.WeakSet[_Bucket]" = weakref.WeakSet()
# the bucket that training forwards add to, per (process group, device, dtype)
_open: dict[tuple[int, torch.device, torch.dtype], "_Bucket"] = {}
_step_hooks: Optional[Any] = None


def _none() -> None:
    return None


def _world_size(group: ProcessGroup) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _launch_in_flight(*_: Any, **__: Any) -> None:
    for bucket in list(_in_flight):
        bucket.launch()


def _complete_in_flight(*_: Any, **__: Any) -> None:
    for bucket in list(_in_flight):
        bucket.wait()


def _ensure_step_hook() -> None:
    global _step_hooks
    if _step_hooks is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _step_hooks = (
            register_optimizer_step_pre_hook(_launch_in_flight),
            register_optimizer_step_post_hook(_complete_in_flight),
        )


class _Bucket:
    """The averages of the training forwards of one step, one process group, device and dtype: one flat all-reduce.

    Launched once, at the first of: the backward reaching a layer's output (a tensor hook), an optimizer step, or a
    wait (the next forward of one of its layers, its state dict). The flat buffer is packed at launch and written
    back at the wait in a few operations over all the layers' channels at once; until the launch no layer's
    averages change (a layer's next forward and its state dict wait first)."""

    def __init__(self, group: ProcessGroup, key: tuple[int, torch.device, torch.dtype]) -> None:
        self.group, self.key = group, key
        self.entries: list[tuple[BatchRenormBase, int]] = []  # (layer, number of groups its batch normalized)
        self.flat: Optional[Tensor] = None
        self.old: Optional[tuple[Tensor, Tensor]] = None  # the averages at launch
        self.eps_index: Optional[tuple[Union[float, Tensor], Optional[Tensor]]] = None  # eps and index of the layout
        self.work: Optional[Any] = None
        self.done = False

    def add(self, layer: BatchRenormBase, groups: int) -> None:
        self.entries.append((layer, groups))
        _in_flight.add(self)

    def launch(self, *_: Any) -> None:
        if self.work is not None:
            return
        if _open.get(self.key) is self:
            del _open[self.key]  # later forwards start a new bucket
        layers = [layer for layer, _ in self.entries]
        dtype = self.key[2]
        mean = _cat([layer.running_mean for layer in layers], dtype)
        var = _cat([layer.running_var for layer in layers], dtype)
        eps, w, weights, index = _layout(self.entries, mean.device, dtype)
        self.old, self.eps_index = (mean, var), (eps, index)
        self.flat = _pack(mean, var, eps, w, weights)
        self.work = dist.all_reduce(self.flat, group=self.group, async_op=True)

    def wait(self) -> None:
        if self.done:
            return
        self.launch()
        assert self.work is not None and self.flat is not None and self.old is not None and self.eps_index is not None
        self.work.wait()
        self.done = True
        _in_flight.discard(self)
        mean, var = _unpack(self.flat, *self.eps_index, *self.old)
        sizes = [layer.num_features for layer, _ in self.entries]
        with torch.no_grad():
            for (layer, _), m, v in zip(self.entries, mean.split(sizes), var.split(sizes)):
                layer.running_mean.copy_(m)  # type: ignore[union-attr]
                layer.running_var.copy_(v)  # type: ignore[union-attr]
        self.entries, self.flat, self.old, self.eps_index = [], None, None, None


def _cat(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    with torch.no_grad():
        if len(tensors) == 1:
            return tensors[0].to(dtype, copy=True)
        return torch.cat([t if t.dtype == dtype else t.to(dtype) for t in tensors])


def _pack(mean: Tensor, var: Tensor, eps: Union[float, Tensor], w: Union[float, Tensor], weights: Tensor) -> Tensor:
    """The all-reduced buffer: w * mu and w * sigma per channel (sigma with eps inside, as the layer tracks it),
    then the weights w (one per layer: the number of groups its batch normalized, 0 for an empty batch)."""
    with torch.no_grad():
        sigma = var.add(eps).sqrt_()
        if isinstance(w, Tensor) or w != 1:
            mean, sigma = mean * w, sigma.mul_(w)
        return torch.cat([mean, sigma, weights])


def _unpack(
    flat: Tensor, eps: Union[float, Tensor], index: Optional[Tensor], old_mean: Tensor, old_var: Tensor
) -> tuple[Tensor, Tensor]:
    """mu = sum(w mu) / W and running_var = (sum(w sigma) / W)^2 - eps per channel (W: its layer's sum of weights,
    ``flat[2S:][index]``); the old averages where no rank normalized anything (W = 0)."""
    with torch.no_grad():
        s = old_mean.numel()
        total = flat[2 * s :]
        if index is not None:
            total = total[index]
        keep = total > 0
        total = total.clamp_min(1.0)  # sums of integer counts
        mean = flat[:s] / total
        var = (flat[s : 2 * s] / total).square_().sub_(eps).clamp_min_(0.0)
        return torch.where(keep, mean, old_mean), torch.where(keep, var, old_var)


# per-channel eps and weights of a bucket's layers, kept per (device, dtype, layers' sizes, eps and groups)
_layouts: dict[tuple[Any, ...], tuple[Union[float, Tensor], Union[float, Tensor], Tensor, Optional[Tensor]]] = {}


def _layout(
    entries: list[tuple[BatchRenormBase, int]], device: torch.device, dtype: torch.dtype
) -> tuple[Union[float, Tensor], Union[float, Tensor], Tensor, Optional[Tensor]]:
    """(eps, w, weights, index): eps and w per channel (a number when every layer has the same), the weight of each
    layer, and each channel's layer (``None`` for one layer)."""
    spec = tuple((layer.num_features, float(layer.eps), groups) for layer, groups in entries)
    key = (device, dtype, spec)
    found = _layouts.get(key)
    if found is not None:
        return found
    sizes = torch.tensor([c for c, _, _ in spec])
    as_channels = lambda values: torch.tensor(values, dtype=dtype).repeat_interleave(sizes).to(device)
    eps_values, groups = [e for _, e, _ in spec], [g for _, _, g in spec]
    eps = eps_values[0] if len(set(eps_values)) == 1 else as_channels(eps_values)
    w = float(groups[0]) if len(set(groups)) == 1 else as_channels(groups)
    weights = torch.tensor(groups, dtype=dtype).to(device)
    index = None if len(spec) == 1 else torch.arange(len(spec)).repeat_interleave(sizes).to(device)
    if len(_layouts) >= 64:  # a few per model and step shape; never grows without bound
        _layouts.clear()
    found = _layouts[key] = (eps, w, weights, index)
    return found


def _open_bucket(group: ProcessGroup, layer: BatchRenormBase) -> _Bucket:
    key = (id(group), layer.running_mean.device, _flat_dtype(layer))  # type: ignore[union-attr]
    bucket = _open.get(key)
    if bucket is None:
        bucket = _open[key] = _Bucket(group, key)
    return bucket


def _flat_dtype(layer: BatchRenormBase) -> torch.dtype:
    return torch.promote_types(layer.running_mean.dtype, torch.float32)  # type: ignore[union-attr]


def _groups(layer: BatchRenormBase, input: Tensor) -> int:
    """The number of groups the batch normalized: ``N / microbatch_size``, 1 without microbatches, 0 when empty."""
    mbs = layer.microbatch_size
    return 0 if input.numel() == 0 else (input.shape[0] // mbs if mbs else 1)


class RunningStatsSharing:
    r"""Shares one Batch Renorm layer's moving-average updates with the other ranks of a process group.

    Called as the layer's forward (the layer's ``running_stats_sharing``). In training with running statistics the
    layer's own forward updates its averages from this rank's batch; then :math:`w\mu` and :math:`w\sigma` per
    channel, with w the number of groups the batch normalized, and w (2C + 1 values) join the step's one
    asynchronous all-reduce over the process group (with every other layer's; launched when the backward starts).
    :meth:`wait` writes back :math:`\bar\mu = \sum w\mu / \sum w` and
    :math:`\bar\sigma^2 - \epsilon`; it runs before the next forward, before the layer's state dict is saved or
    loaded, and after every optimizer step. Since the update is affine in (mu_B, sigma_B), the mean of the ranks'
    updated averages is the update with the mean of their batch statistics; ranks that started from different
    averages (rank-local averages loaded into a run) end up with the same ones after one step.

    Args:
        process_group: the ranks that share the averages; ``None``: the default (world) group.
    """

    def __init__(self, process_group: ProcessGroup = None) -> None:
        self.process_group = process_group
        self._bucket: Optional[_Bucket] = None

    # not copied (deepcopy of a model, e.g. for an EMA copy) nor pickled: the copy decides again at its first forward
    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> Any:
        return (_none, ())

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"RunningStatsSharing(process_group={self.process_group!r})"

    @property
    def pending(self) -> bool:
        """Whether an all-reduce of this layer's last update is still to be written into its buffers."""
        return self._bucket is not None and not self._bucket.done

    def attach(self, layer: BatchRenormBase) -> "RunningStatsSharing":
        """Makes this the sharing of ``layer``; its state dict is then saved and loaded with the update written."""
        layer.running_stats_sharing = self
        if _wait_hook not in layer._state_dict_pre_hooks.values():
            layer.register_state_dict_pre_hook(_wait_hook)
            layer.register_load_state_dict_pre_hook(_wait_hook)
        _ensure_step_hook()
        return self

    def __call__(self, layer: BatchRenormBase, input: Tensor) -> Tensor:
        self.wait()
        if not (layer.training and layer.track_running_stats and layer.running_mean is not None and dist.is_initialized()):
            return layer.renorm_forward(input)
        if torch.compiler.is_compiling():
            return self._compiled_forward(layer, input)
        if torch.fx._symbolic_trace.is_fx_tracing():  # an fx graph records the layer's own call
            return layer.renorm_forward(input)
        out = layer.renorm_forward(input)
        bucket = self._bucket = _open_bucket(self.process_group, layer)
        bucket.add(layer, _groups(layer, input))
        if isinstance(out, Tensor) and out.requires_grad:
            out.register_hook(bucket.launch)  # the backward starts: every layer's forward of this step is in
        else:
            bucket.launch()  # no backward will come: launched here, by every rank alike
        return out

    def wait(self) -> None:
        """Writes the all-reduced averages of the last training forward into the layer's buffers (if in flight),
        with those of every layer whose forward went into the same all-reduce (launched now if it was not yet)."""
        bucket, self._bucket = self._bucket, None
        if bucket is not None:
            bucket.wait()

    def _compiled_forward(self, layer: BatchRenormBase, input: Tensor) -> Tensor:
        """The same in a compiled graph: a functional all-reduce, waited for in the graph (the graph stays whole)."""
        from torch.distributed import _functional_collectives as funcol

        out = layer.renorm_forward(input)
        rm, rv = layer.running_mean, layer.running_var
        assert rm is not None and rv is not None
        groups = _groups(layer, input)
        dtype = _flat_dtype(layer)
        mean, var = rm.to(dtype), rv.to(dtype)
        flat = _pack(mean, var, layer.eps, float(groups), torch.full((1,), float(groups), dtype=dtype, device=rm.device))
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        reduced = funcol.wait_tensor(funcol.all_reduce(flat, "sum", group))
        mean, var = _unpack(reduced, layer.eps, None, mean, var)
        with torch.no_grad():
            rm.copy_(mean)
            rv.copy_(var)
        return out


def _wait_hook(module: nn.Module, *args: Any) -> None:
    """State-dict (save and load) pre-hook of a layer with shared averages: the update in flight is written first."""
    sharing = getattr(module, "running_stats_sharing", None)
    if isinstance(sharing, RunningStatsSharing):
        sharing.wait()


def default_running_stats_sharing(layer: nn.Module) -> Union[RunningStatsSharing, bool]:
    """What a Batch Renorm layer shares at its first training forward under ``torch.distributed``: the default process
    group when it has several ranks, else nothing (``False``, decided once). A :class:`SyncBatchRenorm` over the whole
    default group needs nothing shared (its statistics, hence its averages, are the same on every rank); over a
    subgroup its averages are shared over the default group."""
    if _world_size(None) <= 1:
        return False
    if isinstance(layer, SyncBatchRenorm) and _world_size(layer.process_group) == _world_size(None):
        return False
    return RunningStatsSharing(None).attach(layer)  # type: ignore[arg-type]


def renorm_buffer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every buffer of the Batch Renorm layers of ``model`` (persistent or not)."""
    names = []
    for prefix, module in model.named_modules():
        if is_batch_renorm(module):
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None:
                    names.append(f"{prefix}.{name}" if prefix else name)
    return names


def share_running_stats(
    model: nn.Module, process_group: ProcessGroup = None, *, enabled: bool = True, ddp: bool = True
) -> nn.Module:
    r"""Shares the moving averages of every Batch Renorm layer of ``model`` over ``process_group``.

    Without this call the layers share them over the default process group anyway (see the module docstring); call
    it to choose another group, to turn sharing off (``enabled=False``: per-rank averages, which diverge), or to keep
    the renorm buffers out of ``DistributedDataParallel``'s rank-0 buffer broadcast (``ddp=True``: call it on the
    module you then wrap, before wrapping). The broadcast would otherwise copy rank 0's averages, before they are
    shared, into every rank at the start of each forward; the shared result overwrites them, so the averages stay
    right, but the broadcast costs a collective per forward for nothing. Buffers of other layers stay in it.

    Args:
        model: the module (the one ``DistributedDataParallel`` will wrap, for ``ddp=True``).
        process_group: the ranks sharing the averages (e.g. the data-parallel ranks); ``None``: the default group.
        enabled: share (``True``) or keep per-rank averages (``False``). Default: ``True``.
        ddp: add the renorm buffers to the names ``DistributedDataParallel`` ignores. Default: ``True``.

    Returns:
        ``model``.

    Examples::

        >>> import torch
        >>> from lightning_brn import BatchRenorm2d
        >>> from lightning_brn.distributed import share_running_stats
        >>> model = share_running_stats(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchRenorm2d(4)))
        >>> model._ddp_params_and_buffers_to_ignore[:3]
        ['1.running_mean', '1.running_var', '1.num_batches_tracked']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"share_running_stats expects a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("enabled", enabled), ("ddp", ddp)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {name}={flag!r}")
    layers = [m for m in model.modules() if is_batch_renorm(m)]
    for layer in layers:
        old = layer.running_stats_sharing
        if isinstance(old, RunningStatsSharing):
            old.wait()
        if isinstance(layer, SyncBatchRenorm) and not enabled and layer._is_subgroup():
            raise ValueError(
                "share_running_stats(enabled=False) on a SyncBatchRenorm over a process subgroup: its moving averages "
                "move with its subgroup's statistics and would differ between subgroups; keep them shared"
            )
        if not enabled:
            layer.running_stats_sharing = False
        elif isinstance(layer, SyncBatchRenorm) and not layer._is_subgroup() and process_group is None:
            layer.running_stats_sharing = None  # decided at the first forward (nothing to share over the world)
        else:
            RunningStatsSharing(process_group).attach(layer)
    if ddp:
        ignore = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
        ignore += [n for n in renorm_buffer_names(model) if n not in ignore]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return model


def wait_running_stats(model: nn.Module) -> None:
    """Writes every in-flight shared update of ``model``'s Batch Renorm layers into their buffers (no collective:
    every rank launches the same all-reduces). Runs by itself after every ``optimizer.step()``; call it after
    a forward that no optimizer step follows, before reading ``running_mean`` / ``running_var`` directly."""
    for m in model.modules():
        sharing = getattr(m, "running_stats_sharing", None) if is_batch_renorm(m) else None
        if isinstance(sharing, RunningStatsSharing):
            sharing.wait()


# --------------------------------------------------------------------------------------------- SyncBatchRenorm
class _SyncRenormFn(torch.autograd.Function):
    """Training step of :class:`SyncBatchRenorm`: statistics over the process group, r and d from the averages,
    eval-mode batchnorm of the group's statistics with weight ``gamma * r`` and bias ``beta + gamma * d``; the
    backward is batchnorm's synchronized backward (sums of ``dy`` and ``dy * (x - mu_B)`` all-reduced) with that
    weight."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        rmax: float,
        dmax: float,
        momentum: float,
        eps: float,
        group: ProcessGroup,
        correction: Optional[Tensor],
        nonfinite: Optional[Tensor] = None,
    ) -> Tensor:
        c = x.shape[1]
        sd = stat_dtype(x)
        dims = [0] + list(range(2, x.dim()))
        n_local = x.numel() // c
        xs = x.detach().to(sd)
        if n_local > 0:
            var_l, mean_l = torch.var_mean(xs, dim=dims, correction=0)
        else:
            var_l = mean_l = torch.zeros(c, dtype=sd, device=x.device)
        # shifted by the moving mean (the same on every rank): count, sum and sum of squares merge without
        # the cancellation of raw sums, and one all-reduce carries them
        shift = running_mean.detach().to(sd) if running_mean is not None else torch.zeros_like(mean_l)
        dev = mean_l - shift
        flat = torch.cat([dev * n_local, (var_l + dev * dev) * n_local, mean_l.new_full((1,), float(n_local))])
        dist.all_reduce(flat, group=group)
        count = flat[2 * c :]
        if not x.is_cuda and float(count.item()) <= 1:  # (no device sync for the check on GPUs)
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count.item())} over the group")
        s1 = flat[:c] / count
        mean = shift + s1
        var = (flat[c : 2 * c] / count - s1 * s1).clamp_min_(0.0)
        std = (var + eps).sqrt()
        if running_mean is not None and running_var is not None:
            r, d = renorm_step(mean, std, running_mean, running_var, rmax, dmax, momentum, eps, correction, nonfinite)
        else:
            r, d = torch.ones_like(mean), torch.zeros_like(mean)
        w = weight.detach().to(sd) if weight is not None else None
        w_eff = r if w is None else w * r
        b_eff = d if w is None else w * d
        if bias is not None:
            b_eff = b_eff + bias.detach().to(sd)
        invstd = std.reciprocal()
        shape = (1, c) + (1,) * (x.dim() - 2)
        out = ((xs - mean.view(shape)) * (w_eff * invstd).view(shape) + b_eff.view(shape)).to(x.dtype)
        ctx.save_for_backward(x, w_eff, mean, invstd, r, d)
        ctx.group, ctx.has_weight, ctx.weight_dtype = group, weight is not None, None if weight is None else weight.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        x, w_eff, mean, invstd, r, d = ctx.saved_tensors
        c = x.shape[1]
        sd = mean.dtype
        dims = [0] + list(range(2, x.dim()))
        shape = (1, c) + (1,) * (x.dim() - 2)
        dy = grad_out.to(sd)
        xmu = x.to(sd) - mean.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * xmu).sum(dims)
        n_local = x.numel() // c
        flat = torch.cat([sum_dy, sum_dy_xmu, sum_dy.new_full((1,), float(n_local))])
        dist.all_reduce(flat, group=ctx.group)
        total = flat[2 * c :]
        mean_dy = flat[:c] / total
        mean_dy_xmu = flat[c : 2 * c] / total
        grad_x = (dy - mean_dy.view(shape) - xmu * (invstd * invstd * mean_dy_xmu).view(shape)) * (w_eff * invstd).view(shape)
        # this rank's share of the parameter gradients (the data-parallel wrapper averages them, as for SyncBatchNorm)
        grad_w_eff = sum_dy_xmu * invstd
        grad_weight = (grad_w_eff * r + sum_dy * d).to(ctx.weight_dtype) if ctx.has_weight else None
        grad_bias = sum_dy.to(ctx.weight_dtype) if ctx.weight_dtype is not None else None
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


class SyncBatchRenorm(BatchRenormBase):
    r"""Batch Renorm with batch statistics over a process group, the counterpart of ``torch.nn.SyncBatchNorm``.

    In training, :math:`\mu_B` and :math:`\sigma_B` are those of the batches of every rank of ``process_group``
    together (count, sum and sum of squares, shifted by the moving mean, all-reduced in the forward); r and d come
    from the moving averages, which are therefore the same on every rank of the group; the backward is batchnorm's
    synchronized backward with weight :math:`\gamma r`. With ``process_group`` a subgroup (the paper's microbatches
    spread over devices: each subgroup normalizes its own examples) the averages are shared over the default group
    (:class:`RunningStatsSharing`), so they move towards the mean over subgroups. Outside ``torch.distributed``
    (or with one rank) it is :class:`~lightning_brn.BatchRenorm2d`'s training step on the local batch; in eval
    mode it is batchnorm's inference. Accepts inputs (N, C, \*) of any rank, as ``SyncBatchNorm``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, rmax, dmax, device, dtype: as
            :class:`~lightning_brn.BatchRenorm2d`.
        process_group: the ranks whose batches are normalized together; ``None``: the default (world) group.

    ``microbatch_size`` is refused: microbatches split one device's batch, a synchronized layer joins several.

    Shape:
        - Input: (N, C, \*); Output: same shape.

    Examples::

        >>> import torch
        >>> from lightning_brn.distributed import SyncBatchRenorm
        >>> SyncBatchRenorm(4, rmax=2.0)(torch.randn(8, 4, 3, 3)).shape  # one process: the local batch
        torch.Size([8, 4, 3, 3])
    """

    #: The per-device class this layer was converted from (:func:`convert_sync_batch_renorm`,
    #: ``convert_model(..., sync=True)``), which :func:`revert_sync_batch_renorm` gives back; ``None`` for a layer
    #: built as such.
    local_class: Optional[type[BatchRenormBase]] = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        rmax: float = 1.0,
        dmax: float = 0.0,
        process_group: ProcessGroup = None,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        microbatch_size: Optional[int] = None,
    ) -> None:
        if microbatch_size is not None:
            raise ValueError(
                f"SyncBatchRenorm does not take microbatch_size (got {microbatch_size}): microbatches split one "
                "device's batch, while a synchronized layer normalizes the batches of a process group together; for "
                "microbatches spread over devices pass a process subgroup per microbatch as process_group"
            )
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
            rmax=rmax, dmax=dmax, device=device, dtype=dtype,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D input of shape {tuple(input.shape)}")

    @property  # type: ignore[override]
    def microbatch_size(self) -> Optional[int]:
        """Always ``None``: see the class docstring."""
        return None

    @microbatch_size.setter
    def microbatch_size(self, value: Optional[int]) -> None:
        if value is not None:
            raise ValueError(f"SyncBatchRenorm does not take microbatch_size, got microbatch_size={value}")

    def _is_subgroup(self) -> bool:
        return self.process_group is not None and _world_size(self.process_group) != _world_size(None)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", microbatch_size=None", "") + f", process_group={self.process_group!r}"

    def renorm_forward(self, input: Tensor) -> Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or _world_size(self.process_group) <= 1:
            return super().renorm_forward(input)
        self._check_input(input)
        if dist.get_rank(self.process_group) < 0:
            raise ValueError(f"SyncBatchRenorm: this rank ({dist.get_rank()}) is not in its process_group")
        if torch.compiler.is_compiling():
            raise RuntimeError("SyncBatchRenorm is eager-only: compile the model without it (or use shared averages)")
        check_eps(self.eps)
        tracked = self.track_running_stats and self.running_mean is not None
        if tracked:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
        correction = self.correction_record() if self.track_correction else None
        return _SyncRenormFn.apply(
            input, self.weight, self.bias, self.running_mean if tracked else None,
            self.running_var if tracked else None, self.rmax, self.dmax, self.momentum, self.eps,
            self.process_group, correction, self.nonfinite_counter() if tracked else None,
        )


class SyncBatchRenormAct(SyncBatchRenorm):
    """:class:`SyncBatchRenorm` followed by ``drop`` and ``act`` children: what :func:`convert_sync_batch_renorm`
    makes of a :class:`~lightning_brn.BatchRenormAct2d` (timm's ``BatchNormAct2d`` converted), with its children."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


# --------------------------------------------------------------------------------------------- surgery


def convert_sync_batch_renorm(model: nn.Module, process_group: ProcessGroup = None) -> nn.Module:
    """Replaces every Batch Renorm layer of ``model`` by a :class:`SyncBatchRenorm` over ``process_group``, with the
    same Parameter objects, buffers, hooks and hyper-parameters (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    does for batchnorm; batchnorm layers are left alone; a :class:`~lightning_brn.BatchRenormAct2d` becomes a
    :class:`SyncBatchRenormAct` with the same ``act`` and ``drop``). Layers with ``microbatch_size`` are refused.
    :func:`revert_sync_batch_renorm` undoes it. Returns the converted model (the root itself may be replaced).

    Examples::

        >>> import torch
        >>> from lightning_brn import BatchRenorm2d
        >>> from lightning_brn.distributed import convert_sync_batch_renorm, revert_sync_batch_renorm
        >>> model = convert_sync_batch_renorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchRenorm2d(4, rmax=2.0)))
        >>> type(model[1]).__name__, model[1].rmax
        ('SyncBatchRenorm', 2.0)
        >>> type(revert_sync_batch_renorm(model)[1]).__name__
        'BatchRenorm2d'
    """
    for name, m in model.named_modules():
        if is_batch_renorm(m) and not isinstance(m, SyncBatchRenorm) and m.microbatch_size is not None:
            raise ValueError(
                f"convert_sync_batch_renorm: layer {name or '<root>'!r} normalizes microbatches of "
                f"{m.microbatch_size}; a synchronized layer normalizes the process group's batches together. Set its "
                "microbatch_size to None, or use process subgroups (process_group=) for microbatches across devices"
            )
    return _swap(model, lambda m: _to_sync(m, process_group) if is_batch_renorm(m) and not isinstance(m, SyncBatchRenorm) else None)


def revert_sync_batch_renorm(model: nn.Module) -> nn.Module:
    """Turns every :class:`SyncBatchRenorm` of ``model`` back into the class it was converted from (``BatchRenorm2d``
    for one built directly), with the same Parameters, buffers and hooks. Returns the model."""
    return _swap(model, lambda m: _to_local(m) if isinstance(m, SyncBatchRenorm) else None)


def _swap(module: nn.Module, replace: Any) -> nn.Module:
    new = replace(module)
    out = module if new is None else new
    for name, child in module.named_children():
        out.add_module(name, _swap(child, replace))
    return out


def _move(src: nn.Module, dst: nn.Module) -> None:
    """Hands ``src``'s parameters, buffers (all of them, the schedule's included), flags and hooks to ``dst``."""
    for k, p in src._parameters.items():
        dst._parameters[k] = p
    for k, b in src._buffers.items():
        dst._buffers[k] = b
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    for k, v in vars(src).items():
        if k.endswith("hooks") or k in ("_is_full_backward_hook", "training", "qconfig"):
            setattr(dst, k, v)
    for k in ("affine", "track_running_stats", "track_correction", "_bn_source", "_bn_momentum"):
        if k in vars(src):
            setattr(dst, k, getattr(src, k))
    for k in ("_rmax_value", "_dmax_value", "_momentum_value"):
        setattr(dst, k, getattr(src, k))
    if "running_stats_sharing" in vars(src):
        dst.running_stats_sharing = src.running_stats_sharing
        if isinstance(src.running_stats_sharing, RunningStatsSharing):
            src.running_stats_sharing.wait()


def _to_sync(m: BatchRenormBase, process_group: ProcessGroup) -> SyncBatchRenorm:
    fused = isinstance(getattr(m, "act", None), nn.Module) and isinstance(getattr(m, "drop", None), nn.Module)
    cls = SyncBatchRenormAct if fused else SyncBatchRenorm  # (the act and drop children are re-attached by _swap)
    new = cls(m.num_features, eps=m.eps, affine=False, track_running_stats=False, process_group=process_group)
    _move(m, new)
    if new.running_stats_sharing is not None and not isinstance(new.running_stats_sharing, RunningStatsSharing):
        new.running_stats_sharing = None  # decided again at the first forward
    new.local_class = type(m)
    return new


def _to_local(m: SyncBatchRenorm) -> BatchRenormBase:
    from lightning_brn.layers import BatchRenorm2d

    cls = m.local_class or BatchRenorm2d
    new = cls(m.num_features, eps=m.eps, affine=False, track_running_stats=False)
    _move(m, new)
    new.running_stats_sharing = None  # decided again at the first forward
    return new
