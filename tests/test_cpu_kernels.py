"""The C++ CPU kernels (lightning_brn/cpu_kernels.py, lightning_brn/csrc/renorm_cpu.cpp) against the Python path.

The Python path is itself checked against a literal Algorithm 1 (tests/test_functional.py, which, like
tests/test_layers.py, runs every test on both paths); here the two paths are compared on every layout and
option the C++ operator handles, in float64 to rounding level.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from lightning_brn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, cpu_kernels

HAS_TOOLCHAIN = shutil.which(os.environ.get("CXX", "c++")) is not None and importlib.util.find_spec("ninja") is not None
needs_cpp = pytest.mark.skipif(not cpu_kernels.enabled(), reason="LIGHTNING_BRN_CPP=0")


@pytest.fixture(scope="module")
def cpp() -> None:
    if not cpu_kernels.available():
        pytest.skip(f"C++ CPU kernels unavailable: {cpu_kernels.build_error()}")


@needs_cpp
@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="no C++ compiler or ninja on this machine")
def test_kernels_build_where_a_compiler_exists():
    assert cpu_kernels.available(), cpu_kernels.build_error()
    assert cpu_kernels.build_error() is None


def _case(name: str):
    g = torch.Generator().manual_seed(hash(name) % 1000)
    shapes = {
        "nchw": ((8, 6, 5, 5), None, BatchRenorm2d),
        "channels_last": ((8, 6, 5, 5), torch.channels_last, BatchRenorm2d),
        "nc": ((8, 6), None, BatchRenorm1d),
        "ncl": ((8, 6, 7), None, BatchRenorm1d),
        "ncdhw": ((8, 6, 3, 4, 5), None, BatchRenorm3d),
        "channels_last_3d": ((8, 6, 3, 4, 5), torch.channels_last_3d, BatchRenorm3d),
        "hw1": ((8, 6, 1, 1), None, BatchRenorm2d),
        "long_rows": ((8, 6, 40, 41), None, BatchRenorm2d),  # rows longer than one float partial sum block
        "many_rows_cl": ((8, 6, 40, 41), torch.channels_last, BatchRenorm2d),
        # enough channels for the per-channel fused NCHW kernels on up to 8 threads (6 channels: up to 1)
        "nchw_wide": ((4, 32, 5, 5), None, BatchRenorm2d),
        "long_rows_wide": ((4, 32, 33, 40), None, BatchRenorm2d),
        # channels-last groups of more than 64 rows, 160 channels: register blocks (64 floats or 32 doubles) and a
        # rest, on one thread or on each of two
        "channels_last_wide": ((8, 160, 6, 6), torch.channels_last, BatchRenorm2d),
        # channels-last statistics in several spans of rows (2048 rows per span at 32 channels), merged in order
        "channels_last_spans": ((8, 32, 40, 41), torch.channels_last, BatchRenorm2d),
    }
    shape, fmt, cls = shapes[name]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x, cls


LAYOUTS = [
    "nchw", "channels_last", "nc", "ncl", "ncdhw", "channels_last_3d", "hw1", "long_rows", "many_rows_cl", "nchw_wide",
    "long_rows_wide", "channels_last_wide", "channels_last_spans",
]


def _run(layer, x, use_cpp: bool, steps: int = 2):
    """``steps`` training steps of a copy of ``layer``; outputs, grads, running stats and record of each."""
    layer = copy.deepcopy(layer)
    out = []
    for i in range(steps):
        xi = (x * (1 + 0.3 * i) + 0.2 * i).detach().requires_grad_()
        with cpu_kernels.use_cpp(use_cpp):
            y = layer(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(10 + i), dtype=y.dtype)
        params = [xi] + [p for p in (layer.weight, layer.bias) if p is not None]
        grads = torch.autograd.grad(y, params, g)
        state = [t.clone() for t in (layer.running_mean, layer.running_var) if t is not None]
        out.append((y, y.stride(), grads, state, layer.correction_stats() if layer.track_correction else None))
    return out


def _assert_same(a, b, rtol=1e-12, atol=1e-12):
    for (ya, sa, ga, sta, ra), (yb, sb, gb, stb, rb) in zip(a, b):
        torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
        # same memory layout: equal strides on every dimension of size > 1 (a size-1 dimension's stride is free)
        assert [st for st, n in zip(sa, ya.shape) if n > 1] == [st for st, n in zip(sb, yb.shape) if n > 1], (sa, sb)
        for p, q in zip(ga, gb):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        for p, q in zip(sta, stb):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        assert ra == rb


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("microbatch_size", [None, 2, 4])
def test_cpp_equals_python_path_float64(cpp, layout, microbatch_size, clipping_layer):
    x, cls = _case(layout)
    layer = clipping_layer(cls, x.shape[1], microbatch_size=microbatch_size)
    _assert_same(_run(layer, x, True), _run(layer, x, False))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc", "nchw_wide"])
@pytest.mark.parametrize(
    "options",
    [
        dict(affine=False),
        dict(track_running_stats=False),
        dict(momentum=0.0),
        dict(momentum=0.7),  # aten's lerp switches formula at 0.5
        dict(track_correction=True),
        dict(track_correction=True, microbatch_size=2),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_cpp_equals_python_path_options(cpp, layout, options, clipping_layer):
    x, cls = _case(layout)
    options = dict(options)
    track = options.pop("track_correction", False)
    layer = clipping_layer(cls, x.shape[1], **options)
    layer.track_correction = track
    _assert_same(_run(layer, x, True), _run(layer, x, False))


def test_infinite_bounds_and_non_contiguous_input(cpp, clipping_layer):
    x = torch.randn(8, 6, 5, 10, dtype=torch.float64)[..., ::2]  # neither contiguous nor channels_last
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    layer = clipping_layer(BatchRenorm2d, 6)
    layer.rmax, layer.dmax = float("inf"), float("inf")
    _assert_same(_run(layer, x, True), _run(layer, x, False))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc", "long_rows", "nchw_wide", "channels_last_wide"])
def test_float32_close_to_python_path(cpp, layout, clipping_layer):
    x, cls = _case(layout)
    layer = clipping_layer(cls, x.shape[1]).float()
    a, b = _run(layer, x.float(), True), _run(layer, x.float(), False)
    _assert_same(a, b, rtol=1e-4, atol=1e-4)


def test_float32_statistics_far_from_zero_are_accurate(cpp):
    """Large offsets: the two-pass sums with double totals keep float32 statistics at float32 precision."""
    g = torch.Generator().manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(16, 8, 30, 30, generator=g) * 0.5 + 3000.0).contiguous(memory_format=fmt)
        layer = BatchRenorm2d(8, momentum=1.0, rmax=1.0, dmax=0.0)
        with cpu_kernels.use_cpp(True):
            layer(x)
        xd = x.double()
        var = xd.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(layer.running_mean.double(), xd.mean(dim=(0, 2, 3)), rtol=1e-7, atol=0)
        # running_var = sigma^2 - eps with sigma = sqrt(var + eps), from the float32 variance
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-4, atol=1e-6)


def test_double_backward_is_refused(cpp):
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    layer = BatchRenorm2d(3, rmax=2.0)
    with cpu_kernels.use_cpp(True):
        (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@pytest.mark.parametrize("channels", [4, 32])  # 32: the fused NCHW kernels on up to 8 threads
def test_only_requested_gradients_are_computed(cpp, clipping_layer, channels):
    x = torch.randn(8, channels, 3, 3, dtype=torch.float64)
    layer = clipping_layer(BatchRenorm2d, channels)
    layer.weight.requires_grad_(False)
    ref = copy.deepcopy(layer)
    with cpu_kernels.use_cpp(True):
        y = layer(x)
    with cpu_kernels.use_cpp(False):
        y_ref = ref(x)
    (gb,) = torch.autograd.grad(y.sum(), [layer.bias])
    (gb_ref,) = torch.autograd.grad(y_ref.sum(), [ref.bias])
    torch.testing.assert_close(gb, gb_ref)


def test_saved_memory_is_input_plus_per_channel_vectors(cpp):
    x = torch.randn(16, 32, 8, 8, requires_grad=True)
    for mb, groups in ((None, 1), (4, 4)):
        layer = BatchRenorm2d(32, rmax=2.0, microbatch_size=mb)
        storages = {}

        def pack(t):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            return t

        with cpu_kernels.use_cpp(True), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        per_channel = 4 * groups * 32 * 4  # mean, invstd, r, d per group
        assert sum(storages.values()) <= x.numel() * 4 + per_channel + 32 * 4  # + the weight (a parameter)


@pytest.mark.parametrize("shape, microbatch_size", [((16, 64, 9, 9), 4), ((8, 32, 40, 41), None), ((8, 32, 40, 41), 4)])
def test_threads_give_the_same_result(cpp, clipping_layer, shape, microbatch_size):
    """The kernels run on torch's threads (OpenMP); their results do not depend on how many (the channels-last
    statistics are taken over spans of rows fixed by the shape, merged in order)."""
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    layer = clipping_layer(BatchRenorm2d, shape[1], microbatch_size=microbatch_size)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(layer, x, True)
        torch.set_num_threads(max(2, threads))
        many = _run(layer, x, True)
    finally:
        torch.set_num_threads(threads)
    _assert_same(one, many)


def _assert_identical(a, b):
    for (ya, _, ga, sta, ra), (yb, _, gb, stb, rb) in zip(a, b):
        for p, q in zip([ya, *ga, *sta], [yb, *gb, *stb]):
            assert torch.equal(p, q)
        assert ra == rb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, microbatch_size",
    [
        ((8, 6, 7, 7), None),
        ((6, 2, 7, 7), 2),
        ((2, 6, 40, 41), None),
        ((6, 2, 40, 41), 2),
        ((4, 6, 3, 4, 5), None),
        ((6, 2, 3, 4, 5), 2),
    ],
    ids=["short_rows", "short_rows_3_groups", "long_rows", "long_rows_3_groups", "3d", "3d_3_groups"],
)
def test_nchw_fused_and_two_pass_kernels_agree_bit_for_bit(cpp, clipping_layer, dtype, shape, microbatch_size):
    """Planar inputs run one (group, channel) block at a time when there are at least 4 blocks per thread, else
    the statistics of all blocks then one output pass: the same arithmetic, so the same bits (outputs, gradients,
    running statistics, the clipping record). Every case has 6 blocks: fused on one thread, two passes on 8;
    three groups, so that the order in which the weight's and bias's gradients add their terms over groups matters."""
    cls = BatchRenorm3d if len(shape) == 5 else BatchRenorm2d
    layer = clipping_layer(cls, shape[1], microbatch_size=microbatch_size).to(dtype)
    layer.track_correction = True
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 1).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fused = _run(layer, x, True)
        torch.set_num_threads(8)
        two_pass = _run(layer, x, True)
    finally:
        torch.set_num_threads(threads)
    _assert_identical(fused, two_pass)


def test_failed_build_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_op", None)
    monkeypatch.setattr(cpu_kernels, "_error", None)
    monkeypatch.setattr(cpu_kernels, "_enabled", True)

    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(cpu_kernels, "_build", broken)
    layer = BatchRenorm2d(3, rmax=2.0)
    x = torch.randn(4, 3, 2, 2)
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler here"):
        y = layer(x)
    assert cpu_kernels.build_error() == "OSError: no compiler here"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning, no second attempt
        y2 = layer(x)
    ref = BatchRenorm2d(3, rmax=2.0)
    with cpu_kernels.use_cpp(False):
        torch.testing.assert_close(y, ref(x))
        torch.testing.assert_close(y2, ref(x))


def test_environment_variable_turns_the_kernels_off():
    code = (
        "import torch, lightning_brn\n"
        "from lightning_brn import cpu_kernels, BatchRenorm2d\n"
        "assert not cpu_kernels.enabled() and cpu_kernels.cpu_op() is None\n"
        "BatchRenorm2d(3, rmax=2.0)(torch.randn(4, 3, 2, 2)).sum().backward()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LIGHTNING_BRN_CPP="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("microbatch_size", [2, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_graphs_with_microbatches_call_the_functional_cpp_operator(
    cpp, microbatch_size, channels_last, clipping_layer
):
    """Under torch.compile on CPU a layer with microbatches (Route.COMPILED_CPP) is one opaque C++ operator (forward
    and backward) plus the copy of the running statistics it returns; the result equals eager, the moving averages
    and the record included."""
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer = clipping_layer(BatchRenorm2d, 4, microbatch_size=microbatch_size)
    layer.track_correction = True
    ref = copy.deepcopy(layer)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = compiled(xa)
    with cpu_kernels.use_cpp(False):
        y_ref = ref(xb)
    assert any("lightning_brn_cpu.renorm_fwd" in code for code in graphs)
    g = torch.randn(y.shape, dtype=y.dtype)
    for p, q in zip(torch.autograd.grad(y, [xa, layer.weight, layer.bias], g),
                    torch.autograd.grad(y_ref, [xb, ref.weight, ref.bias], g)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert y.stride() == y_ref.stride()
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert layer.correction_stats() == ref.correction_stats()


@pytest.mark.parametrize("has_weight, has_bias", [(False, True), (True, False), (False, False), (True, True)])
@pytest.mark.parametrize("running", [True, False])
def test_optional_weight_and_bias_get_their_gradients(cpp, has_weight, has_bias, running):
    """The C++ node maps its gradients to whichever optional tensors were given (weight, bias, running stats)."""
    from lightning_brn.functional import batch_renorm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if has_weight else None
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if has_bias else None
    rm = torch.randn(4, generator=g, dtype=torch.float64)
    rv = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
    results = []
    for use in (True, False):
        xi = x.clone().requires_grad_()
        args = (rm.clone(), rv.clone()) if running else (None, None)
        with cpu_kernels.use_cpp(use):
            y = batch_renorm(xi, *args, w, b, training=True, rmax=1.5, dmax=0.3)
        inputs = [t for t in (xi, w, b) if t is not None]
        results.append((y, torch.autograd.grad(y.square().sum(), inputs)))
    (ya, ga), (yb, gb) = results
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_affine_false_without_running_stats_trains_in_cpp(cpp):
    layer = BatchRenorm2d(4, affine=False, track_running_stats=False)
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    with cpu_kernels.use_cpp(True):
        layer(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shape, strides", [((2, 3, 1, 4), (12, 1, 1, 3)), ((4, 3, 5, 1), (15, 1, 3, 1))])
def test_channels_last_with_unusual_size_one_strides(cpp, shape, strides, clipping_layer):
    """Channels-last dense data whose size-1 dimensions carry non-canonical strides: same as the Python path."""
    x = torch.empty_strided(shape, strides, dtype=torch.float64).copy_(torch.randn(shape, dtype=torch.float64))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layer = clipping_layer(BatchRenorm2d, 3)
    _assert_same(_run(layer, x, True), _run(layer, x, False))


def test_functional_backward_operator_handles_non_dense_input(cpp):
    x = torch.randn(6, 4, 5, 3, dtype=torch.float64).transpose(2, 3)
    w = torch.rand(4, dtype=torch.float64) + 0.5
    b = torch.randn(4, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    hp = [torch.tensor(v, dtype=torch.float64) for v in (1.5, 0.3, 0.1)]
    fwd, bwd = torch.ops.lightning_brn_cpu.renorm_fwd, torch.ops.lightning_brn_cpu.renorm_bwd
    outs = [fwd(t, w, b, rm, rv, *hp, 1e-5, 2, False) for t in (x, x.contiguous())]
    torch.testing.assert_close(outs[0][0], outs[1][0])
    gy = torch.randn(x.shape, dtype=torch.float64)
    for p, q in zip(bwd(gy, x, w, outs[0][1], 2), bwd(gy, x.contiguous(), w, outs[1][1], 2)):
        torch.testing.assert_close(p, q)


def test_operator_rejects_empty_input(cpp):
    for shape in ((0, 3), (4, 0, 2)):
        with pytest.raises(RuntimeError, match="non-empty"):
            cpu_kernels.cpu_op()(torch.empty(shape), None, None, None, None, 1.0, 0.0, 0.1, 1e-5, 1, None)


def test_running_statistics_version_counters_advance(cpp):
    """The update is in place, as with torch ops: autograd's version checks see it."""
    layer = BatchRenorm2d(3, rmax=2.0)
    before = (layer.running_mean._version, layer.running_var._version)
    with cpu_kernels.use_cpp(True):
        layer(torch.randn(4, 3, 2, 2))
    assert layer.running_mean._version > before[0] and layer.running_var._version > before[1]


def test_recording_does_not_change_the_step(cpp, clipping_layer):
    """With or without the correction record (which takes another code path for small groups), the output,
    gradients and moving averages are bit-identical."""
    x = torch.randn(64, 16) * 3 + 1
    layer = clipping_layer(BatchRenorm1d, 16, microbatch_size=4).float()
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    b.track_correction = True
    outs = []
    for m in (a, b):
        xi = x.clone().requires_grad_()
        with cpu_kernels.use_cpp(True):
            y = m(xi)
        outs.append((y, torch.autograd.grad(y.square().sum(), [xi, m.weight, m.bias]), m.running_mean, m.running_var))
    (ya, ga, ma, va), (yb, gb, mb, vb) = outs
    assert torch.equal(ya, yb) and torch.equal(ma, mb) and torch.equal(va, vb)
    assert all(torch.equal(p, q) for p, q in zip(ga, gb))


def test_unknown_environment_value_is_named_in_a_warning():
    code = "import lightning_brn.cpu_kernels as e; print('enabled', e.enabled())"
    env = dict(os.environ, LIGHTNING_BRN_CPP="maybe")
    res = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LIGHTNING_BRN_CPP='maybe' is not understood" in res.stderr and "enabled True" in res.stdout


def _functional_args(shape=(6, 3, 4, 4), groups=2, weight=True, bias=True):
    g = torch.Generator().manual_seed(3)
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64, generator=g) * 2 + 1).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64, generator=g) + 0.5).requires_grad_() if weight else None
    b = torch.randn(c, dtype=torch.float64, generator=g).requires_grad_() if bias else None
    rm = torch.randn(c, dtype=torch.float64, generator=g) * 0.5
    rv = torch.rand(c, dtype=torch.float64, generator=g) + 0.3
    hp = [torch.tensor([v], dtype=torch.float64) for v in (1.4, 0.3, 0.1)]
    return x, w, b, rm, rv, hp, groups


@pytest.mark.parametrize("weight, bias", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("clipped", [False, True])
def test_functional_operator_autograd_formula_passes_gradcheck(cpp, weight, bias, clipped):
    """renorm_fwd's autograd formula (C++, used by compiled graphs) against finite differences. Algorithm 1 treats
    r and d as constants, so finite differences agree where they are: rmax = 1, dmax = 0 (batchnorm), or r and d
    clipped on every channel (r = rmax, d = dmax here). The running statistics stay untouched."""
    x, w, b, rm, rv, hp, groups = _functional_args(weight=weight, bias=bias)
    if clipped:  # sigma ~ 0.1 against batch std ~ 2, mu = -5 against batch means ~ 1
        rv.fill_(0.01)
        rm.fill_(-5.0)
    else:
        hp[0].fill_(1.0)
        hp[1].fill_(0.0)
    rm0, rv0 = rm.clone(), rv.clone()
    saved = torch.ops.lightning_brn_cpu.renorm_fwd(x, w, b, rm, rv, *hp, 1e-5, groups, False)[1]
    assert torch.all(saved[2] == hp[0]) and torch.all(saved[3] == hp[1])  # r, d at their bounds everywhere

    def f(*inputs):
        xi, wi, bi = inputs[0], (inputs[1] if weight else None), (inputs[-1] if bias else None)
        return torch.ops.lightning_brn_cpu.renorm_fwd(xi, wi, bi, rm, rv, *hp, 1e-5, groups, False)[0]

    inputs = [t for t in (x, w, b) if t is not None]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_functional_operator_gradients_equal_the_eager_operator(cpp):
    x, w, b, rm, rv, hp, groups = _functional_args()
    out, saved, running, record = torch.ops.lightning_brn_cpu.renorm_fwd(
        x, w, b, rm, rv, *hp, 1e-5, groups, True
    )
    assert out.requires_grad and not (saved.requires_grad or running.requires_grad or record.requires_grad)
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, w, b], gy)
    rm2, rv2, rec2 = rm.clone(), rv.clone(), torch.zeros(5, dtype=torch.float64)
    ref = cpu_kernels.cpu_op()(x, w, b, rm2, rv2, 1.4, 0.3, 0.1, 1e-5, groups, rec2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for p, q in zip(grads, torch.autograd.grad(ref, [x, w, b], gy)):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(running, torch.stack([rm2, rv2]), rtol=0, atol=0)
    torch.testing.assert_close(record[:5], rec2, rtol=0, atol=0)  # the eager record; then the held channels
    assert record[5].item() == 0


def test_functional_operator_without_grad_builds_no_graph_and_refuses_double_backward(cpp):
    x, w, b, rm, rv, hp, groups = _functional_args()
    with torch.no_grad():
        out = torch.ops.lightning_brn_cpu.renorm_fwd(x, w, b, rm, rv, *hp, 1e-5, groups, False)[0]
    assert out.grad_fn is None and not out.requires_grad
    out = torch.ops.lightning_brn_cpu.renorm_fwd(x, w, b, rm, rv, *hp, 1e-5, groups, False)[0]
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_backward_operator_rejects_saved_of_the_wrong_shape(cpp):
    x, w, _, _, _, _, _ = _functional_args()
    with pytest.raises(RuntimeError, match=r"expected saved of shape \(4, 2, 3\)"):
        torch.ops.lightning_brn_cpu.renorm_bwd(torch.ones_like(x), x.detach(), w.detach(), torch.zeros(4, 1, 3,
                                                dtype=torch.float64), 2)


@pytest.mark.parametrize("path", ["layer", "functional"])
def test_second_derivative_through_the_input_is_refused_even_with_a_constant_grad_out(cpp, path):
    """create_graph=True with a grad_out that does not require grad: the input gradient still depends on x and
    the weight, so a second derivative must fail loudly, not silently be zero."""
    x, w, b, rm, rv, hp, groups = _functional_args()
    c = torch.randn(x.shape, dtype=torch.float64)
    if path == "layer":
        layer = BatchRenorm2d(3, rmax=1.4, dmax=0.3, microbatch_size=3).double()
        with cpu_kernels.use_cpp(True):
            y = layer(x)
    else:
        y = torch.ops.lightning_brn_cpu.renorm_fwd(x, w, b, rm, rv, *hp, 1e-5, groups, False)[0]
    (gx,) = torch.autograd.grad((y * c).sum(), x, create_graph=True)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.square().sum().backward()


def test_backward_operator_outputs_refuse_differentiation(cpp):
    x, w, b, rm, rv, hp, groups = _functional_args()
    saved = torch.ops.lightning_brn_cpu.renorm_fwd(x.detach(), w.detach(), b.detach(), rm, rv, *hp, 1e-5, groups,
                                                   False)[1]
    gy = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    gx, gw, gb = torch.ops.lightning_brn_cpu.renorm_bwd(gy, x.detach(), w.detach(), saved, groups)
    assert gx.requires_grad and gw.requires_grad and gb.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()
    with torch.no_grad():  # and no error node where nothing is differentiated
        assert torch.ops.lightning_brn_cpu.renorm_bwd(gy, x, w, saved, groups)[0].grad_fn is None


def test_grad_enabled_but_nothing_requires_grad_builds_no_graph(cpp):
    x, w, b, rm, rv, hp, groups = _functional_args()
    out = torch.ops.lightning_brn_cpu.renorm_fwd(x.detach(), w.detach(), b.detach(), rm, rv, *hp, 1e-5, groups,
                                                  False)
    assert torch.is_grad_enabled() and all(t.grad_fn is None and not t.requires_grad for t in out)


def test_tensor_hyperparameters_take_the_python_path_and_per_channel_bounds_still_broadcast():
    """The eager C++ operator takes Python floats: one-element tensors (fx-traced layers pass the schedule
    buffers) go to the Python path, with the same results; a per-channel bound tensor still broadcasts."""
    from lightning_brn import functional as F
    from lightning_brn.routes import Route, choose_route

    w = torch.ones(3, dtype=torch.float64)
    hp = torch.tensor([1.5], dtype=torch.float64)
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    assert choose_route(x, (w, None, w, w), (hp, 0.5, 0.1), True) is Route.ATEN
    assert choose_route(x, (w, None, w, w), (1.5, 0.5, 0.1), True) is Route.CPP
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    a = F.batch_renorm(x, rm.clone(), rv.clone(), training=True, rmax=hp, dmax=torch.tensor([0.5]))
    b = F.batch_renorm(x, rm.clone(), rv.clone(), training=True, rmax=1.5, dmax=0.5)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    r, d = F.renorm_correction(torch.zeros(3), torch.full((3,), 2.0), torch.zeros(3), torch.ones(3),
                               rmax=torch.tensor([1.5, 3.0, 1.0]), dmax=0.1)
    torch.testing.assert_close(r, torch.tensor([1.5, 2.0, 1.0]))


@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_larger_than_the_cache_are_exact(cpp, channels_last, clipping_layer):
    """Outputs of 16 MiB and more may be written with non-temporal stores (AVX-512 machines): the forward output
    is bit-identical to x * scale + shift from the saved statistics, and forward and backward match the Python
    path in float64 to float32 accuracy."""
    x = torch.randn(8, 64, 96, 96, generator=torch.Generator().manual_seed(5)) * 2 + 1  # 18.9 MB
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = x.shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.randn(c) * 0.3, torch.rand(c) + 2.0
    hp = [torch.tensor([v], dtype=torch.float64) for v in (1.5, 0.2, 0.1)]
    out, saved, _, _ = torch.ops.lightning_brn_cpu.renorm_fwd(x, w, b, rm, rv, *hp, 1e-5, 1, False)
    mean, invstd, r, d = saved[:, 0]
    scale = (w * r) * invstd
    shift = (b + w * d) - mean * scale
    assert torch.equal(out, x * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    results = []
    for dtype, use_cpp in ((torch.float32, True), (torch.float64, False)):  # the Python path in float64
        layer = clipping_layer(BatchRenorm2d, c).to(dtype)
        xi = x.to(dtype).requires_grad_()
        with cpu_kernels.use_cpp(use_cpp):
            y = layer(xi)
        grads = torch.autograd.grad(y, [xi, layer.weight, layer.bias], gy.to(dtype))
        results.append([t.double() for t in (y, *grads, layer.running_mean, layer.running_var)])
        assert y.stride() == x.stride()
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)
