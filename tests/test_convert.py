"""Tests of lightning_brn.convert: convert_model / revert_model / conversion_summary."""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Callable

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SplitBatchNorm2d, SyncBatchNormAct
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.utils import parametrize
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_brn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormAct2d, convert_model, is_batch_renorm, revert_model
from lightning_brn.convert import ConversionSummary, conversion_summary


@pytest.fixture(autouse=True)
def _one_thread():
    """These small CPU forwards are much faster on one thread on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _renorm_for(bn: nn.Module, sync_dim: int = 2) -> type:
    if isinstance(bn, (BatchNormAct2d, SyncBatchNormAct)):
        return BatchRenormAct2d
    if isinstance(bn, nn.SyncBatchNorm):
        return {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}[sync_dim]
    for bn_cls, renorm_cls in ((nn.BatchNorm1d, BatchRenorm1d), (nn.BatchNorm2d, BatchRenorm2d), (nn.BatchNorm3d, BatchRenorm3d)):
        if isinstance(bn, bn_cls):
            return renorm_cls
    raise AssertionError(type(bn))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters, so that 'same output' means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(7)
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def _tensors(model: nn.Module) -> dict[str, int]:
    return {**{k: id(v) for k, v in model.named_parameters()}, **{k: id(v) for k, v in model.named_buffers() if v is not None}}


# ----------------------------------------------------------------------------------------------------------------
# Every timm architecture, built on the meta device.


class _SkipMetaInit(TorchFunctionMode):
    """In-place ops on meta tensors (weight initializers) return at once: meta tensors hold no data.

    Entered inside ``torch.device("meta")``, this builds timm models ~3x faster: the slow part of
    building on meta is running every initializer through the meta kernels.
    """

    # In-place ops that change metadata, not data: these still run.
    _KEEP = {
        "requires_grad_", "resize_", "resize_as_", "set_", "squeeze_", "unsqueeze_",
        "transpose_", "t_", "as_strided_", "swapdims_", "swapaxes_", "detach_",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and name not in self._KEEP:
            t = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def _build_on_meta(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"), _SkipMetaInit():
            return timm.create_model(name)


@pytest.mark.slow  # ~1400 models: about 100 s of CPU in all
@pytest.mark.parametrize("name", timm.list_models())
def test_every_timm_model_converts_and_reverts(name: str) -> None:
    try:
        model = _build_on_meta(name)
    except Exception as err:  # only a failure to *build* is skipped, with the reason
        pytest.skip(f"timm cannot build {name} on the meta device: {type(err).__name__}: {err}")
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    keys = list(model.state_dict())
    if not bns:
        with pytest.warns(UserWarning, match="no batchnorm"):
            assert convert_model(model) is model
        assert not any(is_batch_renorm(m) for m in model.modules())
        return
    expected = {n: _renorm_for(m) for n, m in bns.items()}
    weights = {n: m.weight for n, m in bns.items()}
    children = {n: dict(m.named_children()) for n, m in bns.items()}

    model = convert_model(model)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    renorms = {n: m for n, m in model.named_modules() if is_batch_renorm(m)}
    assert {n: type(m) for n, m in renorms.items()} == expected  # one renorm layer per batchnorm, in place
    for n, m in renorms.items():
        assert m.weight is weights[n]
        assert dict(m.named_children()) == children[n]  # the same act / drop modules (or none)
    assert list(model.state_dict()) == keys

    bn_classes = {n: (BatchNormAct2d if isinstance(m, (BatchNormAct2d, SyncBatchNormAct)) else type(m)) for n, m in bns.items()}
    model = revert_model(model)
    assert not any(is_batch_renorm(m) for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)} == bn_classes
    for n in bns:
        assert dict(model.get_submodule(n).named_children()) == children[n]
    assert list(model.state_dict()) == keys


# ----------------------------------------------------------------------------------------------------------------
# Exact eval outputs on real tensors.

_REAL_MODELS = [
    pytest.param(lambda: timm.create_model("resnet10t"), 64, id="resnet10t"),
    pytest.param(lambda: timm.create_model("efficientnet_b0"), 64, id="efficientnet_b0"),
    pytest.param(lambda: timm.create_model("mobilenetv3_small_100"), 64, id="mobilenetv3_small_100"),
    pytest.param(lambda: timm.create_model("inception_v3"), 75, id="inception_v3"),
    pytest.param(lambda: timm.create_model("regnetx_002"), 64, id="regnetx_002"),
    pytest.param(lambda: timm.create_model("levit_128s", img_size=112), 112, id="levit_128s"),
    pytest.param(lambda: torchvision.models.resnet18(weights=None), 64, id="torchvision_resnet18"),
]


@pytest.mark.parametrize(("factory", "size"), _REAL_MODELS)
def test_eval_outputs_equal_after_convert_and_revert(factory: Callable[[], nn.Module], size: int) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(factory()).eval()
    n_bn = sum(isinstance(m, _BatchNorm) for m in model.modules())
    classes = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        tensors = _tensors(model)

        model = convert_model(model, rmax=3.0, dmax=5.0)
        assert sum(is_batch_renorm(m) for m in model.modules()) == n_bn
        assert not any(isinstance(m, _BatchNorm) for m in model.modules())
        assert _tensors(model).items() >= tensors.items()  # the same Parameter and buffer objects
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)

        model = revert_model(model)
        assert [type(m) for m in model.modules()] == classes
        assert _tensors(model) == tensors
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_levit_has_batchnorm1d_converted() -> None:
    model = convert_model(timm.create_model("levit_128s", img_size=112))
    s = conversion_summary(model)
    assert s.converted == {"BatchNorm1d -> BatchRenorm1d": 48, "BatchNorm2d -> BatchRenorm2d": 4}


def test_training_forward_unchanged_with_default_clipping() -> None:
    """With rmax=1, dmax=0 a Batch Renorm layer is batchnorm in training too."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t")
    ref = copy.deepcopy(model).train()
    model = convert_model(model).train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Deployment of a reverted model: fusion, scripting, export.


def _reverted_resnet() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    model = revert_model(convert_model(model, rmax=2.0, dmax=1.0))
    return model, x, expected


def test_reverted_model_fuses_conv_bn() -> None:
    model, x, expected = _reverted_resnet()
    fused = fx_fuse(model)
    assert not any(isinstance(m, _BatchNorm) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
    fused = torch.ao.quantization.fuse_modules(model, [["conv1", "bn1", "relu"]])
    assert isinstance(fused.bn1, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_converted_model_works_with_fx_feature_extraction(training: bool) -> None:
    """timm's (torchvision's) fx feature extractor traces the model in both modes: the converted layers trace the
    same nodes in each (no train/eval node mismatch warning), and the traced extractor keeps counting batches and
    moving the averages of the layers it shares with the model."""
    from timm.models import create_feature_extractor

    torch.manual_seed(0)
    model = convert_model(timm.create_model("resnet18", num_classes=10), rmax=2.0, dmax=1.0).train(training)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the node-mismatch UserWarning included
        extractor = create_feature_extractor(model, return_nodes={"layer2": "mid", "layer4": "last"})
    x = torch.randn(4, 3, 64, 64)
    for _ in range(3):
        out = extractor(x)
        expected = reference(x)  # the same steps through the module itself
    layers = [m for m in model.modules() if is_batch_renorm(m)]
    assert [int(m.num_batches_tracked) for m in layers] == [3 if training else 0] * len(layers)
    for ours, theirs in zip(layers, (m for m in reference.modules() if is_batch_renorm(m))):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert out["last"].shape == (4, 512, 2, 2) and out["mid"].shape == (4, 128, 8, 8)
    assert expected.shape == (4, 10)


def _reverted_timm() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    original = _randomize_bn(timm.create_model("mobilenetv3_small_050", num_classes=10)).eval()  # BatchNormAct2d
    model = revert_model(convert_model(copy.deepcopy(original), rmax=2.0, dmax=1.0))
    return original, model, torch.randn(2, 3, 32, 32)


def test_reverted_model_scripts() -> None:
    original, model, x = _reverted_timm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), original(x), rtol=1e-5, atol=1e-5)


def test_reverted_model_exports() -> None:
    original, model, x = _reverted_timm()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), original(x), rtol=1e-5, atol=1e-5)


def test_reverted_model_exports_to_onnx() -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    _, model, x = _reverted_timm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True)
    onnx.checker.check_model(program.model_proto)
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert "Conv" in ops and not any("enorm" in op for op in ops)


# ----------------------------------------------------------------------------------------------------------------
# State, identity and optimizer continuity.


def test_optimizer_built_before_conversion_keeps_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bn_weight, running_mean = model[1].weight, model[1].running_mean
    model = convert_model(model, rmax=3.0, dmax=5.0)
    assert isinstance(model[1], BatchRenorm2d)
    assert model[1].weight is bn_weight and model[1].running_mean is running_mean
    assert any(p is model[1].weight for p in opt.param_groups[0]["params"])
    before_w, before_mean = model[1].weight.detach().clone(), running_mean.clone()
    model.train()
    loss = model(torch.randn(16, 3, 8, 8)).square().mean()
    loss.backward()
    opt.step()
    assert not torch.equal(model[1].weight, before_w)  # the optimizer updated the converted layer
    assert not torch.equal(model[1].running_mean, before_mean)  # the moving average is the same tensor
    assert model[1].num_batches_tracked.item() == 1


def test_conversion_keeps_flags_dtype_requires_grad_and_qconfig() -> None:
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3, dtype=torch.float64).eval()
    bn.weight.requires_grad_(False)
    bn.qconfig = "a qconfig"  # type: ignore[assignment]
    model = nn.Sequential(nn.Identity(), bn).train()
    model[1].eval()
    model = convert_model(model, momentum=0.05, microbatch_size=2)
    m = model[1]
    assert isinstance(m, BatchRenorm2d)
    assert (m.training, model.training) == (False, True)
    assert (m.eps, m.affine, m.track_running_stats, m.momentum, m.microbatch_size) == (1e-3, True, True, 0.05, 2)
    assert m.weight.dtype == torch.float64 and not m.weight.requires_grad and m.bias.requires_grad
    assert m.qconfig == "a qconfig"
    assert m._schedule.device == m.weight.device and m._schedule.dtype == torch.float64
    fresh = BatchRenorm2d(4)  # built the ordinary way: the same registered state
    assert list(m._parameters) == list(fresh._parameters) and list(m._buffers) == list(fresh._buffers)
    assert m._non_persistent_buffers_set == fresh._non_persistent_buffers_set
    back = revert_model(model)[1]
    assert type(back) is nn.BatchNorm2d and back.momentum == 0.3  # batchnorm's own momentum comes back
    assert back.qconfig == "a qconfig" and not back.training and back.weight is m.weight


@pytest.mark.parametrize(
    "bn",
    [
        pytest.param(nn.BatchNorm2d(4, affine=False), id="affine=False"),
        pytest.param(nn.BatchNorm2d(4, track_running_stats=False), id="track_running_stats=False"),
        pytest.param(nn.BatchNorm2d(4, affine=False, track_running_stats=False), id="stateless"),
        pytest.param(nn.BatchNorm2d(4, bias=False), id="bias=False"),
    ],
)
def test_optional_state_is_kept(bn: nn.BatchNorm2d) -> None:
    torch.manual_seed(0)
    if bn.track_running_stats:
        _randomize_bn(bn)
    ref = copy.deepcopy(bn)
    x = torch.randn(3, 4, 5, 5)
    new = convert_model(bn)
    assert isinstance(new, BatchRenorm2d)
    assert (new.affine, new.track_running_stats) == (ref.affine, ref.track_running_stats)
    assert list(new.state_dict()) == list(ref.state_dict())
    for mode in (False, True):  # (eval first: a training step moves the averages at different rates)
        torch.testing.assert_close(new.train(mode)(x), ref.train(mode)(x), rtol=1e-5, atol=1e-5)
    back = revert_model(new)
    assert type(back) is nn.BatchNorm2d and back.extra_repr() == ref.extra_repr()


def test_state_dict_loads_strictly_both_ways() -> None:
    torch.manual_seed(0)
    original = _randomize_bn(timm.create_model("mobilenetv3_small_050", num_classes=10)).eval()
    converted = convert_model(timm.create_model("mobilenetv3_small_050", num_classes=10)).eval()
    converted.load_state_dict(original.state_dict(), strict=True)  # e.g. pretrained batchnorm weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-6, atol=1e-6)
        plain = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
        plain.load_state_dict(converted.state_dict(), strict=True)
        torch.testing.assert_close(plain(x), original(x), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_conversion_on_cuda_keeps_device() -> None:
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).cuda().eval()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    expected = model(x)
    model = convert_model(model, rmax=2.0)
    m = model[1]
    assert all(t.device.type == "cuda" for t in (m.weight, m.running_mean, m._schedule, m._correction))
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    model.train()(x)  # training step runs on the device
    assert revert_model(model)[1].weight.device.type == "cuda"


# ----------------------------------------------------------------------------------------------------------------
# Module kinds.


def test_root_batchnorm_is_replaced() -> None:
    bn = nn.BatchNorm1d(5)
    new = convert_model(bn)
    assert type(new) is BatchRenorm1d and new.weight is bn.weight
    back = revert_model(new)
    assert type(back) is nn.BatchNorm1d and back.weight is bn.weight
    assert type(convert_model(nn.BatchNorm3d(2))) is BatchRenorm3d


def test_timm_batchnorm_act_keeps_act_and_drop() -> None:
    bn = BatchNormAct2d(6, act_layer=nn.GELU, drop_layer=nn.Dropout)
    act, drop = bn.act, bn.drop
    new = convert_model(bn)
    assert type(new) is BatchRenormAct2d and new.act is act and new.drop is drop
    assert [n for n, _ in new.named_children()] == ["drop", "act"]
    back = revert_model(new)
    assert type(back) is BatchNormAct2d and back.act is act and back.drop is drop


def test_sync_batchnorm_rank_is_chosen_by_keyword() -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert type(model[1]) is nn.SyncBatchNorm
    assert type(convert_model(copy.deepcopy(model))[1]) is BatchRenorm2d  # default: 2d
    assert type(convert_model(copy.deepcopy(model), sync_batchnorm_dim=1)[1]) is BatchRenorm1d
    assert type(convert_model(copy.deepcopy(model), sync_batchnorm_dim=3)[1]) is BatchRenorm3d
    with pytest.raises(ValueError, match="sync_batchnorm_dim must be 1, 2 or 3, got sync_batchnorm_dim=4"):
        convert_model(model, sync_batchnorm_dim=4)
    # timm's SyncBatchNormAct (made by timm's convert_sync_batchnorm) keeps its act and drop.
    timm_sync = timm.layers.convert_sync_batchnorm(nn.Sequential(BatchNormAct2d(4, act_layer=nn.SiLU)))
    assert type(timm_sync[0]) is SyncBatchNormAct
    act = timm_sync[0].act
    new = convert_model(timm_sync)
    assert type(new[0]) is BatchRenormAct2d and new[0].act is act
    assert conversion_summary(new).converted == {"SyncBatchNormAct -> BatchRenormAct2d": 1}


def test_frozen_batchnorm_left_alone_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    model = timm.create_model("resnet10t")
    model.layer1 = timm.layers.freeze_batch_norm_2d(model.layer1)
    model.add_module("frozen_act", FrozenBatchNormAct2d(4))
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert n_frozen > 0
    with caplog.at_level(logging.INFO, logger="lightning_brn"):
        model = convert_model(model)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == n_frozen
    assert isinstance(model.frozen_act, FrozenBatchNormAct2d)
    assert f"left alone: {n_frozen} FrozenBatchNorm2d, 1 FrozenBatchNormAct2d" in caplog.text
    s = conversion_summary(model)
    assert s.frozen == {"FrozenBatchNorm2d": n_frozen, "FrozenBatchNormAct2d": 1}
    # A model whose only batchnorms are frozen: nothing to do, with a warning.
    with pytest.warns(UserWarning, match="no batchnorm .*frozen batchnorms are left alone: 1 FrozenBatchNorm2d"):
        convert_model(nn.Sequential(FrozenBatchNorm2d(3)))


class _PlainSubclass(nn.BatchNorm2d):
    """A subclass that keeps batchnorm's forward: converted."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


class _OverridingSubclass(nn.BatchNorm2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 2


class _ExtraParamSubclass(nn.BatchNorm2d):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.scale = nn.Parameter(torch.ones(1))


class _BareBatchNorm(_BatchNorm):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


def test_faithful_subclass_converts() -> None:
    model = convert_model(nn.Sequential(_PlainSubclass(3)))
    assert type(model[0]) is BatchRenorm2d
    assert conversion_summary(model).converted == {"_PlainSubclass -> BatchRenorm2d": 1}


@pytest.mark.parametrize(
    ("module", "match"),
    [
        pytest.param(
            SplitBatchNorm2d(4, num_splits=2),
            r"module '1' of type timm\.layers\.split_batchnorm\.SplitBatchNorm2d: it overrides batchnorm's forward",
            id="SplitBatchNorm2d",
        ),
        pytest.param(_OverridingSubclass(4), r"_OverridingSubclass: it overrides batchnorm's forward", id="forward-override"),
        pytest.param(nn.LazyBatchNorm2d(), r"LazyBatchNorm2d: it is an uninitialized lazy batchnorm", id="lazy"),
        pytest.param(_ExtraParamSubclass(4), r"extra parameters/buffers \['scale'\]", id="extra-param"),
        pytest.param(_BareBatchNorm(4), r"_BareBatchNorm: it is a _BatchNorm subclass outside BatchNorm1d/2d/3d/SyncBatchNorm", id="bare"),
    ],
)
def test_unsupported_batchnorm_is_refused(module: nn.Module, match: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), module)
    with pytest.raises(TypeError, match=match):
        convert_model(model)
    with pytest.raises(TypeError, match=r"exclude=\['1'\]"):
        convert_model(model)
    assert convert_model(model, exclude="1")[1] is module  # the suggested way out works


def test_initialized_lazy_batchnorm_converts() -> None:
    bn = nn.LazyBatchNorm2d()
    bn(torch.randn(2, 3, 4, 4))
    assert type(convert_model(bn)) is BatchRenorm2d


# ----------------------------------------------------------------------------------------------------------------
# Arguments, exclude, idempotence, messages.


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rmax": 0.5}, ValueError, r"rmax must be >= 1"),
        ({"dmax": -1.0}, ValueError, r"dmax must be >= 0"),
        ({"momentum": 2.0}, ValueError, r"momentum .* must be in \[0, 1\], got momentum=2.0"),
        ({"microbatch_size": 0}, ValueError, r"microbatch_size must be >= 1"),
        ({"exclude": 3}, TypeError, r"exclude must be a module-name pattern.*got 3 of type int"),
        ({"exclude": ["head", 3]}, TypeError, r"got a collection holding 3 of type int"),
        ({"exclude": nn.ReLU()}, TypeError, r"exclude must be .*got ReLU\(\) of type ReLU"),
        ({"exclude": {"0": True}}, TypeError, r"exclude must be .*got \{'0': True\} of type dict"),
        # a class is callable, but not a predicate: it is refused with the predicate that keeps its modules
        ({"exclude": nn.BatchNorm2d}, TypeError, r"got the class torch\.nn\.modules\.batchnorm\.BatchNorm2d.*isinstance"),
        ({"exclude": nn.Identity}, TypeError, r"got the class torch\.nn\.modules\.linear\.Identity"),
        ({"exclude": lambda module: True}, TypeError, r"cannot be called as exclude\(name, module\)"),
        ({"sync_batchnorm_dim": lambda name: 1}, TypeError, r"cannot be called as sync_batchnorm_dim\(name, module\)"),
        ({"sync_batchnorm_dim": "2"}, ValueError, r"sync_batchnorm_dim must be 1, 2 or 3, got sync_batchnorm_dim='2'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        convert_model(nn.Sequential(nn.BatchNorm2d(2)), **kwargs)


@pytest.mark.parametrize("bad", [None, "resnet18", torch.zeros(3), [nn.BatchNorm2d(2)]])
def test_not_a_module(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"convert_model expects a torch.nn.Module, got .* of type"):
        convert_model(bad)
    with pytest.raises(TypeError, match=r"revert_model expects a torch.nn.Module"):
        revert_model(bad)


def test_scripted_module_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(nn.Sequential(nn.BatchNorm2d(2)))
    with pytest.raises(TypeError, match="cannot change a scripted module"):
        convert_model(scripted)


def test_batchnorm_inside_a_scripted_submodule_is_refused_not_skipped() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with_bn = torch.jit.script(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
        with_subclass = torch.jit.script(nn.Sequential(_PlainSubclass(2)))
        with_frozen = torch.jit.script(nn.Sequential(FrozenBatchNorm2d(2)))
        without_bn = torch.jit.script(nn.Sequential(nn.Conv2d(2, 2, 1)))
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Sequential(with_bn))
    with pytest.raises(TypeError, match=r"module '1\.0' .*scripted \(torch\.jit\) module holding BatchNorm2d"):
        convert_model(model)
    assert type(model[0]) is nn.BatchNorm2d and model[1][0] is with_bn  # nothing changed
    assert type(convert_model(model, exclude="1.0")[0]) is BatchRenorm2d
    with pytest.raises(TypeError, match=r"module '1' .*scripted \(torch\.jit\) module holding _PlainSubclass"):
        convert_model(nn.Sequential(nn.BatchNorm2d(2), with_subclass))  # a subclass: found by its buffers
    assert convert_model(nn.Sequential(nn.BatchNorm2d(2), with_frozen))[1] is with_frozen  # frozen: no counter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with_instance_norm = torch.jit.script(nn.Sequential(nn.InstanceNorm2d(2, track_running_stats=True)))
    # batchnorm's three buffers, but not a batchnorm (the eager InstanceNorm is left alone as well)
    assert convert_model(nn.Sequential(nn.BatchNorm2d(2), with_instance_norm))[1] is with_instance_norm
    # a scripted submodule without batchnorm is kept as it is
    other = convert_model(nn.Sequential(nn.BatchNorm2d(2), without_bn))
    assert type(other[0]) is BatchRenorm2d and other[1] is without_bn
    x = torch.randn(2, 2, 3, 3)
    torch.testing.assert_close(other.eval()(x), without_bn(other[0](x)))


def test_sync_batchnorm_rank_per_module_for_models_mixing_ranks() -> None:
    """levit mixes BatchNorm1d and BatchNorm2d: after convert_sync_batchnorm no single rank fits all its layers."""
    torch.manual_seed(0)
    ref = timm.create_model("levit_128s", img_size=64).eval()
    ranks = {n: 1 if isinstance(m, nn.BatchNorm1d) else 2 for n, m in ref.named_modules() if isinstance(m, _BatchNorm)}
    assert set(ranks.values()) == {1, 2}
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)).eval()
    calls: list[str] = []

    def rank(name: str, module: nn.Module) -> int:
        calls.append(name)
        assert type(module) is nn.SyncBatchNorm
        return ranks[name]

    model = convert_model(synced, sync_batchnorm_dim=rank)
    assert sorted(calls) == sorted(ranks)  # once per SyncBatchNorm
    for name, m in model.named_modules():
        if name in ranks:
            assert type(m) is (BatchRenorm1d if ranks[name] == 1 else BatchRenorm2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"sync_batchnorm_dim must give 1, 2 or 3 .*got 4 for module '.*' \(a SyncBatchNorm\)"):
        convert_model(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)), sync_batchnorm_dim=lambda n, m: 4)


def test_zero_eps_batchnorm_error_names_the_module() -> None:
    with pytest.raises(ValueError, match=r"module '0\.1' .*eps must be > 0"):
        convert_model(nn.Sequential(nn.Sequential(nn.Identity(), nn.BatchNorm2d(2, eps=0.0))))


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 9)),
    )


@pytest.mark.parametrize(
    ("exclude", "kept"),
    [
        pytest.param("1.1", {"1.1"}, id="pattern"),
        pytest.param("2", {"2.1"}, id="subtree"),
        pytest.param(["0.*", "2.1"], {"0.1", "2.1"}, id="patterns"),
        pytest.param(("*",), {"0.1", "1.1", "2.1"}, id="all"),
        pytest.param({"1.*", "2.*"}, {"1.1", "2.1"}, id="set"),
        pytest.param(lambda name, m: isinstance(m, nn.BatchNorm1d), {"2.1"}, id="predicate"),
        pytest.param(lambda name, m: name.startswith("1"), {"1.1"}, id="predicate-subtree"),
    ],
)
def test_exclude(exclude: Any, kept: set[str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning_brn"), warnings.catch_warnings():
        warnings.simplefilter("error")  # excluding everything is not "no batchnorm"
        model = convert_model(_model(), exclude=exclude)
    assert {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)} == kept
    assert {n for n, m in model.named_modules() if is_batch_renorm(m)} == {"0.1", "1.1", "2.1"} - kept
    assert "excluded: " in caplog.text
    assert conversion_summary(model).batchnorm == {
        k: v for k, v in {"BatchNorm2d": len(kept - {"2.1"}), "BatchNorm1d": int("2.1" in kept)}.items() if v
    }


def test_summary_is_logged_and_returned(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(_model(), BatchNormAct2d(4))
    with caplog.at_level(logging.INFO, logger="lightning_brn"):
        model = convert_model(model)
    line = "convert_model: 2 BatchNorm2d -> BatchRenorm2d, 1 BatchNorm1d -> BatchRenorm1d, 1 BatchNormAct2d -> BatchRenormAct2d"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lightning_brn")] == [line]
    assert {r.name for r in caplog.records if r.name.startswith("lightning_brn")} == {"lightning_brn.convert"}
    s = conversion_summary(model)
    assert isinstance(s, ConversionSummary) and s.num_renorm == 4
    assert s.renorm == {"BatchRenorm2d": 2, "BatchRenorm1d": 1, "BatchRenormAct2d": 1}
    assert s.names == ["0.0.1", "0.1.1", "0.2.1", "1"]
    assert str(s) == line.removeprefix("convert_model: ")
    s = conversion_summary(nn.Sequential(BatchRenorm2d(2), nn.BatchNorm2d(2)))
    assert str(s) == "no converted layers; built as Batch Renorm: 1 BatchRenorm2d; batchnorm kept: 1 BatchNorm2d"


def test_converting_twice_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    model = convert_model(_model(), rmax=2.0)
    modules = list(model.modules())
    with caplog.at_level(logging.INFO, logger="lightning_brn"), warnings.catch_warnings():
        warnings.simplefilter("error")
        again = convert_model(model, rmax=5.0)
    assert again is model and list(again.modules()) == modules
    assert again[0][1].rmax == 2.0
    assert "nothing converted; already Batch Renorm: 2 BatchRenorm2d, 1 BatchRenorm1d" in caplog.text


def test_model_without_batchnorm_warns_and_is_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), nn.LayerNorm(4))
    modules = list(model.modules())
    with pytest.warns(UserWarning, match=r"convert_model found no batchnorm in Sequential; the model is returned unchanged"):
        assert convert_model(model) is model
    assert list(model.modules()) == modules
    with pytest.warns(UserWarning, match="revert_model found no Batch Renorm layer"):
        assert revert_model(model) is model


def test_shared_batchnorm_is_converted_once() -> None:
    bn = nn.BatchNorm2d(3)
    model = convert_model(nn.Sequential(bn, nn.ReLU(), bn))
    assert isinstance(model[0], BatchRenorm2d) and model[0] is model[2]
    back = revert_model(model)
    assert type(back[0]) is nn.BatchNorm2d and back[0] is back[2] and back[0].weight is bn.weight


def test_revert_of_layer_built_as_renorm_uses_its_momentum() -> None:
    model = nn.Sequential(BatchRenorm2d(3, momentum=0.05, rmax=2.0), BatchRenormAct2d(3, act_layer="silu"))
    back = revert_model(model)
    assert type(back[0]) is nn.BatchNorm2d and back[0].momentum == 0.05
    assert type(back[1]) is BatchNormAct2d and back[1].momentum == 0.01 and isinstance(back[1].act, nn.SiLU)


def test_revert_refuses_overriding_subclass() -> None:
    class Doubling(BatchRenorm2d):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(input)

    match = r"revert_model cannot revert module '0' of type .*Doubling: it overrides the forward of BatchRenorm2d"
    with pytest.raises(TypeError, match=match):
        revert_model(nn.Sequential(Doubling(3)))


# ----------------------------------------------------------------------------------------------------------------
# What else lives on a batchnorm module: hooks and parametrizations; and refusals that change nothing.


class _Softplus(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(w)


class _Scale(nn.Module):  # a parametrization with a right inverse: registering it rewrites the original
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2.0 * w

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / 2.0


def _parametrized_bn() -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(-1.0, 1.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    parametrize.register_parametrization(bn, "weight", _Softplus())
    parametrize.register_parametrization(bn, "weight", _Scale())
    parametrize.register_parametrization(bn, "bias", _Scale())
    return bn


def test_weight_and_bias_parametrizations_move_both_ways() -> None:
    bn = _parametrized_bn()
    originals = (bn.parametrizations.weight.original, bn.parametrizations.bias.original)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn).eval()
    x = torch.randn(4, 3, 5, 5)
    ref = model(x)
    state = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    model = convert_model(model, rmax=3.0, dmax=5.0)
    layer = model[1]
    assert isinstance(layer, BatchRenorm2d) and parametrize.is_parametrized(layer, "weight")
    assert (layer.parametrizations.weight.original, layer.parametrizations.bias.original) == originals
    assert [type(p) for p in layer.parametrizations.weight] == [_Softplus, _Scale]
    assert torch.equal(model(x), ref)  # gamma = 2 softplus(w), beta = 2 b: the same function as before
    assert sorted(model.state_dict()) == sorted(state)
    model.load_state_dict(state, strict=True)
    assert conversion_summary(model).converted == {"BatchNorm2d -> BatchRenorm2d": 1}

    model.train()  # the optimizer built before conversion trains the originals through the parametrizations
    before = [p.detach().clone() for p in originals]
    model(x).square().mean().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(originals, before))

    model.eval()
    out = model(x)
    back = revert_model(model)
    assert type(back[1]).__name__ == "ParametrizedBatchNorm2d" and isinstance(back[1], nn.BatchNorm2d)
    assert back[1].parametrizations.weight.original is originals[0]
    assert torch.equal(back(x), out)
    nn.Sequential(nn.Conv2d(3, 3, 1), _parametrized_bn()).load_state_dict(back.state_dict(), strict=True)


def test_parametrized_running_statistic_is_refused_and_nothing_changes() -> None:
    bn = nn.BatchNorm2d(3)
    parametrize.register_parametrization(bn, "running_var", nn.Identity())
    first = nn.BatchNorm2d(3)
    model = nn.Sequential(first, bn)
    with pytest.raises(TypeError, match=r"module '1' .*parametrizations .* on \['running_var'\]"):
        convert_model(model)
    assert model[0] is first and model[1] is bn
    renorm = BatchRenorm2d(3)
    parametrize.register_parametrization(renorm, "running_mean", nn.Identity())
    model = nn.Sequential(BatchRenorm2d(3), renorm)
    kept = model[0]
    with pytest.raises(TypeError, match=r"revert_model cannot revert module '1' .*\['running_mean'\]"):
        revert_model(model)
    assert model[0] is kept and model[1] is renorm


def test_hooks_move_with_the_layer_both_ways() -> None:
    bn = nn.BatchNorm2d(3)
    calls: list[str] = []
    handles = [
        bn.register_forward_pre_hook(lambda m, args: calls.append("pre")),
        bn.register_forward_hook(lambda m, args, out: calls.append("fwd")),
        bn.register_forward_hook(lambda m, args, kwargs, out: calls.append("fwd-kw"), with_kwargs=True),
        bn.register_full_backward_hook(lambda m, gin, gout: calls.append("bwd")),
    ]
    bn.register_state_dict_post_hook(lambda m, sd, prefix, local_metadata: calls.append("sd"))
    # a load pre-hook is called with its module, which torch keeps as a weak reference: it must be the new layer
    handles.append(bn.register_load_state_dict_pre_hook(lambda m, *args: calls.append(f"load:{type(m).__name__}")))
    model = convert_model(nn.Sequential(nn.Conv2d(3, 3, 1), bn))
    del bn
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    model(x).sum().backward()
    model.load_state_dict(model.state_dict())
    assert isinstance(model[1], BatchRenorm2d)
    assert calls == ["pre", "fwd", "fwd-kw", "bwd", "sd", "load:BatchRenorm2d"]

    calls.clear()
    back = revert_model(model)
    del model
    back(x).sum().backward()
    back.load_state_dict(back.state_dict())
    assert type(back[1]) is nn.BatchNorm2d and calls == ["pre", "fwd", "fwd-kw", "bwd", "sd", "load:BatchNorm2d"]

    calls.clear()
    for h in handles:  # the handles of the original registrations still remove them
        h.remove()
    back(x).sum().backward()
    assert calls == []


def test_refused_conversion_changes_nothing() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4), SplitBatchNorm2d(4, num_splits=2)))
    before = list(model.modules())
    with pytest.raises(TypeError, match=r"module '1\.1' .*SplitBatchNorm2d"):
        convert_model(model)
    assert list(model.modules()) == before and type(model[0]) is nn.BatchNorm2d
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4, eps=0.0))
    with pytest.raises(ValueError, match=r"module '1' .*eps must be > 0"):
        convert_model(model)
    assert type(model[0]) is nn.BatchNorm2d
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(0))  # refused by the renorm layer's constructor
    with pytest.raises(ValueError, match=r"module '1' .*num_features must be a positive int"):
        convert_model(model)
    assert type(model[0]) is nn.BatchNorm2d


def test_refused_revert_changes_nothing() -> None:
    class Doubling(BatchRenorm2d):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(input)

    model = nn.Sequential(BatchRenorm2d(3), Doubling(3))
    first = model[0]
    with pytest.raises(TypeError, match=r"module '1' of type .*Doubling"):
        revert_model(model)
    assert model[0] is first


def test_exclude_predicate_is_called_once_per_module() -> None:
    seen: list[str] = []

    def predicate(name: str, module: nn.Module) -> bool:
        seen.append(name)
        return False

    model = _model()
    convert_model(model, exclude=predicate)
    assert sorted(seen) == sorted(n for n, _ in _model().named_modules())


def test_exclude_pattern_matching_no_module_is_refused_before_any_change():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match=r"exclude pattern\(s\) 'head\.\*' match no module of Sequential; .*'1', '2\.0'"):
        convert_model(model, exclude=["2.*", "head.*"])
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[2][0], nn.BatchNorm2d)
    out = convert_model(model, exclude=(p for p in ["2.*"]))  # a generator is read once, and works
    assert isinstance(out[1], BatchRenorm2d) and isinstance(out[2][0], nn.BatchNorm2d)


# --------------------------------------------------------------------------------------------- sync=True
def _sync_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3), BatchNormAct2d(4, act_layer=nn.SiLU), nn.Flatten(2),
        nn.BatchNorm1d(4),
    )
    with torch.no_grad():  # moving averages and affine parameters away from their initial values
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model


def test_convert_with_sync_makes_sync_batch_renorm_with_the_same_tensors_and_reverts_to_batchnorm() -> None:
    from lightning_brn.distributed import SyncBatchRenorm, SyncBatchRenormAct, revert_sync_batch_renorm

    model = _sync_model()
    reference = copy.deepcopy(model).eval()
    local = convert_model(copy.deepcopy(model), rmax=2.0, dmax=0.5, momentum=0.1)
    params = [id(p) for p in model.parameters()]
    act = model[2].act
    synced = convert_model(model, rmax=2.0, dmax=0.5, momentum=0.1, sync=True)
    assert [type(m) for m in synced] == [nn.Conv2d, SyncBatchRenorm, SyncBatchRenormAct, nn.Flatten, SyncBatchRenorm]
    assert synced[2].act is act and [id(p) for p in synced.parameters()] == params
    assert all(synced[i].process_group is None and synced[i].rmax == 2.0 and synced[i].momentum == 0.1 for i in (1, 2, 4))
    assert conversion_summary(synced).converted == {
        "BatchNorm2d -> SyncBatchRenorm": 1, "BatchNormAct2d -> SyncBatchRenormAct": 1, "BatchNorm1d -> SyncBatchRenorm": 1,
    }
    x = torch.randn(6, 3, 5, 5)
    torch.testing.assert_close(synced.eval()(x), reference(x))  # eval: the batchnorm's function
    # training on one process: the local layers' step (r, d clipped by rmax 2 / dmax 0.5), the same moving averages
    torch.testing.assert_close(synced.train()(x), local.train()(x))
    torch.testing.assert_close(synced[4].running_var, local[4].running_var)
    # back to the local layers, or to the batchnorm they were made from (with batchnorm's own momentum)
    back = revert_model(copy.deepcopy(synced))
    assert [type(m) for m in back] == [nn.Conv2d, nn.BatchNorm2d, BatchNormAct2d, nn.Flatten, nn.BatchNorm1d]
    assert back[1].momentum == 0.3 and isinstance(back[2].act, nn.SiLU)
    torch.testing.assert_close(back.eval()(x), synced.eval()(x))
    locals_ = revert_sync_batch_renorm(synced)
    assert [type(m) for m in locals_] == [nn.Conv2d, BatchRenorm2d, BatchRenormAct2d, nn.Flatten, BatchRenorm1d]


def test_convert_with_sync_passes_the_process_group_and_revert_keeps_it_for_layers_built_as_such() -> None:
    from lightning_brn.distributed import SyncBatchRenorm

    group = object()  # stands for a torch.distributed ProcessGroup (only stored until a distributed forward)
    assert convert_model(nn.Sequential(nn.BatchNorm2d(4)), sync=True, process_group=group)[0].process_group is group
    built = nn.Sequential(nn.Linear(2, 4), SyncBatchRenorm(4, momentum=0.2, process_group=group))
    back = revert_model(built)
    assert type(back[1]) is nn.SyncBatchNorm and back[1].process_group is group and back[1].momentum == 0.2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sync": True, "microbatch_size": 4}, ValueError, r"sync=True takes no microbatch_size \(got microbatch_size=4\)"),
        ({"process_group": "g"}, ValueError, r"process_group='g' is only used with sync=True"),
        ({"sync": "yes"}, TypeError, r"sync must be a bool, got sync='yes'"),
    ],
)
def test_convert_with_sync_refuses_bad_combinations_before_any_change(kwargs, error, match) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(error, match=match):
        convert_model(model, **kwargs)
    assert type(model[1]) is nn.BatchNorm2d
