"""lightning_brn.layers: batchnorm-compatible state, validation, dtypes, memory formats, compile, sync."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from lightning_brn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormAct2d, is_batch_renorm
from lightning_brn.functional import batch_renorm

# every test runs with the C++ CPU kernels and with the Python path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("eager_backend")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PAIRS = [
    (BatchRenorm1d, nn.BatchNorm1d, (8, 5)),
    (BatchRenorm1d, nn.BatchNorm1d, (8, 5, 7)),
    (BatchRenorm2d, nn.BatchNorm2d, (8, 5, 4, 3)),
    (BatchRenorm3d, nn.BatchNorm3d, (4, 5, 2, 3, 3)),
]
IDS = ["1d-NC", "1d-NCL", "2d", "3d"]


def _randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
        module.num_batches_tracked.fill_(7)
    return module


# --------------------------------------------------------------------------- batchnorm equivalence
@pytest.mark.parametrize("brn_cls, bn_cls, shape", PAIRS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmax1_dmax0_equals_batchnorm_training(brn_cls, bn_cls, shape, dtype):
    torch.manual_seed(0)
    bn = _randomize(bn_cls(5, momentum=0.01, dtype=dtype))
    brn = brn_cls(5, dtype=dtype)
    brn.load_state_dict(bn.state_dict())
    x = torch.randn(*shape, dtype=dtype) * 2 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_bn = brn(xa), bn(xb)
    torch.testing.assert_close(y, y_bn)
    g = torch.randn_like(y)
    y.backward(g)
    y_bn.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(brn.bias.grad, bn.bias.grad)
    assert brn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 8


@pytest.mark.parametrize("brn_cls, bn_cls, shape", PAIRS, ids=IDS)
def test_state_dict_round_trip_with_batchnorm_strict(brn_cls, bn_cls, shape):
    bn = _randomize(bn_cls(5)).eval()
    brn = brn_cls(5, rmax=3.0, dmax=5.0, momentum=0.05, microbatch_size=2).eval()
    brn.load_state_dict(bn.state_dict(), strict=True)
    x = torch.randn(*shape)
    torch.testing.assert_close(brn(x), bn(x), rtol=0, atol=0)
    # and back, after renorm training has moved the statistics
    brn.train()(torch.randn(*shape) * 3)
    bn2 = bn_cls(5)
    bn2.load_state_dict(brn.state_dict(), strict=True)
    assert set(brn.state_dict()) == set(bn.state_dict())
    torch.testing.assert_close(bn2.eval()(x), brn.eval()(x), rtol=0, atol=0)
    # the hyper-parameters are not state: they survive loading
    assert (brn.rmax, brn.dmax, brn.momentum) == (3.0, 5.0, 0.05)


def test_loads_old_batchnorm_checkpoint_without_num_batches_tracked():
    bn = _randomize(nn.BatchNorm2d(5))
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    brn = BatchRenorm2d(5)
    brn.load_state_dict(sd, strict=True)
    torch.testing.assert_close(brn.running_var, bn.running_var)


def test_eval_is_batchnorm_inference_with_moving_averages():
    brn = _randomize(BatchRenorm2d(5, rmax=3.0, dmax=5.0)).eval()
    x = torch.randn(3, 5, 4, 4)
    expected = nn.functional.batch_norm(x, brn.running_mean, brn.running_var, brn.weight, brn.bias, False, 0.0, brn.eps)
    torch.testing.assert_close(brn(x), expected, rtol=0, atol=0)
    before = (brn.running_mean.clone(), brn.running_var.clone(), brn.num_batches_tracked.clone())
    brn(x)
    for a, b in zip(before, (brn.running_mean, brn.running_var, brn.num_batches_tracked)):
        assert torch.equal(a, b), "eval must not touch the running statistics"


# --------------------------------------------------------------------------- hyper-parameters
def test_hyperparameters_read_back_as_floats_and_apply_at_next_forward():
    layer = BatchRenorm2d(3, rmax=2.0, dmax=1.0, momentum=0.1)
    assert isinstance(layer.rmax, float) and layer.rmax == 2.0
    assert isinstance(layer.dmax, float) and layer.dmax == 1.0
    assert isinstance(layer.momentum, float) and layer.momentum == 0.1
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4) * 5 + 3  # far from the initial (0, 1) statistics: r, d clip
    y_before = layer(x)
    layer.reset_running_stats()
    layer.rmax, layer.dmax, layer.momentum = 1.0, 0.0, 0.5
    y_after = layer(x)
    torch.testing.assert_close(y_after, nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True))
    assert not torch.allclose(y_before, y_after)
    sigma_b = (x.var(dim=(0, 2, 3), unbiased=False) + layer.eps).sqrt()
    expected_sigma = (1 + layer.eps) ** 0.5 * 0.5 + 0.5 * sigma_b
    torch.testing.assert_close(layer.running_var, expected_sigma**2 - layer.eps)


def test_repr_names_every_hyperparameter():
    text = repr(BatchRenorm2d(8, eps=1e-3, momentum=0.02, affine=False, rmax=3.0, dmax=5.0, microbatch_size=4))
    for part in ("8", "eps=0.001", "momentum=0.02", "affine=False", "track_running_stats=True", "rmax=3.0", "dmax=5.0",
                 "microbatch_size=4"):
        assert part in text


def test_dtype_conversion_keeps_schedule_values_exact():
    layer = BatchRenorm2d(3, rmax=1.0001, dmax=0.0003).half()
    assert layer.weight.dtype == torch.float16
    assert layer.rmax == 1.0001 and layer.dmax == 0.0003
    layer.double()
    assert layer.running_mean.dtype == torch.float64 and layer.rmax == 1.0001


def test_meta_device_then_to_empty_restores_the_schedule_buffers():
    """Built on the meta device and materialized with to_empty (as large-model loaders do): the buffers that
    compiled graphs read hold the schedule's values again, not uninitialized memory."""
    layer = BatchRenorm2d(4, rmax=2.0, dmax=0.5, momentum=0.05, device="meta").to_empty(device="cpu")
    assert layer._schedule.tolist() == [2.0, 0.5, 0.05]
    assert layer._schedule.shape == (3,) and layer._schedule.dtype == torch.float64


def test_deepcopy_and_pickle():
    layer = _randomize(BatchRenorm2d(4, rmax=2.5, dmax=0.5, microbatch_size=2))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert (clone.rmax, clone.dmax, clone.microbatch_size) == (2.5, 0.5, 2)
        torch.testing.assert_close(clone.running_var, layer.running_var)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).rmax == 2.5


def test_module_pickled_with_three_schedule_buffers_loads_into_one():
    """A whole module saved by an earlier revision (rmax, dmax, momentum in the one-element buffers _rmax, _dmax,
    _momentum) unpickles into the (3,) _schedule buffer: conversions, assignments and compiled graphs work."""
    layer = _randomize(BatchRenorm2d(4, rmax=2.5, dmax=0.5, momentum=0.05))
    old = copy.deepcopy(layer)
    del old._buffers["_schedule"]
    old._non_persistent_buffers_set.discard("_schedule")
    for name, value in (("_rmax", 2.5), ("_dmax", 0.5), ("_momentum", 0.05)):
        old.register_buffer(name, torch.tensor([value], dtype=torch.float64), persistent=False)
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "_rmax" not in loaded._buffers and loaded._schedule.tolist() == [2.5, 0.5, 0.05]
    assert loaded._non_persistent_buffers_set >= {"_schedule", "_correction"}
    assert loaded.state_dict().keys() == layer.state_dict().keys()
    loaded.double()
    loaded.rmax = 3.0
    assert loaded._schedule.tolist() == [3.0, 0.5, 0.05] and loaded._schedule.dtype == torch.float64
    ref = copy.deepcopy(layer).double()
    ref.rmax = 3.0
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(loaded(x), ref(x), rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(loaded, backend="eager", fullgraph=True)(x), ref(x), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(loaded.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"rmax": 0.5}, ValueError, r"rmax must be >= 1.*rmax=0.5"),
        ({"dmax": -1.0}, ValueError, r"dmax must be >= 0.*dmax=-1.0"),
        ({"momentum": 1.5}, ValueError, r"momentum .* must be in \[0, 1\].*momentum=1.5"),
        ({"momentum": -0.1}, ValueError, r"momentum=-0.1"),
        ({"momentum": None}, ValueError, r"momentum=None"),
        ({"eps": 0.0}, ValueError, r"eps must be > 0.*eps=0.0"),
        ({"eps": -1e-5}, ValueError, r"eps=-1e-05"),
        ({"microbatch_size": 0}, ValueError, r"microbatch_size must be >= 1.*microbatch_size=0"),
        ({"microbatch_size": 2.5}, TypeError, r"microbatch_size must be a positive int.*2.5"),
        ({"rmax": float("nan")}, ValueError, r"rmax must be a number, got rmax=nan"),
        ({"eps": float("inf")}, ValueError, r"eps must be finite, got eps=inf"),
        ({"rmax": "3"}, TypeError, r"rmax must be a real number.*'3'"),
        ({"affine": "yes"}, TypeError, r"affine must be a bool.*'yes'"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BatchRenorm2d(4, **kwargs)


@pytest.mark.parametrize("num_features", [0, -3, 2.0, True])
def test_bad_num_features(num_features):
    with pytest.raises(ValueError, match=rf"num_features must be a positive int, got num_features={num_features!r}"):
        BatchRenorm2d(num_features)


def test_bad_assignment_keeps_old_value():
    layer = BatchRenorm2d(4, rmax=2.0, dmax=1.0)
    with pytest.raises(ValueError, match=r"rmax=0.9"):
        layer.rmax = 0.9
    with pytest.raises(ValueError, match=r"dmax=-0.1"):
        layer.dmax = -0.1
    with pytest.raises(ValueError, match=r"momentum=2.0"):
        layer.momentum = 2.0
    with pytest.raises(ValueError, match=r"microbatch_size=-1"):
        layer.microbatch_size = -1
    assert (layer.rmax, layer.dmax, layer.momentum, layer.microbatch_size) == (2.0, 1.0, 0.01, None)


@pytest.mark.parametrize(
    "layer, shape, match",
    [
        (BatchRenorm1d(4), (2, 4, 3, 3), r"expected 2D or 3D input.*got 4D input of shape \(2, 4, 3, 3\)"),
        (BatchRenorm2d(4), (2, 4, 3), r"expected 4D input.*got 3D input of shape \(2, 4, 3\)"),
        (BatchRenorm3d(4), (2, 4, 3, 3), r"expected 5D input.*got 4D input"),
        (BatchRenorm2d(4), (2, 3, 5, 5), r"BatchRenorm2d\(4\) got input with 3 channels.*expected 4 channels"),
        (BatchRenorm1d(4), (8, 6), r"BatchRenorm1d\(4\) got input with 6 channels"),
    ],
)
def test_bad_inputs(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(*shape))
    assert layer.num_batches_tracked.item() == 0, "a rejected input must not count as a step"


@pytest.mark.parametrize("cls, shape", [(BatchRenorm2d, (6, 3, 2, 2)), (BatchRenormAct2d, (6, 3, 2, 2)),
                                        (BatchRenorm1d, (6, 3))])
def test_num_batches_tracked_counts_as_batchnorm_does(cls, shape):
    """Training calls count; eval calls do not, also with the running statistics removed (batch statistics in
    eval mode, as batchnorm then uses)."""
    bn_cls = {BatchRenorm1d: nn.BatchNorm1d}.get(cls, nn.BatchNorm2d)
    ours, theirs = cls(3), bn_cls(3)
    x = torch.randn(*shape)
    for layer in (ours, theirs):
        for _ in range(2):
            layer.train()(x)
        layer.eval()(x)
        layer.running_mean = layer.running_var = None
        layer.eval()(x)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 2


def test_microbatch_errors_before_any_state_changes():
    layer = BatchRenorm2d(3, microbatch_size=4)
    before = layer.running_mean.clone()
    with pytest.raises(ValueError, match=r"microbatch_size=4 does not divide the batch size 6"):
        layer(torch.randn(6, 3, 2, 2) + 5)
    assert torch.equal(layer.running_mean, before)
    assert layer.num_batches_tracked.item() == 0, "a rejected input must not count as a step"
    one_value = BatchRenorm1d(3, microbatch_size=1)
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        one_value(torch.randn(4, 3))
    assert one_value.num_batches_tracked.item() == 0
    # eval mode ignores microbatches (inference uses moving averages)
    layer.eval()(torch.randn(6, 3, 2, 2))


# --------------------------------------------------------------------------- options
def test_microbatches_are_normalized_independently():
    torch.manual_seed(0)
    layer = BatchRenorm2d(3, microbatch_size=2)
    x = torch.randn(6, 3, 4, 4) * torch.arange(1, 7).view(6, 1, 1, 1)
    y = layer(x)
    for g in range(3):
        xg = x[2 * g : 2 * g + 2]
        torch.testing.assert_close(y[2 * g : 2 * g + 2], nn.functional.batch_norm(xg, None, None, training=True))


@pytest.mark.parametrize("brn_cls, bn_cls, shape", PAIRS, ids=IDS)
def test_affine_false_and_no_running_stats_behave_as_batchnorm(brn_cls, bn_cls, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 2
    for kwargs in ({"affine": False}, {"track_running_stats": False}, {"affine": False, "track_running_stats": False}):
        brn, bn = brn_cls(5, rmax=3.0, dmax=5.0, **kwargs), bn_cls(5, **kwargs)
        assert set(brn.state_dict()) == set(bn.state_dict())
        if brn.affine:
            assert brn.weight is not None
        else:
            assert brn.weight is None and brn.bias is None
        if not brn.track_running_stats:
            assert brn.running_mean is None and brn.num_batches_tracked is None
            # no running statistics: nothing to renormalize against -> batchnorm with batch statistics, in both modes
            torch.testing.assert_close(brn(x), bn(x))
            torch.testing.assert_close(brn.eval()(x), bn.eval()(x))
        else:
            brn(x)
            bn.momentum = None  # (only to reach the same place; compare eval on loaded stats)
            bn.load_state_dict(brn.state_dict())
            torch.testing.assert_close(brn.eval()(x), bn.eval()(x))


def test_track_running_stats_switched_off_after_construction_freezes_statistics():
    layer = BatchRenorm2d(3, rmax=3.0, dmax=5.0)
    layer.track_running_stats = False  # what Lightning's BaseFinetuning.freeze does to batchnorm
    before = layer.running_mean.clone()
    x = torch.randn(4, 3, 2, 2) + 4
    torch.testing.assert_close(layer(x), nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True))
    assert torch.equal(layer.running_mean, before)


def test_channels_last_in_channels_last_out():
    for mb in (None, 2):
        layer = BatchRenorm2d(8, rmax=3.0, dmax=5.0, microbatch_size=mb)
        ref = copy.deepcopy(layer)
        x = torch.randn(4, 8, 5, 6)
        xc = x.to(memory_format=torch.channels_last).requires_grad_()
        y = layer(xc)
        assert y.is_contiguous(memory_format=torch.channels_last)
        y.sum().backward()
        assert xc.grad.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ref(x))
    y3 = BatchRenorm3d(4)(torch.randn(2, 4, 3, 3, 3).to(memory_format=torch.channels_last_3d))
    assert y3.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_half_statistics_in_float32(dtype):
    torch.manual_seed(0)
    layer = BatchRenorm2d(4, rmax=2.0, dmax=1.0)
    ref = copy.deepcopy(layer)
    x = (torch.randn(8, 4, 6, 6) * 3 + 100).to(dtype)  # a large mean: half-precision statistics would be off
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x.requires_grad_())
    assert y.dtype == dtype
    assert layer.running_mean.dtype == torch.float32
    y_ref = ref(x.detach().float())
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == dtype


def test_act_layer_applies_drop_and_act_like_timm():
    timm_layers = pytest.importorskip("timm.layers")
    bn_act = timm_layers.BatchNormAct2d(6, act_layer="gelu", drop_layer=nn.Dropout)
    brn_act = BatchRenormAct2d(6, act_layer="gelu", drop_layer=nn.Dropout, rmax=2.0)
    assert type(brn_act.act) is type(bn_act.act) and type(brn_act.drop) is nn.Dropout
    brn_act.load_state_dict(_randomize(bn_act).state_dict(), strict=True)
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(brn_act.eval()(x), bn_act.eval()(x))
    assert isinstance(BatchRenormAct2d(6, apply_act=False).act, nn.Identity)
    assert is_batch_renorm(brn_act) and not is_batch_renorm(bn_act)


# --------------------------------------------------------------------------- compile
class _CompileCounter:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _net(mb=None):
    return nn.Sequential(nn.Conv2d(3, 8, 3), BatchRenorm2d(8, microbatch_size=mb), nn.ReLU(), nn.Conv2d(8, 4, 1),
                         BatchRenormAct2d(4, act_layer="silu"), nn.Flatten(), nn.Linear(4 * 6 * 6, 10),
                         BatchRenorm1d(10))


def test_compile_changing_hyperparameters_every_step_does_not_recompile():
    torch._dynamo.reset()
    counter = _CompileCounter()
    model = _net()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for step in range(6):
        for m in model.modules():
            if is_batch_renorm(m):
                m.rmax = 1.0 + 0.3 * step
                m.dmax = 0.5 * step
                m.momentum = 0.01 * (step + 1)
                m.track_correction = True
        compiled(torch.randn(4, 3, 8, 8)).sum().backward()
    assert counter.graphs == 1, f"recompiled {counter.graphs - 1} times"


def _float_symbols_of_compiled_step(model: nn.Module) -> list[str]:
    """The symbolic floats torch.compile creates for ``model``: each one is a guard evaluated in Python on
    every call of the compiled graph."""
    found: list[str] = []

    def backend(gm, example_inputs):
        shape_env = torch._guards.TracingContext.get().fake_mode.shape_env
        found.extend(str(s) for s in shape_env.var_to_val if str(s).startswith("zf"))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(4, model.num_features, 3, 3))
    return found


class _ZeroDimHyperparameters(BatchRenorm2d):
    """rmax, dmax and momentum in three 0-dim buffers: the variant the layers avoid."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        for name, value in (("r0", 2.0), ("d0", 1.0), ("m0", 0.1)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64), persistent=False)

    def forward(self, input):
        return batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias, True,
                            self.m0, self.eps, self.r0, self.d0)


def test_compiled_step_guards_no_hyperparameter_values():
    """rmax, dmax and momentum are slices of one graph input (the (3,) buffer ``_schedule``): no symbolic float
    (and no per-call Python guard reading their values) is created for them; 0-dim buffers would create three."""
    model = BatchRenorm2d(4, rmax=2.0, dmax=1.0)
    assert _float_symbols_of_compiled_step(model) == []
    assert len(_float_symbols_of_compiled_step(_ZeroDimHyperparameters(4))) == 3  # what the check catches


@pytest.mark.parametrize("mb, channels_last", [(None, False), (2, False), (2, True)])
def test_compiled_inductor_matches_eager(mb, channels_last):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _net(mb)
    for m in eager.modules():
        if is_batch_renorm(m):
            m.rmax, m.dmax, m.momentum = 1.5, 0.5, 0.2
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8) * 2 + 1
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(y_e)
        y_e.backward(g)
        y_c.backward(g)
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
    # the moving averages moved (so a backward that re-read the updated buffers would have been caught)
    assert eager[1].num_batches_tracked.item() == 2


# --------------------------------------------------------------------------- sync batchnorm
def test_convert_sync_batchnorm_never_touches_renorm_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), BatchRenorm2d(4, rmax=3.0), BatchRenormAct2d(4))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], nn.SyncBatchNorm)  # plain batchnorm is synchronized
    assert type(converted[2]) is BatchRenorm2d and converted[2].rmax == 3.0
    assert type(converted[3]) is BatchRenormAct2d
    assert not isinstance(BatchRenorm2d(4), nn.modules.batchnorm._BatchNorm)


def test_trainer_sync_batchnorm_keeps_renorm_layers(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset

    class Model(BoringModel):
        def __init__(self):
            super().__init__()
            self.layer = nn.Sequential(nn.Linear(32, 8), BatchRenorm1d(8, rmax=2.0), nn.Linear(8, 2))

        def train_dataloader(self):
            return torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=4)

    model = Model()
    trainer = lightning.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, strategy="ddp", sync_batchnorm=True, max_steps=2,
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model)
    kinds = [type(m) for m in trainer.model.modules()]
    assert BatchRenorm1d in kinds and nn.SyncBatchNorm not in kinds
    assert model.layer[1].num_batches_tracked.item() == 2


# --------------------------------------------------------------------------- cuda
@CUDA
@pytest.mark.parametrize("mb", [None, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(mb, channels_last):
    torch.manual_seed(0)
    cpu = _randomize(BatchRenorm2d(16, rmax=2.0, dmax=1.0, momentum=0.1, microbatch_size=mb))
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(8, 16, 9, 9) * 2 + 1
    xg = x.cuda()
    if channels_last:
        xg = xg.to(memory_format=torch.channels_last)
    x.requires_grad_()
    xg.requires_grad_()
    y, yg = cpu(x), gpu(xg)
    torch.testing.assert_close(yg.cpu(), y, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    yg.backward(g.cuda())
    torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var, rtol=1e-5, atol=1e-6)


@CUDA
def test_cuda_autocast_float16():
    layer = BatchRenorm2d(8, rmax=2.0, dmax=1.0).cuda()
    x = torch.randn(4, 8, 5, 5, device="cuda") * 3 + 50
    with torch.autocast("cuda", dtype=torch.float16):
        y = layer(x.half())
    assert y.dtype == torch.float16 and layer.running_mean.dtype == torch.float32
    y.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


# --------------------------------------------------------------------------- fx
def test_fx_symbolic_trace_records_one_call_per_layer_and_follows_new_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchRenormAct2d(4, rmax=2.0, dmax=1.0), nn.Flatten(), nn.Linear(36, 5),
                          BatchRenorm1d(5))
    reference = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)  # shares parameters and buffers with ``model``
    calls = [n for n in traced.graph.nodes if n.op == "call_function" and n.target.__name__.endswith("batch_renorm")]
    assert len(calls) == 2
    # the graph reads the layers' own buffers (the schedule included), not tensor constants of its own: its state
    # dict is the model's, and a checkpoint of the model loads into it strictly
    assert not [n.target for n in traced.graph.nodes if n.op == "get_attr" and "constant" in n.target]
    assert list(traced.state_dict()) == list(model.state_dict())
    traced.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    renorms = [m for m in model.modules() if is_batch_renorm(m)]
    assert [int(m.num_batches_tracked) for m in renorms] == [0, 0]  # tracing itself counts no batch
    torch.testing.assert_close(traced(x), reference(x))
    for m in list(model.modules()) + list(reference.modules()):
        if is_batch_renorm(m):
            m.rmax, m.dmax = 1.0, 0.0  # the traced graph reads the shared 0-dim buffers: no stale constants
    torch.testing.assert_close(traced(x), reference(x))
    # every call of the graph counts a batch, as the module does
    assert [int(m.num_batches_tracked) for m in renorms] == [2, 2]
    assert [int(m.num_batches_tracked) for m in reference.modules() if is_batch_renorm(m)] == [2, 2]
    # like any fx trace, the graph is specialized to the mode it was traced in: trace eval separately
    traced_eval = torch.fx.symbolic_trace(model.eval())
    torch.testing.assert_close(traced_eval(x), reference.eval()(x))


@pytest.mark.parametrize("mb", [None, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_can_be_modified_in_place(mb, channels_last):
    """An in-place activation after the layer (ReLU(inplace=True), timm's default) must work in training."""
    x = torch.randn(4, 3, 5, 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    model = nn.Sequential(BatchRenorm2d(3, rmax=2.0, microbatch_size=mb), nn.ReLU(inplace=True))
    reference = nn.Sequential(copy.deepcopy(model[0]), nn.ReLU())
    y = model(x)
    torch.testing.assert_close(y, reference(x))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- edge cases
def test_infinite_bounds_mean_no_clipping():
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=torch.float64) * 5 + 2
    layer = BatchRenorm1d(3, rmax=float("inf"), dmax=float("inf"), dtype=torch.float64)
    assert layer.rmax == float("inf")
    y = layer(x)
    mu_b, var_b = x.mean(0), x.var(0, unbiased=False)
    sigma = (1 + layer.eps) ** 0.5
    expected = (x - mu_b) / (var_b + layer.eps).sqrt() * ((var_b + layer.eps).sqrt() / sigma) + mu_b / sigma
    torch.testing.assert_close(y, expected)


def test_momentum_zero_leaves_moving_averages_exactly_unchanged():
    layer = _randomize(BatchRenorm2d(4, rmax=2.0, dmax=1.0, momentum=0.0))
    before = layer.running_mean.clone(), layer.running_var.clone()
    for _ in range(3):
        layer(torch.randn(8, 4, 3, 3) * 3 + 1)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert layer.num_batches_tracked.item() == 10


def test_microbatches_apply_to_training_batches_only():
    x = torch.randn(3, 3, 4, 4)
    layer = BatchRenorm2d(3, track_running_stats=False, microbatch_size=2).eval()
    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()
    torch.testing.assert_close(layer(x), bn(x))  # whole-batch statistics, any batch size


def test_bfloat16_microbatches_normalize_in_float32():
    x = (torch.randn(4, 2, 8, 8) + 100).bfloat16()
    y = BatchRenorm2d(2, microbatch_size=2)(x)
    assert y.dtype == torch.bfloat16
    xd = x.double()
    ref = torch.cat([nn.functional.batch_norm(xd[i : i + 2], None, None, training=True) for i in (0, 2)])
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1.6e-2)  # bfloat16 rounding of the output only


@pytest.mark.parametrize(
    "shape, kwargs, channels_last",
    [
        ((0, 3, 2, 2), {}, False),
        ((0, 3, 2, 2), {}, True),
        ((4, 3, 0, 2), {}, False),
        ((4, 3, 0, 2), {}, True),
        ((0, 3, 2, 2), {"microbatch_size": 2}, False),
        ((0, 3), {}, False),
        ((0, 3, 5), {}, False),
    ],
)
def test_empty_batch_behaves_as_batchnorm(shape, kwargs, channels_last):
    """Detection heads can see batches without an example: batchnorm returns an empty output, keeps its moving
    averages and counts the batch; renorm does the same in training and eval, whatever rmax and dmax are."""
    bn_cls, brn_cls = (nn.BatchNorm2d, BatchRenorm2d) if len(shape) == 4 else (nn.BatchNorm1d, BatchRenorm1d)
    bn, brn = bn_cls(3), brn_cls(3, rmax=2.0, dmax=1.0, **kwargs)
    for m in (bn, brn):
        with torch.no_grad():
            m.weight.copy_(torch.tensor([2.0, 3.0, 4.0]))
            m.bias.copy_(torch.tensor([0.5, 0.25, -1.0]))
            m.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
            m.running_var.copy_(torch.tensor([4.0, 5.0, 6.0]))
    x = torch.randn(*shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [m(xi) for m, xi in zip((bn, brn), xs)]
    assert ys[1].shape == ys[0].shape == x.shape
    if channels_last:
        assert ys[1].is_contiguous(memory_format=torch.channels_last)
    for y in ys:
        y.sum().backward()
    assert xs[1].grad.shape == x.shape
    torch.testing.assert_close(brn.weight.grad, torch.zeros(3))
    torch.testing.assert_close(brn.bias.grad, torch.zeros(3))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(brn, name), getattr(bn, name), rtol=0, atol=0)
    assert int(brn.num_batches_tracked) == 1
    brn.track_correction = True
    brn._correction.fill_(7.0)  # a previous batch's record
    brn(x)
    assert brn._correction.eq(0).all()  # nothing renormalized: count 0
    brn.track_correction = False
    assert brn.eval()(x).shape == x.shape
    assert int(brn.num_batches_tracked) == 2  # the two training calls; eval counts nothing


def test_double_backward_is_refused_not_silently_wrong():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    layer = BatchRenorm2d(3, rmax=2.0)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_1d_microbatches_under_autocast_match_float32(dtype):
    torch.manual_seed(0)
    layer = BatchRenorm1d(8, rmax=2.0, dmax=1.0, microbatch_size=4)
    ref = copy.deepcopy(layer)
    x = (torch.randn(16, 8) * 3 + 50).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x.requires_grad_())
    xr = x.detach().float().requires_grad_()
    y_ref = ref(xr)
    assert y.dtype == dtype and layer.running_var.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    g = torch.randn(16, 8)
    y.float().backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=5e-2, atol=5e-2)


# --------------------------------------------------------------------------- non-finite batches
def _train_with_one_bad_batch(model: nn.Module, forward=None, bad_step: int = 1, steps: int = 5) -> list[float]:
    """SGD with the usual guard (no step on a non-finite loss); batch ``bad_step`` holds one ``inf`` pixel."""
    forward = forward or model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for i in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        y = torch.randint(0, 2, (8,), generator=gen)
        if i == bad_step:
            x[0, 0, 0, 0] = float("inf")
        loss = nn.functional.cross_entropy(forward(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            opt.step()
    return losses


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


@pytest.mark.parametrize("rmax, dmax", [(1.0, 0.0), (3.0, 5.0)])
@pytest.mark.parametrize("microbatch_size", [None, 4])
def test_one_nonfinite_batch_does_not_break_training(rmax, dmax, microbatch_size):
    from lightning_brn import convert_model

    model = convert_model(_small_model(), rmax=rmax, dmax=dmax)
    model[1].microbatch_size = microbatch_size
    with pytest.warns(RuntimeWarning, match=r"BatchRenorm2d\(4\): 1 training batch\(es\) had non-finite statistics"):
        losses = _train_with_one_bad_batch(model)
    assert not torch.isfinite(torch.tensor(losses[1]))
    assert all(torch.isfinite(torch.tensor(losses[i])) for i in (0, 2, 3, 4)), losses
    layer = model[1]
    assert layer.nonfinite_batches == 1
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    assert layer.num_batches_tracked.item() == 5  # the bad batch is still a batch, as in batchnorm
    model.eval()
    assert torch.isfinite(model(torch.randn(4, 3, 8, 8))).all()


def test_nonfinite_channels_keep_their_averages_exactly_and_others_move():
    layer = BatchRenorm1d(3, momentum=0.5)
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(x)
    assert layer.running_mean[1] == before_mean[1] and layer.running_var[1] == before_var[1]  # held, bit for bit
    assert (layer.running_mean[[0, 2]] != before_mean[[0, 2]]).all()
    expected = BatchRenorm1d(3, momentum=0.5)
    expected(x[:, [0, 2, 2]].contiguous())  # the finite channels, alone: the same update
    torch.testing.assert_close(layer.running_mean[[0, 2]], expected.running_mean[[0, 1]])
    torch.testing.assert_close(layer.running_var[[0, 2]], expected.running_var[[0, 1]])


def test_nonfinite_warning_once_then_counted():
    import warnings

    layer = BatchRenorm2d(2)
    bad = torch.randn(4, 2, 3, 3)
    bad[0, 0, 0, 0] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            layer(bad)
        layer(torch.randn(4, 2, 3, 3))
        layer.eval()
    assert [type(w.message) for w in caught] == [RuntimeWarning]
    assert layer.nonfinite_batches == 3 and layer.report_nonfinite() == 3
    assert "nonfinite" not in "".join(layer.state_dict())  # batchnorm's state dict, unchanged


def test_nonfinite_under_compile_is_held_and_reported_on_eval():
    from lightning_brn import convert_model

    model = convert_model(_small_model(), rmax=3.0, dmax=5.0)
    compiled = torch.compile(model)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        losses = _train_with_one_bad_batch(model, forward=compiled)
        model.eval()  # compiled graphs run no Python per step: reported when training ends
    assert all(torch.isfinite(torch.tensor(losses[i])) for i in (0, 2, 3, 4)), losses
    assert model[1].nonfinite_batches == 1 and torch.isfinite(model[1].running_var).all()


# --------------------------------------------------------------------------- scripting and shape-only tracing
def test_torch_jit_script_says_to_revert_first():
    from lightning_brn import convert_model, revert_model

    model = convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    for target in (model[1], model):
        with pytest.raises(TypeError, match=r"BatchRenorm2d cannot be compiled by torch.jit.script: call .*revert_model"):
            torch.jit.script(target)
    scripted = torch.jit.script(revert_model(model).eval())  # the advice works
    assert scripted(torch.randn(2, 3, 5, 5)).shape == (2, 4, 3, 3)


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_meta_device_training_forward_and_measure_flops(microbatch_size):
    from lightning.fabric.utilities.throughput import measure_flops

    from lightning_brn import convert_model

    with torch.device("meta"):
        bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        brn = convert_model(copy.deepcopy(bn), rmax=3.0, dmax=5.0, microbatch_size=microbatch_size)
        x = torch.randn(4, 3, 16, 16)
    y = brn.train()(x)
    assert y.device.type == "meta" and y.shape == (4, 4, 14, 14)
    flops = [measure_flops(m.train(), lambda m=m: m(x), lambda y: y.sum()) for m in (bn, brn)]
    assert flops[0] == flops[1] > 0


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_fake_tensor_mode_training_forward_and_backward(microbatch_size):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_brn import convert_model

    model = convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), rmax=3.0, dmax=5.0,
                          microbatch_size=microbatch_size)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = model.train()(torch.randn(4, 3, 8, 8))
        y.sum().backward()
    assert y.shape == (4, 4, 6, 6)
