"""lightning_brn.functional against an independent, literal float64 implementation of Algorithm 1."""

from __future__ import annotations

import pytest
import torch

from lightning_brn.functional import batch_renorm, renorm_correction

EPS = 1e-5

# every test runs with the C++ CPU kernels and with the Python path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("eager_backend")


def test_moving_average_tracks_std_not_variance():
    """One step from sigma=1 towards sigma_B=3 with alpha=0.5 gives sigma=2 (variance averaging would give sqrt(5))."""
    x = torch.tensor([[-3.0], [3.0]], dtype=torch.float64)  # mean 0, biased var 9
    running_mean = torch.zeros(1, dtype=torch.float64)
    running_var = torch.full((1,), 1.0 - EPS, dtype=torch.float64)  # sigma = 1 exactly
    batch_renorm(x, running_mean, running_var, training=True, momentum=0.5, eps=EPS)
    sigma_b = (9.0 + EPS) ** 0.5
    expected_sigma = 1.0 + 0.5 * (sigma_b - 1.0)
    torch.testing.assert_close(running_var, torch.tensor([expected_sigma**2 - EPS], dtype=torch.float64))


def test_r_and_d_use_statistics_before_the_update():
    x = torch.randn(16, 3, dtype=torch.float64) * 4 + 2
    running_mean = torch.zeros(3, dtype=torch.float64)
    running_var = torch.ones(3, dtype=torch.float64)
    y = batch_renorm(x, running_mean, running_var, training=True, momentum=1.0, rmax=100.0, dmax=100.0)
    # With alpha = 1 the moving averages become the batch's; r, d must still come from (0, 1).
    mu_b, var_b = x.mean(0), x.var(0, unbiased=False)
    sigma_b = (var_b + EPS).sqrt()
    sigma = (1 + torch.tensor(EPS, dtype=torch.float64)).sqrt()
    expected = (x - mu_b) / sigma_b * (sigma_b / sigma) + mu_b / sigma
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(running_mean, mu_b)


def test_rmax1_dmax0_is_batchnorm_forward_and_backward():
    torch.manual_seed(1)
    x = torch.randn(6, 5, 4, 4, dtype=torch.float64) * 3 + 1
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.1
    y = batch_renorm(xa, rm.clone(), rv.clone(), w, b, True, 0.1, EPS, 1.0, 0.0)
    y_bn = torch.nn.functional.batch_norm(xb, None, None, w, b, True, 0.1, EPS)
    torch.testing.assert_close(y, y_bn)
    g = torch.randn_like(y)
    for a, c in zip(torch.autograd.grad(y, (xa, w, b), g), torch.autograd.grad(y_bn, (xb, w, b), g)):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("microbatch_size", [None, 2])
@pytest.mark.parametrize("case", ["bn", "clipped"])
def test_gradcheck(case, microbatch_size):
    """r and d are constants for autograd, so finite differences agree where r, d are locally constant:
    rmax=1/dmax=0 (batchnorm) or every channel clipped (both directions)."""
    torch.manual_seed(2)
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    if case == "bn":
        rm, rv, rmax, dmax = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 1.0, 0.0
    else:
        rm = torch.tensor([10.0, -10.0, 10.0, -10.0], dtype=torch.float64)
        rv = torch.tensor([100.0, 100.0, 1e-4, 1e-4], dtype=torch.float64)
        rmax, dmax = 1.3, 0.5

    def fn(x, w, b):
        return batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, EPS, rmax, dmax, microbatch_size)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_renorm_correction_clips_both_ways():
    r, d = renorm_correction(
        torch.tensor([0.0, 0.0, 5.0, -5.0]),
        torch.tensor([10.0, 0.1, 1.0, 1.0]),
        torch.zeros(4),
        torch.ones(4),
        rmax=torch.tensor(2.0, dtype=torch.float64),
        dmax=torch.tensor(1.0, dtype=torch.float64),
    )
    torch.testing.assert_close(r, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(d, torch.tensor([0.0, 0.0, 1.0, -1.0]))


def test_inference_is_batchnorm_inference():
    x = torch.randn(3, 4, 5, 5)
    rm, rv = torch.randn(4), torch.rand(4)
    w, b = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(
        batch_renorm(x, rm, rv, w, b, training=False),
        torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.0, EPS),
    )


def test_microbatch_errors_name_the_sizes():
    x = torch.randn(6, 3, 2, 2)
    with pytest.raises(ValueError, match=r"microbatch_size=4 does not divide the batch size 6"):
        batch_renorm(x, torch.zeros(3), torch.ones(3), training=True, microbatch_size=4)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\[6, 3\].*microbatch_size=1"):
        batch_renorm(torch.randn(6, 3), torch.zeros(3), torch.ones(3), training=True, microbatch_size=1)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\[1, 3\]"):
        batch_renorm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True)
    for bad in (0, -2):  # refused in both modes, before anything is computed
        for training in (True, False):
            rm = torch.zeros(3)
            with pytest.raises(ValueError, match=rf"microbatch_size must be >= 1 or None, got microbatch_size={bad}"):
                batch_renorm(x, rm, torch.ones(3), training=training, microbatch_size=bad)
            assert rm.eq(0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rmax": 0.5}, r"rmax must be >= 1 .*got rmax=0.5"),
        ({"rmax": float("nan")}, r"rmax must be a number, got rmax=nan"),  # (lightning_brn.validation's wording)
        ({"dmax": -1.0}, r"dmax must be >= 0 .*got dmax=-1.0"),
        ({"momentum": 1.5}, r"momentum .* must be in \[0, 1\], got momentum=1.5"),
        ({"momentum": -0.1}, r"momentum .* must be in \[0, 1\], got momentum=-0.1"),
        ({"momentum": None}, r"momentum .* must be in \[0, 1\], got momentum=None"),
        ({"eps": 0.0}, r"eps must be > 0 .*got eps=0.0"),
        ({"eps": -1e-5}, r"eps must be > 0 .*got eps=-1e-05"),
    ],
)
def test_bad_numbers_are_refused_naming_them_before_any_state_moves(kwargs, message):
    x = torch.randn(6, 3, 2, 2) + 3
    rm, rv, count = torch.zeros(3), torch.ones(3), torch.tensor(0)
    with pytest.raises(ValueError, match=message):
        batch_renorm(x, rm, rv, training=True, num_batches_tracked=count, **kwargs)
    assert rm.eq(0).all() and rv.eq(1).all() and int(count) == 0
    # tensor bounds (the layers' schedule buffer) are not read on the host: they are checked where they are set
    y = batch_renorm(x, rm, rv, training=True, rmax=torch.tensor([2.0], dtype=torch.float64), dmax=torch.tensor([1.0]))
    assert y.shape == x.shape


def test_num_batches_tracked_counts_training_calls_that_pass_the_checks():
    x = torch.randn(6, 3, 2, 2)
    count = torch.tensor(0)
    for training, mb in ((True, None), (True, 3), (False, None)):
        batch_renorm(x, torch.zeros(3), torch.ones(3), training=training, microbatch_size=mb, num_batches_tracked=count)
    batch_renorm(x, None, None, training=True, num_batches_tracked=count)  # no running statistics: still a batch
    batch_renorm(x, None, None, training=False, num_batches_tracked=count)  # batch statistics, but not training
    assert count.item() == 3  # the eval calls count nothing
    for bad_x, mb in ((x, 4), (x, 0), (torch.randn(1, 3, 1, 1), None), (torch.randn(6, 3, 1, 1), 1)):
        with pytest.raises(ValueError):
            batch_renorm(bad_x, torch.zeros(3), torch.ones(3), training=True, microbatch_size=mb,
                         num_batches_tracked=count)
    assert count.item() == 3, "a rejected input must not count as a batch"
    rm = torch.zeros(3)
    for bad, match in ((3, r"num_batches_tracked=3"), (torch.zeros(2), r"tensor of shape \(2,\)")):
        with pytest.raises(TypeError, match=rf"num_batches_tracked must be a one-element tensor.*{match}"):
            batch_renorm(x, rm, torch.ones(3), training=True, num_batches_tracked=bad)
    assert rm.eq(0).all(), "a refused counter changes nothing"


def test_correction_stats_are_recorded():
    stats = torch.zeros(5)
    x = torch.randn(64, 4, dtype=torch.float64) * torch.tensor([10.0, 0.01, 1.0, 1.0], dtype=torch.float64)
    x = x - x.mean(0)  # d = 0 exactly on channels 0-2
    x[:, 3] += 50
    batch_renorm(x, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), training=True,
                 rmax=2.0, dmax=3.0, correction_stats=stats)
    r_clipped, d_clipped, abs_r, abs_d, count = stats.tolist()
    assert count == 4
    assert r_clipped == 2  # channels 0 (too wide) and 1 (too narrow)
    assert d_clipped == 1  # channel 3 (shifted)
    assert abs_d == pytest.approx(3.0, rel=1e-5)
    assert abs_r >= 1.5  # |2-1| + |0.5-1| + two small terms


# ------------------------------------------------------------------ compiled CPU graphs: the inline step
def _dynamo_code(model, x):
    """Output of ``torch.compile(model, fullgraph=True)`` (inductor) on ``x``, and the code of the graph dynamo
    captured (before AOTAutograd)."""
    from torch._inductor.compile_fx import compile_fx

    codes: list[str] = []

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True)(x), "\n".join(codes)


def _inline_case_layer(case, clipping_layer):
    """Input shape and a clipping layer of 6 channels for a compiled-inline test case: (16, 6) features for "nc",
    ``affine=False`` for "affine_false", (8, 6, 5, 5) images otherwise."""
    from lightning_brn import BatchRenorm1d, BatchRenorm2d

    shape, cls, kw = ((8, 6, 5, 5), BatchRenorm2d, {})
    if case == "nc":
        shape, cls = (16, 6), BatchRenorm1d
    if case == "affine_false":
        kw = {"affine": False}
    return shape, clipping_layer(cls, 6, seed=5, **kw)


@pytest.mark.parametrize(
    "case", ["nchw", "channels_last", "transposed", "nc", "affine_false", "momentum_one", "record"]
)
def test_compiled_small_inputs_fuse_the_step_into_batchnorm(case, clipping_layer):
    """On CPU, torch.compile turns a small layer's step into graph ops with batchnorm's backward (no opaque
    operator): outputs, gradients, moving averages and the clipping record equal eager's. With momentum = 1
    the moving averages become the batch statistics, so a backward that recomputed r and d from the updated
    buffers would get r = 1, d = 0 and visibly wrong gradients; r and d are saved instead."""
    import copy

    g = torch.Generator().manual_seed(11)
    shape, layer = _inline_case_layer(case, clipping_layer)
    if case == "momentum_one":
        layer.momentum = 1.0
    layer.track_correction = case == "record"
    ref = copy.deepcopy(layer)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if case == "transposed":  # neither contiguous nor channels-last: the output is contiguous, as in eager mode
        x = x.transpose(2, 3)
        shape = x.shape
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, code = _dynamo_code(layer, xa)
    assert "lightning_brn_cpu" not in code, code  # no opaque op
    y_ref = ref(xb)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert y.stride() == y_ref.stride()
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    ref_params = [p for p in (ref.weight, ref.bias) if p is not None]
    for p, q in zip(torch.autograd.grad(y, [xa, *params], dy), torch.autograd.grad(y_ref, [xb, *ref_params], dy)):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(ref, name), rtol=1e-12, atol=1e-12, msg=name)
    if case == "record":
        assert layer.correction_stats() == pytest.approx(ref.correction_stats(), rel=1e-9)
        assert ref.correction_stats()["r_clipped"] > 0


def _aot_graphs(model, x):
    """Forward and backward graphs (code) AOTAutograd hands inductor for ``model`` on ``x``, split by inductor's
    partitioner and decompositions, after one training step with a gradient of ones."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    graphs: dict[str, str] = {}

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            graphs[kind] = gm.code
            return make_boxed_func(gm.forward)

        return compile_graph

    backend = aot_autograd(
        fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
        partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table(),
    )
    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    torch._dynamo.reset()
    return graphs["forward"], graphs["backward"]


@pytest.mark.parametrize("case", ["nchw", "nc", "affine_false"])
def test_compiled_backward_reads_r_and_d_as_saved(case, clipping_layer):
    """The compiled backward never recomputes r and d (from buffers the forward has updated by then): it has no
    clamp and no square root, and reads the batch statistics, r, d and gamma * r from one saved (5, C) tensor."""
    shape, layer = _inline_case_layer(case, clipping_layer)
    layer.momentum = 1.0
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    forward, backward = _aot_graphs(torch.nn.Sequential(layer, torch.nn.ReLU()), x)
    assert "clamp" not in backward and "sqrt" not in backward, backward
    assert "clamp" in forward and "select_scatter" in forward, forward
    assert "select" in backward, backward  # the rows of the saved (5, C) tensor


def test_compiled_model_saves_fewer_tensors_than_batchnorm():
    """Inside a compiled model, a renorm layer saves the input and one (5, C) tensor for the backward (the batch
    mean, 1/sigma_B, r, d and gamma * r), where compiled batchnorm saves the input, the weight, the mean and
    1/sigma_B: two tensors fewer per layer, and two vectors of C values more."""

    def saved(norm):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(8, 8, 1), norm(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1), norm(8)
        )
        for m in model.modules():
            if hasattr(m, "rmax"):
                m.rmax, m.dmax = 2.0, 1.0
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        x = torch.randn(4, 8, 5, 5)
        compiled(x).sum().backward()  # compiles
        tensors: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: tensors.append(t) or t, lambda t: t):
            y = compiled(x)
        y.sum().backward()
        torch._dynamo.reset()
        return len(tensors), sum(t.numel() * t.element_size() for t in tensors)

    from lightning_brn import BatchRenorm2d

    (n_brn, bytes_brn), (n_bn, bytes_bn) = saved(BatchRenorm2d), saved(torch.nn.BatchNorm2d)
    assert n_brn == n_bn - 4, (n_brn, n_bn)  # two layers, two tensors fewer each
    # two layers, 5 vectors of 8 float32 against 3 each
    assert bytes_brn - bytes_bn == 2 * 2 * 8 * 4, (bytes_brn, bytes_bn)


def _assert_compiled_step_matches(compiled, layer, ref, x, dy):
    """One training step of ``compiled`` (a compiled ``layer``) and of its eager copy ``ref`` on ``x``: outputs
    and the gradients of the input, weight and bias (for ``dy``) agree in float64. Returns both outputs."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = compiled(xa), ref(xb)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(y, [xa, layer.weight, layer.bias], dy)
    want = torch.autograd.grad(y_ref, [xb, ref.weight, ref.bias], dy)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)
    return y, y_ref


_RECOMPUTING_PARTITIONER = {
    "budget": {"activation_memory_budget": 0.5},
    "aggressive": {"aggressive_recomputation": True},
    "no_allowlist": {"ban_recompute_not_in_allowlist": False},
}


@pytest.mark.parametrize(
    "case, device, config",
    [("nchw_mb", "cpu", "budget"), ("channels_last_mb", "cpu", "budget"), ("nc_mb", "cpu", "budget"),
     ("ncdhw", "cpu", "budget"), ("large", "cpu", "budget"), ("nchw", "cpu", "aggressive"),
     ("nchw_mb", "cpu", "no_allowlist"), ("transposed", "cpu", "budget"),
     ("nchw_mb", "cuda", "budget"), ("channels_last_mb", "cuda", "aggressive")],
)
def test_compiled_when_the_partitioner_may_recompute_anything(case, device, config, clipping_layer):
    """An activation memory budget below 1, ``aggressive_recomputation`` or a lifted allowlist ban let
    AOTAutograd's partitioner recompute what it would otherwise save; r and d are then saved by a MUST_SAVE
    policy, so the gradients still equal eager's. momentum = 1 makes the updated buffers hold the batch
    statistics: recomputing r and d from them would give r = 1, d = 0."""
    import copy

    from lightning_brn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(13)
    shape, cls, mb, fmt = {
        "nchw_mb": ((8, 6, 5, 5), BatchRenorm2d, 2, None),
        "channels_last_mb": ((8, 6, 5, 5), BatchRenorm2d, 4, torch.channels_last),
        "nc_mb": ((16, 6), BatchRenorm1d, 4, None),
        "ncdhw": ((4, 6, 3, 4, 5), BatchRenorm3d, None, None),
        "large": ((8, 4, 64, 72), BatchRenorm2d, None, None),  # past the size of the default inline step
        "nchw": ((8, 6, 5, 5), BatchRenorm2d, None, None),
        "transposed": ((8, 6, 5, 5), BatchRenorm2d, 2, "transposed"),
    }[case]
    layer = clipping_layer(cls, shape[1], seed=5, microbatch_size=mb).to(device)
    layer.momentum = 1.0
    layer.track_correction = True
    ref = copy.deepcopy(layer)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(device)
    if fmt == "transposed":
        x = x.transpose(2, 3)
    elif fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    torch._dynamo.reset()
    with torch._functorch.config.patch(**_RECOMPUTING_PARTITIONER[config]):
        compiled = torch.compile(layer, fullgraph=True)
        for _ in range(2):
            y, y_ref = _assert_compiled_step_matches(compiled, layer, ref, x, dy)
            assert y.stride() == y_ref.stride()
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    assert layer.correction_stats() == pytest.approx(ref.correction_stats(), rel=1e-9)


def test_compiled_with_a_zero_activation_memory_budget_is_refused():
    from lightning_brn import BatchRenorm2d

    torch._dynamo.reset()
    with torch._functorch.config.patch(activation_memory_budget=0.0):
        compiled = torch.compile(BatchRenorm2d(3, rmax=2.0), fullgraph=True)
        with pytest.raises(Exception, match=r"activation_memory_budget=0.0.*expected a budget in \(0, 1\]"):
            compiled(torch.randn(4, 3, 2, 2))
    torch._dynamo.reset()


def test_compiled_half_precision_under_an_activation_memory_budget(clipping_layer):
    """Under a memory budget a bfloat16 input is normalized in float32 with r and d saved, as eager mode does."""
    import copy

    from lightning_brn import BatchRenorm2d

    layer = clipping_layer(BatchRenorm2d, 6, seed=5).float()
    layer.momentum = 1.0
    ref = copy.deepcopy(layer)
    x = (torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(2)) * 2 + 1).bfloat16()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    torch._dynamo.reset()
    with torch._functorch.config.patch(activation_memory_budget=0.5):
        compiled = torch.compile(layer, fullgraph=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = compiled(xa), ref(xb)
        assert y.dtype == y_ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
        for p, q in zip(torch.autograd.grad(y, [xa, layer.weight, layer.bias], dy),
                        torch.autograd.grad(y_ref, [xb, ref.weight, ref.bias], dy)):
            torch.testing.assert_close(p.float(), q.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_output_of_a_non_dense_layout_is_contiguous_like_batchnorm(microbatch_size):
    x = torch.randn(8, 3, 4, 5, dtype=torch.float64).transpose(2, 3)  # neither contiguous nor channels-last
    y = batch_renorm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), training=True,
                     rmax=2.0, dmax=1.0, microbatch_size=microbatch_size)
    assert y.is_contiguous() and torch.nn.functional.batch_norm(x, None, None, training=True).is_contiguous()
    ref = batch_renorm(x.contiguous(), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                       training=True, rmax=2.0, dmax=1.0, microbatch_size=microbatch_size)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("cls, shapes, mb", [
    ("BatchRenorm2d", [(4, 6, 5, 5), (6, 6, 7, 7), (8, 6, 3, 3)], None),
    ("BatchRenorm2d", [(4, 6, 5, 5), (6, 6, 7, 7), (8, 6, 3, 3)], 2),
    ("BatchRenorm1d", [(8, 6), (12, 6), (16, 6)], 4),
    ("BatchRenorm2d", [(4, 6, 5, 5), (8, 6, 64, 72)], None),  # from the inline step's size to past it
])
def test_compiled_with_changing_and_symbolic_shapes_matches_eager(cls, shapes, mb, dynamic, clipping_layer):
    """Batch sizes and image sizes that change between calls: dynamo recompiles with symbolic sizes (or compiles
    them symbolic from the start with ``dynamic=True``); the route, the group count and the statistics still
    follow each batch, and every step equals eager mode."""
    import copy

    import lightning_brn

    layer = clipping_layer(getattr(lightning_brn, cls), 6, seed=3, microbatch_size=mb)
    ref = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(4)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    for shape in shapes:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        _assert_compiled_step_matches(compiled, layer, ref, x, dy)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


@pytest.mark.parametrize("route", ["inline", "must_save"])
def test_compiled_functional_with_tensors_that_require_grad_gives_them_no_grad(route):
    """The functional API under torch.compile with running statistics or hyper-parameters that require grad
    behaves as eager mode: the moving averages are updated without autograd history, r and d are constants, and
    the gradients of the input, weight and bias equal eager's."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * 2 + 1
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def step(fn):
        rm = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
        rv = (torch.rand(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5)
        hp = [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (1.5, 0.3, 0.1)]
        xa = x.clone().requires_grad_()
        y = fn(xa, rm, rv, w, b, hp)
        return y, torch.autograd.grad(y, [xa, w, b], dy), rm, rv

    def f(xa, rm, rv, w, b, hp):
        return batch_renorm(xa, rm, rv, w, b, training=True, rmax=hp[0], dmax=hp[1], momentum=hp[2])

    budget = 0.5 if route == "must_save" else 1.0
    with torch._functorch.config.patch(activation_memory_budget=budget):
        got = step(torch.compile(f, fullgraph=True))
    want = step(f)
    for p, q in zip((got[0], *got[1], got[2], got[3]), (want[0], *want[1], want[2], want[3])):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    assert got[2].grad_fn is None and got[3].grad_fn is None  # updated in place, with no autograd history
    torch._dynamo.reset()


def test_compiled_functional_beyond_five_dimensions_matches_eager():
    """(N, C, *) with more than three spatial dimensions, compiled, equals eager mode."""
    torch._dynamo.reset()
    x = torch.randn(4, 3, 2, 2, 2, 3, dtype=torch.float64) * 2 + 1
    rm_a, rv_a, rm_b, rv_b = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    rm_a, rv_a, rm_b, rv_b = (t.double() for t in (rm_a, rv_a, rm_b, rv_b))

    def f(x, rm, rv):
        return batch_renorm(x, rm, rv, training=True, rmax=2.0, dmax=1.0, momentum=0.5)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, rm_a, rv_a), f(x, rm_b, rv_b), rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(rv_a, rv_b, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_a_single_running_statistic_is_refused(given):
    stats = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    kwargs = {name: (stats[name] if name == given else None) for name in stats}
    missing = "running_var" if given == "running_mean" else "running_mean"
    with pytest.raises(ValueError, match=f"got {given} but {missing}=None"):
        batch_renorm(torch.randn(4, 3), training=True, **kwargs)


@pytest.mark.parametrize("backend", ["cpp", "python"])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_wrong_sized_per_channel_tensor_names_the_size(name, backend):
    from lightning_brn import cpu_kernels

    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": torch.ones(3), "bias": torch.zeros(3)}
    args[name] = torch.ones(5)
    with cpu_kernels.use_cpp(backend == "cpp"), pytest.raises(ValueError, match=f"{name} should contain 3 elements .* not 5"):
        batch_renorm(torch.randn(4, 3, 2, 2), training=True, **args)


def test_nonfinite_count_counts_batches_with_held_channels():
    mean, var, count = torch.zeros(2), torch.ones(2), torch.zeros((), dtype=torch.long)
    x = torch.randn(4, 2)
    batch_renorm(x, mean, var, training=True, momentum=0.1, nonfinite_count=count)
    assert count.item() == 0
    x[0, 0] = float("-inf")
    held = mean[0].clone()
    batch_renorm(x, mean, var, training=True, momentum=0.1, nonfinite_count=count)
    assert count.item() == 1 and mean[0] == held and torch.isfinite(var).all()
