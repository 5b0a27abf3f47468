"""Model surgery: batchnorm <-> Batch Renorm, exactly and reversibly.

:func:`convert_model` replaces every batchnorm of a model (``torch.nn.BatchNorm1d/2d/3d``,
``torch.nn.SyncBatchNorm``, timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` and faithful subclasses)
by the matching Batch Renorm layer; :func:`revert_model` turns every Batch Renorm layer back into plain
batchnorm for deployment. Both work like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: a recursive
function returns the replacement module and re-attaches the children with ``add_module``, so the root
itself may be replaced (use the returned module).

Both directions move the *same* Parameter objects and buffer tensors into the new layer (an optimizer
built before the surgery keeps training them; nothing is copied or re-allocated), and the state dict
keys are batchnorm's, so checkpoints load with ``strict=True`` either way. The module's own hooks
(forward, backward, state-dict) and the parametrizations of its weight and bias
(``torch.nn.utils.parametrize``) move with them (the replaced module keeps references to the same tables and
tensors: it is not meant to be used afterwards). Every layer is checked, and its replacement built, before any
is swapped in: a model that cannot be converted (or reverted) faithfully raises and is left as it was.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import itertools
import logging
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from lightning_brn.distributed import ProcessGroup, SyncBatchRenorm, SyncBatchRenormAct
from lightning_brn.layers import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BatchRenormAct2d,
    BatchRenormBase,
)
from lightning_brn.validation import check_dmax, check_microbatch_size, check_momentum, check_rmax

__all__ = ["convert_model", "revert_model", "conversion_summary", "ConversionSummary"]

log = logging.getLogger(__name__)  # "lightning_brn.convert", under the package's "lightning_brn" logger

#: ``exclude`` accepts a glob pattern, a list of patterns, or a predicate ``(name, module) -> bool``.
ExcludeType = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]
#: ``sync_batchnorm_dim``: the rank (1, 2 or 3) of every ``torch.nn.SyncBatchNorm``, or ``(name, module) -> rank``.
SyncDimType = Union[Literal[1, 2, 3], Callable[[str, nn.Module], int]]

# The state every batchnorm and every renorm layer has, under the same names.
_PARAM_NAMES = ("weight", "bias")
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")
# Attributes convert_model leaves on the layers it makes: the source class name (for
# conversion_summary) and batchnorm's own momentum (restored by revert_model).
_SOURCE_ATTR = "_bn_source"
_BN_MOMENTUM_ATTR = "_bn_momentum"
_MISSING = object()
# torch.nn.Module's per-instance hook tables (and the flag that goes with the backward hooks): they move to
# the new layer as they are, so the handles that registered the hooks can still remove them.
_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@functools.lru_cache(maxsize=None)
def _timm_norm_act() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(BatchNormAct2d, SyncBatchNormAct) and timm's frozen classes, or empty tuples without timm."""
    try:
        from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
    except ImportError:  # pragma: no cover - timm is optional at run time
        return (), ()
    return (BatchNormAct2d, SyncBatchNormAct), (FrozenBatchNormAct2d,)


@functools.lru_cache(maxsize=None)
def _frozen_classes() -> tuple[type, ...]:
    classes: list[type] = list(_timm_norm_act()[1])
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # pragma: no cover - torchvision is optional at run time
        pass
    else:
        classes.append(FrozenBatchNorm2d)
    return tuple(classes)


def _is_frozen(module: nn.Module) -> bool:
    """Frozen batchnorms (fixed statistics and affine, no training behaviour): left alone."""
    return isinstance(module, _frozen_classes()) or (
        not isinstance(module, (_BatchNorm, BatchRenormBase)) and "FrozenBatchNorm" in type(module).__name__
    )


# --------------------------------------------------------------------------------------------- exclude
def _make_exclude(exclude: ExcludeType) -> Callable[[str, nn.Module], bool]:
    expected = "exclude must be a module-name pattern (str), a list of patterns or a predicate (name, module) -> bool"
    if exclude is None:
        return lambda name, module: False
    if isinstance(exclude, (nn.Module, Tensor, bytes, bytearray, Mapping)):
        raise TypeError(f"{expected}; got {exclude!r} of type {type(exclude).__name__}")
    if isinstance(exclude, type):  # a class is callable, but calling it with (name, module) builds an instance
        raise TypeError(
            f"{expected}; got the class {exclude.__module__}.{exclude.__qualname__}: to keep the modules of a class, "
            f"pass exclude=lambda name, module: isinstance(module, {exclude.__name__})"
        )
    if isinstance(exclude, str):
        patterns: tuple[str, ...] = (exclude,)
    elif callable(exclude):
        _check_two_arguments("exclude", exclude, expected)
        return exclude
    elif isinstance(exclude, Iterable):
        patterns = tuple(exclude)
        bad = [p for p in patterns if not isinstance(p, str)]
        if bad:
            raise TypeError(f"{expected}; got a collection holding {bad[0]!r} of type {type(bad[0]).__name__}")
    else:
        raise TypeError(f"{expected}; got {exclude!r} of type {type(exclude).__name__}")
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns_match(exclude: ExcludeType, model: nn.Module) -> None:
    """A pattern of ``exclude`` that matches no module name is a typo or a pattern for another model: refused, so
    that the layers it was meant to keep are not converted without a word."""
    if exclude is None or callable(exclude):
        return
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        batchnorms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
        raise ValueError(
            f"convert_model: exclude pattern(s) {', '.join(map(repr, unmatched))} match no module of "
            f"{type(model).__name__}; expected fnmatch patterns of qualified module names (the root is ''), such as "
            f"{', '.join(repr(n) for n in batchnorms[:3]) or repr(names[-1])}"
            + (" (its batchnorms)" if batchnorms else "")
        )


def _check_two_arguments(what: str, fn: Callable[..., Any], expected: str) -> None:
    """Refuses a callable that cannot be called as ``fn(name, module)`` (e.g. ``lambda m: ...``), before the walk."""
    try:
        inspect.signature(fn).bind("name", nn.Module())
    except TypeError:
        raise TypeError(f"{expected}; got {fn!r}, which cannot be called as {what}(name, module)") from None
    except ValueError:  # no signature to inspect (some builtins): it is called as it is
        pass


# --------------------------------------------------------------------------------------------- matching
def _torch_base(module: _BatchNorm) -> Optional[type[_BatchNorm]]:
    """The torch/timm batchnorm class whose forward ``module`` runs, or ``None`` if none is faithful."""
    act_classes = _timm_norm_act()[0]
    # Most specific first: timm's norm+act classes derive from BatchNorm2d / SyncBatchNorm.
    for base in (*act_classes, nn.SyncBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if isinstance(module, base):
            return base if type(module).forward is base.forward else None
    return None


def _where(name: str) -> str:
    """How an error names the module at qualified name ``name``."""
    return f"module {name!r}" if name else "the root module"


def _unsupported(name: str, module: nn.Module, why: str) -> TypeError:
    where = _where(name)
    cls = parametrize.type_before_parametrizations(module)
    return TypeError(
        f"convert_model cannot convert {where} of type {cls.__module__}.{cls.__qualname__}: {why}. "
        f"Keep it as batchnorm with exclude=[{name!r}] (or a predicate), or replace it before converting"
    )


def _class_name(module: nn.Module) -> str:
    """The module's class name, ``BatchNorm2d`` rather than ``ParametrizedBatchNorm2d``."""
    return parametrize.type_before_parametrizations(module).__name__


def _parametrized_names(module: nn.Module) -> list[str]:
    return list(module.parametrizations.keys()) if parametrize.is_parametrized(module) else []


def _unmovable_parametrizations(module: nn.Module) -> Optional[str]:
    """Why the module's parametrizations cannot move to the new layer, or ``None``: only the weight's and the
    bias' can (a parametrized running statistic would not receive the in-place moving-average updates)."""
    bad = [k for k in _parametrized_names(module) if k not in _PARAM_NAMES]
    if bad:
        return (
            f"it has parametrizations (torch.nn.utils.parametrize) on {bad}; only those of weight and bias can move "
            "to the new layer"
        )
    return None


def _sync_rank(name: str, module: nn.Module, sync_batchnorm_dim: SyncDimType) -> int:
    rank = sync_batchnorm_dim(name, module) if callable(sync_batchnorm_dim) else sync_batchnorm_dim
    if isinstance(rank, bool) or rank not in (1, 2, 3):
        raise ValueError(
            f"sync_batchnorm_dim must give 1, 2 or 3 (BatchRenorm1d/2d/3d), got {rank!r} for {_where(name)} "
            "(a SyncBatchNorm)"
        )
    return int(rank)


def _target_class(name: str, module: _BatchNorm, sync_batchnorm_dim: SyncDimType) -> type[BatchRenormBase]:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise _unsupported(
            name, module, "it is an uninitialized lazy batchnorm (num_features unknown); run one forward pass first"
        )
    base = _torch_base(module)
    if base is None:
        if any(isinstance(module, b) for b in (*_timm_norm_act()[0], nn.SyncBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            why = "it overrides batchnorm's forward, so a Batch Renorm layer would not compute the same function"
        else:
            why = "it is a _BatchNorm subclass outside BatchNorm1d/2d/3d/SyncBatchNorm, so its input rank is unknown"
        raise _unsupported(name, module, why)
    extra = [k for k, v in module._parameters.items() if k not in _PARAM_NAMES and v is not None]
    extra += [k for k, v in module._buffers.items() if k not in _BUFFER_NAMES and v is not None]
    if extra:
        raise _unsupported(name, module, f"it holds extra parameters/buffers {extra} that Batch Renorm has no place for")
    why_not = _unmovable_parametrizations(module)
    if why_not:
        raise _unsupported(name, module, why_not)
    if base in _timm_norm_act()[0]:
        return BatchRenormAct2d
    if base is nn.SyncBatchNorm:
        return {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}[_sync_rank(name, module, sync_batchnorm_dim)]
    return {nn.BatchNorm1d: BatchRenorm1d, nn.BatchNorm2d: BatchRenorm2d, nn.BatchNorm3d: BatchRenorm3d}[base]


def _state_device(module: nn.Module) -> Optional[torch.device]:
    for t in (*(module._parameters.get(k) for k in _PARAM_NAMES), *(module._buffers.get(k) for k in _BUFFER_NAMES)):
        if t is not None:
            return t.device
    t = next(itertools.chain(module.parameters(), module.buffers()), None)  # e.g. a parametrized weight's original
    return None if t is None else t.device


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Hand ``src``'s Parameter objects and buffer tensors (not copies) to ``dst``, and its flags, hooks and
    weight/bias parametrizations."""
    for k in _PARAM_NAMES:
        dst._parameters[k] = src._parameters.get(k)
    for k in _BUFFER_NAMES:
        dst._buffers[k] = src._buffers.get(k)
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig  # type: ignore[assignment]
    for attr in _HOOK_ATTRS:
        if attr in vars(src):
            setattr(dst, attr, getattr(src, attr))
    names = _parametrized_names(src)
    if names:
        # register_parametrization gives dst its parametrized class and the properties (a placeholder tensor and an
        # identity, replaced at once); then src's ParametrizationLists, with their original Parameters, take over.
        for k in names:
            dst._parameters[k] = nn.Parameter(torch.empty(0), requires_grad=False)
            parametrize.register_parametrization(dst, k, nn.Identity(), unsafe=True)
        dst.parametrizations = src.parametrizations


def _retarget_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Point the hooks that hold a reference to ``src`` itself (``register_load_state_dict_pre_hook`` wraps them
    with a weak reference to their module) at ``dst``, which has taken over ``src``'s hook tables."""
    for hook in getattr(dst, "_load_state_dict_pre_hooks", {}).values():
        ref = getattr(hook, "module", None) if getattr(hook, "with_module", False) else None
        if isinstance(ref, weakref.ReferenceType) and ref() is src:
            hook.module = weakref.ref(dst)


def _make_renorm(
    module: _BatchNorm,
    cls: type[BatchRenormBase],
    rmax: float,
    dmax: float,
    momentum: float,
    microbatch_size: Optional[int],
    sync: bool = False,
    process_group: ProcessGroup = None,
) -> BatchRenormBase:
    # Built without weight, bias or running statistics (registered as None, nothing allocated, nothing
    # initialized), on the device of the original state so that the schedule buffers live there;
    # then the original tensors move in and the flags are set to the original's. ``sync``: the synchronized
    # counterpart of ``cls``, which remembers ``cls`` for revert_sync_batch_renorm.
    local_cls = cls
    if sync:
        cls = SyncBatchRenormAct if issubclass(cls, BatchRenormAct2d) else SyncBatchRenorm
    kwargs = dict(
        eps=module.eps,
        momentum=momentum,
        affine=False,
        track_running_stats=False,
        rmax=rmax,
        dmax=dmax,
        microbatch_size=microbatch_size,
        device=_state_device(module),
    )
    if cls is BatchRenormAct2d:
        kwargs["apply_act"] = False  # the original act/drop children are re-attached by the caller
    if sync:
        kwargs["process_group"] = process_group  # (SyncBatchRenormAct's act and drop: re-attached by the caller)
    new = cls(module.num_features, **kwargs)  # type: ignore[arg-type]
    new.affine = module.affine
    new.track_running_stats = module.track_running_stats
    _move_state(module, new)
    if sync:
        new.local_class = local_cls
    setattr(new, _SOURCE_ATTR, _class_name(module))
    setattr(new, _BN_MOMENTUM_ATTR, module.momentum)
    return new


def _make_batchnorm(module: BatchRenormBase, cls: type[_BatchNorm], momentum: Optional[float]) -> _BatchNorm:
    # As _make_renorm: nothing allocated, then the renorm layer's tensors move in.
    kwargs: dict[str, object] = dict(eps=module.eps, momentum=momentum, affine=False, track_running_stats=False)
    if cls in _timm_norm_act()[0]:
        kwargs["apply_act"] = False  # the act/drop children are re-attached by the caller
    if cls is nn.SyncBatchNorm:  # (a SyncBatchRenorm built as such: the same process group)
        kwargs["process_group"] = getattr(module, "process_group", None)
    new = cls(module.num_features, **kwargs)  # type: ignore[arg-type]
    new.affine = module.affine
    new.track_running_stats = module.track_running_stats
    _move_state(module, new)
    return new


# --------------------------------------------------------------------------------------------- summary
def _fmt(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items())


@dataclass(frozen=True)
class ConversionSummary:
    """The normalization layers of a model, by class, as :func:`conversion_summary` finds them.

    Attributes:
        converted: ``"BatchNorm2d -> BatchRenorm2d"``-style keys counting the renorm layers that
            :func:`convert_model` made (in any call), by source and target class.
        renorm: every Batch Renorm layer, by class (converted or built as such).
        frozen: frozen batchnorms left alone (timm / torchvision ``FrozenBatchNorm2d``, ...), by class.
        batchnorm: trainable batchnorm layers still in the model (kept by ``exclude``), by class.
        names: qualified module name of each renorm layer, in ``model.named_modules()`` order.
    """

    converted: dict[str, int] = field(default_factory=dict)
    renorm: dict[str, int] = field(default_factory=dict)
    frozen: dict[str, int] = field(default_factory=dict)
    batchnorm: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    @property
    def num_renorm(self) -> int:
        """Number of Batch Renorm layers in the model."""
        return sum(self.renorm.values())

    def __str__(self) -> str:
        parts = [_fmt(Counter(self.converted)) or "no converted layers"]
        direct = Counter(self.renorm) - Counter({k.split(" -> ")[1]: n for k, n in self.converted.items()})
        if direct:
            parts.append(f"built as Batch Renorm: {_fmt(direct)}")
        if self.frozen:
            parts.append(f"left alone: {_fmt(Counter(self.frozen))}")
        if self.batchnorm:
            parts.append(f"batchnorm kept: {_fmt(Counter(self.batchnorm))}")
        return "; ".join(parts)


def conversion_summary(model: nn.Module) -> ConversionSummary:
    """Count a model's Batch Renorm layers (and what they were converted from), frozen and plain batchnorms.

    Reads the model as it is now (no state is kept between calls), e.g. for a callback's report
    after :func:`convert_model`. ``str(summary)`` is a one-line description.

    Examples::

        >>> import torch
        >>> from lightning_brn import convert_model
        >>> from lightning_brn.convert import conversion_summary
        >>> model = convert_model(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
        >>> s = conversion_summary(model)
        >>> s.converted, s.names
        ({'BatchNorm2d -> BatchRenorm2d': 1}, ['1'])
        >>> str(s)
        '1 BatchNorm2d -> BatchRenorm2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"conversion_summary expects a torch.nn.Module, got {model!r} of type {type(model).__name__}")
    converted: Counter[str] = Counter()
    renorm: Counter[str] = Counter()
    frozen: Counter[str] = Counter()
    batchnorm: Counter[str] = Counter()
    names: list[str] = []
    for name, m in model.named_modules():
        cls = _class_name(m)
        if isinstance(m, BatchRenormBase):
            renorm[cls] += 1
            names.append(name)
            source = getattr(m, _SOURCE_ATTR, None)
            if source is not None:
                converted[f"{source} -> {cls}"] += 1
        elif isinstance(m, _BatchNorm):
            batchnorm[cls] += 1
        elif _is_frozen(m):
            frozen[cls] += 1
    return ConversionSummary(dict(converted), dict(renorm), dict(frozen), dict(batchnorm), names)


# --------------------------------------------------------------------------------------------- convert
#: Batchnorm classes as a scripted module names its submodules (``original_name``).
_SCRIPTED_BN_NAMES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "BatchNormAct2d", "SyncBatchNormAct"})


def _scripted_class(module: nn.Module) -> str:
    return str(getattr(module, "original_name", type(module).__name__))


def _is_scripted_batchnorm(module: nn.Module) -> bool:
    """A batchnorm class by name, or a module with batchnorm's three buffers (a subclass of one; frozen
    batchnorms have no ``num_batches_tracked``) that is not one of the norms with the same buffers that
    convert_model leaves alone (InstanceNorm with running statistics, Batch Renorm)."""
    name = _scripted_class(module)
    if name in _SCRIPTED_BN_NAMES:
        return True
    if "InstanceNorm" in name or name.startswith("BatchRenorm"):
        return False
    buffers = {n for n, _ in module.named_buffers(recurse=False)}
    return set(_BUFFER_NAMES) <= buffers


def _walk(model: nn.Module, visit: Callable[[nn.Module, str], bool]) -> None:
    """Calls ``visit(module, qualified_name)`` top-down in :func:`_map_modules`' order (each module once),
    descending into the children where it returns True: the checks that run before anything is changed."""
    seen: set[int] = set()

    def walk(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if visit(module, name):
            for child_name, child in list(module._modules.items()):
                if child is not None:
                    walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")


def _map_modules(model: nn.Module, replace: Callable[[nn.Module, str], tuple[nn.Module, bool]]) -> nn.Module:
    """Rebuilds the module tree top-down: ``replace(module, qualified_name)`` returns the module to put in its
    place and whether to descend into its children (re-attached with ``add_module``). A module shared by
    several parents is visited once and replaced by the same object everywhere; the root may be replaced."""
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        out, descend = replace(module, name)
        done[id(module)] = out
        if descend:
            # (not named_children(): it skips a module's second appearance, which must be replaced too)
            for child_name, child in list(module._modules.items()):
                if child is not None:
                    out.add_module(child_name, visit(child, f"{name}.{child_name}" if name else child_name))
        return out

    return visit(model, "")


def convert_model(
    model: nn.Module,
    *,
    rmax: float = 1.0,
    dmax: float = 0.0,
    momentum: float = 0.01,
    microbatch_size: Optional[int] = None,
    exclude: ExcludeType = None,
    sync_batchnorm_dim: SyncDimType = 2,
    sync: bool = False,
    process_group: ProcessGroup = None,
) -> nn.Module:
    r"""Replace every batchnorm of ``model`` by the matching Batch Renorm layer.

    =============================================  ======================================================
    batchnorm                                      becomes
    =============================================  ======================================================
    ``torch.nn.BatchNorm1d`` / ``2d`` / ``3d``     :class:`BatchRenorm1d` / ``2d`` / ``3d``
    ``torch.nn.SyncBatchNorm``                     ``BatchRenorm{rank}d``, rank from ``sync_batchnorm_dim``
    timm ``BatchNormAct2d``, ``SyncBatchNormAct``  :class:`BatchRenormAct2d` (the same ``act``, ``drop``)
    subclasses of the above                        as their base, if they keep its ``forward``
    any of the above, with ``sync=True``           :class:`~lightning_brn.distributed.SyncBatchRenorm`
                                                   (``SyncBatchRenormAct`` for the norm+act classes)
    =============================================  ======================================================

    Frozen batchnorms (timm's ``FrozenBatchNormAct2d``, torchvision's ``FrozenBatchNorm2d``, which timm
    uses as its ``FrozenBatchNorm2d``) are left alone and reported. A batchnorm that cannot be converted
    faithfully raises ``TypeError``: a subclass overriding ``forward`` (e.g. timm's ``SplitBatchNorm2d``)
    or holding extra parameters, an uninitialized lazy batchnorm, a bare ``_BatchNorm`` subclass, a
    parametrized running statistic, a scripted (``torch.jit``) submodule holding a batchnorm. A subclass
    that only overrides ``_check_input_dim`` is converted to the renorm layer of its base class, which
    takes the inputs of that base class's rank. Every layer is checked before any is replaced, so a model that raises
    is left exactly as it was.

    The new layers take over the original Parameter objects and the ``running_mean``, ``running_var``
    and ``num_batches_tracked`` tensors themselves (an optimizer built before conversion keeps training
    them), and keep device, dtype, ``requires_grad``, ``training``, ``eps``, ``affine``,
    ``track_running_stats`` and ``qconfig``, the batchnorm's own hooks (forward, backward, state-dict;
    the handles that registered them still remove them) and the parametrizations of its weight and bias
    (``torch.nn.utils.parametrize``, with their original Parameters). So right after conversion the model computes the same
    function in eval mode (and, with the default ``rmax=1, dmax=0``, in training mode too). Batchnorm's
    ``momentum`` is *not* carried over: the renorm layers use ``momentum`` (the paper's :math:`\alpha`);
    batchnorm's value is remembered for :func:`revert_model`.

    The modules are changed in place and the model is returned; when the root module is itself a
    batchnorm, the returned module is a new one, so always use the return value. Layers that already are
    Batch Renorm are left as they are (converting twice is a no-op; change their hyper-parameters through
    their ``rmax`` / ``dmax`` / ``momentum`` attributes or :class:`lightning_brn.RenormSchedule`). A model
    without any batchnorm comes back unchanged with a ``UserWarning``. A one-line summary is logged on
    the ``"lightning_brn"`` logger at INFO level; :func:`conversion_summary` returns it as data.

    Args:
        model: any ``torch.nn.Module`` (eager, not scripted).
        rmax: clip of r for the new layers, >= 1. Default: 1.0 (exactly batchnorm).
        dmax: clip of d for the new layers, >= 0. Default: 0.0 (exactly batchnorm).
        momentum: the moving-average rate :math:`\alpha` in [0, 1] of the new layers. Default: 0.01.
        microbatch_size: examples per independently normalized group in training, or ``None``.
        exclude: modules to keep as they are: a glob pattern on qualified module names
            (``fnmatch``-style, e.g. ``"head.*"``; the root is ``""``), a list of patterns, or a predicate
            ``(name, module) -> bool`` (called once per module). A matching module *and everything below it*
            is left untouched.
        sync_batchnorm_dim: ``torch.nn.SyncBatchNorm`` accepts inputs of any rank and does not record
            which one it normalizes (``convert_sync_batchnorm`` forgets the class it replaced), so its rank
            is given here: 1, 2 (the default: images, (N, C, H, W)) or 3, giving ``BatchRenorm1d/2d/3d``;
            or, for models mixing ranks, a function ``(name, module) -> 1 | 2 | 3`` called once per
            ``SyncBatchNorm``. (timm's ``SyncBatchNormAct`` is always 2d.) Simplest of all: convert before
            ``convert_sync_batchnorm``, which leaves Batch Renorm layers alone.
            Batch Renorm layers normalize with each process's own batch (their moving averages are shared
            across processes, see :mod:`lightning_brn.distributed`) unless ``sync=True``.
        sync: make :class:`~lightning_brn.distributed.SyncBatchRenorm` layers (``SyncBatchRenormAct`` for
            timm's norm+act classes), whose batch statistics are those of every process of ``process_group``
            together; on one process they are the local layers. Opt in: it costs a synchronous all-reduce per
            layer in the forward and in the backward (``docs/distributed.md``). Layers that already are Batch
            Renorm are left as they are (:func:`~lightning_brn.distributed.convert_sync_batch_renorm` converts
            those). Not with ``microbatch_size``.
        process_group: with ``sync=True``, the ranks whose batches are normalized together; ``None``: all of
            them (the default process group).

    Returns:
        The converted model (the same object unless the root was a batchnorm).

    Raises:
        TypeError: ``model`` is not a module, ``exclude`` has the wrong type, or a batchnorm cannot be
            converted faithfully (the message names the module).
        ValueError: a hyper-parameter is out of range, ``sync_batchnorm_dim`` gives a rank other than 1, 2
            or 3, a batchnorm has ``eps=0`` (Batch Renorm needs ``eps > 0``), ``sync=True`` comes with a
            ``microbatch_size``, or ``process_group`` without ``sync=True``.
        Nothing in the model is changed when either is raised.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_brn import BatchRenorm2d, convert_model
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
        >>> weight = model[1].weight
        >>> model = convert_model(model, rmax=3.0, dmax=5.0, exclude="4")
        >>> type(model[1]).__name__, model[1].weight is weight, model[1].rmax, type(model[4]).__name__
        ('BatchRenorm2d', True, 3.0, 'BatchNorm2d')
        >>> synced = convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), rmax=3.0, sync=True)
        >>> type(synced[1]).__name__, synced[1].rmax, synced[1].process_group
        ('SyncBatchRenorm', 3.0, None)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model expects a torch.nn.Module, got {model!r} of type {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"convert_model cannot change a scripted module ({type(model).__name__}): convert the eager model, then script it"
        )
    rmax = check_rmax(rmax)
    dmax = check_dmax(dmax)
    momentum = check_momentum(momentum)
    microbatch_size = check_microbatch_size(microbatch_size)
    if not isinstance(sync, bool):
        raise TypeError(f"convert_model: sync must be a bool, got sync={sync!r}")
    if sync and microbatch_size is not None:
        raise ValueError(
            f"convert_model: sync=True takes no microbatch_size (got microbatch_size={microbatch_size}): microbatches "
            "split one device's batch, while a synchronized layer normalizes the process group's batches together. "
            "Pass microbatch_size=None, or sync=False to normalize microbatches of each device's batch"
        )
    if process_group is not None and not sync:
        raise ValueError(
            f"convert_model: process_group={process_group!r} is only used with sync=True (the process group of the "
            "SyncBatchRenorm layers); pass sync=True, or leave process_group=None"
        )
    if callable(sync_batchnorm_dim):
        _check_two_arguments(
            "sync_batchnorm_dim", sync_batchnorm_dim, "sync_batchnorm_dim must be 1, 2, 3 or a function (name, module) -> rank"
        )
    elif isinstance(sync_batchnorm_dim, bool) or sync_batchnorm_dim not in (1, 2, 3):
        raise ValueError(f"sync_batchnorm_dim must be 1, 2 or 3, got sync_batchnorm_dim={sync_batchnorm_dim!r}")
    if isinstance(exclude, Iterable) and not isinstance(exclude, (str, bytes, bytearray, Mapping, nn.Module, Tensor)):
        exclude = tuple(exclude)  # read twice below (a generator would be empty the second time)
    is_excluded = _make_exclude(exclude)
    _check_patterns_match(exclude, model)

    # First every check and every new layer (built from the originals, which stay as they are), then the swap: a
    # model that cannot be converted is left as it was.
    excluded_ids: set[int] = set()
    targets: dict[int, tuple[type[BatchRenormBase], BatchRenormBase]] = {}

    def check(module: nn.Module, name: str) -> bool:
        if is_excluded(name, module):  # (the predicate is called once per module)
            excluded_ids.add(id(module))
            return False
        if isinstance(module, torch.jit.ScriptModule):  # its submodules are compiled code: nothing can be swapped
            inside = sorted({_scripted_class(m) for m in module.modules() if _is_scripted_batchnorm(m)})
            if inside:
                raise _unsupported(
                    name, module, f"it is a scripted (torch.jit) module holding {', '.join(inside)}; convert the eager "
                    "module, then script it"
                )
            return False
        if isinstance(module, _BatchNorm):
            cls = _target_class(name, module, sync_batchnorm_dim)
            try:  # the new layer's constructor checks eps (and num_features) before any state moves in
                new = _make_renorm(module, cls, rmax, dmax, momentum, microbatch_size, sync, process_group)
                targets[id(module)] = (type(new), new)
            except ValueError as err:  # e.g. eps=0, which Batch Renorm cannot take (eps is inside a sqrt)
                raise ValueError(f"convert_model cannot convert {_where(name)} ({module!r}): {err}") from err
        return True

    _walk(model, check)

    converted: Counter[str] = Counter()
    frozen: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    already: Counter[str] = Counter()

    def convert(module: nn.Module, name: str) -> tuple[nn.Module, bool]:
        if id(module) in excluded_ids:
            for m in module.modules():
                if isinstance(m, (_BatchNorm, BatchRenormBase)):
                    excluded[_class_name(m)] += 1
            return module, False
        if isinstance(module, torch.jit.ScriptModule):  # checked above: no batchnorm inside
            return module, False
        out = module
        if isinstance(module, _BatchNorm):
            cls, out = targets[id(module)]
            _retarget_hooks(module, out)
            converted[f"{_class_name(module)} -> {cls.__name__}"] += 1
        elif isinstance(module, BatchRenormBase):
            already[_class_name(module)] += 1
        elif _is_frozen(module):
            frozen[_class_name(module)] += 1
        return out, True

    model = _map_modules(model, convert)

    parts = [_fmt(converted) if converted else "nothing converted"]
    if already:
        parts.append(f"already Batch Renorm: {_fmt(already)}")
    if frozen:
        parts.append(f"left alone: {_fmt(frozen)}")
    if excluded:
        parts.append(f"excluded: {_fmt(excluded)}")
    log.info("convert_model: %s", "; ".join(parts))
    if not converted and not already and not excluded:
        warnings.warn(
            f"convert_model found no batchnorm in {type(model).__name__}"
            + (f" (frozen batchnorms are left alone: {_fmt(frozen)})" if frozen else "")
            + "; the model is returned unchanged",
            UserWarning,
            stacklevel=2,
        )
    return model


# --------------------------------------------------------------------------------------------- revert
def _bn_target(name: str, module: BatchRenormBase) -> type[_BatchNorm]:
    where = _where(name)
    qualname = parametrize.type_before_parametrizations(module).__qualname__
    table = _revert_table()
    base: Optional[type[BatchRenormBase]]
    bn_cls: Optional[type[_BatchNorm]]
    if isinstance(module, SyncBatchRenorm):
        # the batchnorm of the layer it was made from (convert_model(sync=True), convert_sync_batch_renorm); one
        # built as such becomes SyncBatchNorm, which takes inputs of any rank as it does
        base = SyncBatchRenormAct if isinstance(module, SyncBatchRenormAct) else SyncBatchRenorm
        local = module.local_class or (BatchRenormAct2d if base is SyncBatchRenormAct else None)
        bn_cls = nn.SyncBatchNorm if local is None else next((bn for r, bn in table if issubclass(local, r)), None)
        if base is SyncBatchRenormAct and bn_cls not in _timm_norm_act()[0]:
            bn_cls = None  # (no timm: no batchnorm with act and drop children)
    else:
        base, bn_cls = next(((r, bn) for r, bn in table if isinstance(module, r)), (None, None))
    if base is None or bn_cls is None:
        raise TypeError(f"revert_model does not know the Batch Renorm class {qualname} of {name!r}")
    if type(module).forward is not base.forward:
        raise TypeError(
            f"revert_model cannot revert {where} of type {qualname}: it overrides the "
            f"forward of {base.__name__}, so batchnorm would not compute the same function"
        )
    why_not = _unmovable_parametrizations(module)
    if why_not:
        raise TypeError(f"revert_model cannot revert {where} of type {qualname}: {why_not}")
    return bn_cls


@functools.lru_cache(maxsize=None)
def _revert_table() -> tuple[tuple[type[BatchRenormBase], type[_BatchNorm]], ...]:
    """(renorm class, batchnorm class) pairs, most specific first."""
    table: list[tuple[type[BatchRenormBase], type[_BatchNorm]]] = []
    act = _timm_norm_act()[0]
    if act:
        table.append((BatchRenormAct2d, act[0]))
    table += [(BatchRenorm1d, nn.BatchNorm1d), (BatchRenorm2d, nn.BatchNorm2d), (BatchRenorm3d, nn.BatchNorm3d)]
    return tuple(table)


def revert_model(model: nn.Module) -> nn.Module:
    r"""Turn every Batch Renorm layer of ``model`` back into plain batchnorm, for deployment.

    :class:`BatchRenorm1d/2d/3d` become ``torch.nn.BatchNorm1d/2d/3d`` and :class:`BatchRenormAct2d`
    becomes timm's ``BatchNormAct2d`` with the same ``act`` and ``drop`` children. The batchnorm layers
    take over the same Parameter objects and the learned moving averages (``running_mean``,
    ``running_var`` = :math:`\sigma^2 - \epsilon`, ``num_batches_tracked``), and keep device, dtype,
    ``requires_grad``, ``training``, ``eps``, ``affine``, ``track_running_stats`` and ``qconfig``, so eval
    outputs are identical and the model needs no renorm code: it fuses (conv-batchnorm folding), scripts,
    exports (``torch.export``, ONNX) wherever the batchnorm original did. Their ``momentum`` is
    batchnorm's original value when the layer came from :func:`convert_model`, else the renorm layer's
    :math:`\alpha`. ``rmax``, ``dmax`` and ``microbatch_size`` have no batchnorm counterpart and are
    dropped. A :class:`~lightning_brn.distributed.SyncBatchRenorm` (or ``SyncBatchRenormAct``) becomes the
    batchnorm of the layer it was made from (``BatchNorm2d`` for ``convert_model(..., sync=True)`` of a
    ``BatchNorm2d``), or ``torch.nn.SyncBatchNorm`` over the same process group when it was built as such (it
    takes inputs of any rank). Hooks and weight/bias parametrizations move with the layer, as in :func:`convert_model`. A
    layer that cannot be reverted faithfully (a subclass overriding ``forward``, a parametrized running
    statistic) raises ``TypeError`` before anything is changed. A model with no Batch Renorm layer comes
    back unchanged with a ``UserWarning``.

    Args:
        model: any ``torch.nn.Module``.

    Returns:
        The reverted model (the same object unless the root was a renorm layer).

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_brn import convert_model, revert_model
        >>> model = convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.2)))
        >>> model = revert_model(model)
        >>> model[1]
        BatchNorm2d(8, eps=1e-05, momentum=0.2, affine=True, bias=True, track_running_stats=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert_model expects a torch.nn.Module, got {model!r} of type {type(model).__name__}")
    # First every check and every new layer, then the swap: a model that cannot be reverted is left as it was.
    targets: dict[int, tuple[type[_BatchNorm], _BatchNorm]] = {}

    def check(module: nn.Module, name: str) -> bool:
        if isinstance(module, BatchRenormBase):
            bn_cls = _bn_target(name, module)
            bn_momentum = getattr(module, _BN_MOMENTUM_ATTR, _MISSING)
            if bn_momentum is _MISSING:
                bn_momentum = module.momentum  # a Python float, also on the meta device
            targets[id(module)] = (bn_cls, _make_batchnorm(module, bn_cls, bn_momentum))  # type: ignore[arg-type]
        return True

    _walk(model, check)
    reverted: Counter[str] = Counter()

    def revert(module: nn.Module, name: str) -> tuple[nn.Module, bool]:
        out = module
        if isinstance(module, BatchRenormBase):
            bn_cls, out = targets[id(module)]
            _retarget_hooks(module, out)
            reverted[f"{_class_name(module)} -> {bn_cls.__name__}"] += 1
        return out, True

    model = _map_modules(model, revert)
    if reverted:
        log.info("revert_model: %s", _fmt(reverted))
    else:
        warnings.warn(
            f"revert_model found no Batch Renorm layer in {type(model).__name__}; the model is returned unchanged",
            UserWarning,
            stacklevel=2,
        )
    return model

