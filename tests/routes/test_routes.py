"""Every route of the training step (lightning_brn.routes) against a literal float64 Algorithm 1 and against
batchnorm at rmax = 1, dmax = 0; the route table of choose_route; the microbatch layout."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from lightning_brn import BatchRenorm2d, cpu_kernels
from lightning_brn.functional import batch_renorm
from lightning_brn.routes import Route, channels_as_groups, choose_route, groups_as_channels

EPS = 1e-5


def literal_algorithm1(x, mu, sigma, gamma, beta, rmax, dmax, alpha, eps, k=None):
    """Algorithm 1 of the paper, written out literally with autograd ops (paper notation).

    ``mu`` and ``sigma`` are the moving mean and moving *standard deviation*. Returns
    (y, new_mu, new_sigma, r, d, raw_r, raw_d); r and d are stop-gradient constants.
    """
    n, c = x.shape[0], x.shape[1]
    k = n if k is None else k
    dims = [0] + list(range(2, x.dim()))
    bshape = [1, c] + [1] * (x.dim() - 2)
    ys, mus, sigmas, rs, ds, raw_rs, raw_ds = [], [], [], [], [], [], []
    for start in range(0, n, k):
        xb = x[start : start + k]
        mu_b = xb.mean(dim=dims)
        sigma_b = torch.sqrt(eps + ((xb - mu_b.view(bshape)) ** 2).mean(dim=dims))
        raw_r = (sigma_b / sigma).detach()
        raw_d = ((mu_b - mu) / sigma).detach()
        r = torch.minimum(torch.maximum(raw_r, torch.full_like(raw_r, 1.0 / rmax)), torch.full_like(raw_r, rmax))
        d = torch.minimum(torch.maximum(raw_d, torch.full_like(raw_d, -dmax)), torch.full_like(raw_d, dmax))
        x_hat = (xb - mu_b.view(bshape)) / sigma_b.view(bshape) * r.view(bshape) + d.view(bshape)
        ys.append(gamma.view(bshape) * x_hat + beta.view(bshape))
        mus.append(mu_b.detach())
        sigmas.append(sigma_b.detach())
        rs.append(r)
        ds.append(d)
        raw_rs.append(raw_r)
        raw_ds.append(raw_d)
    mu_bar = torch.stack(mus).mean(0)
    sigma_bar = torch.stack(sigmas).mean(0)
    new_mu = mu + alpha * (mu_bar - mu)
    new_sigma = sigma + alpha * (sigma_bar - sigma)
    return torch.cat(ys), new_mu, new_sigma, torch.stack(rs), torch.stack(ds), torch.stack(raw_rs), torch.stack(raw_ds)


def _clipping_batches(steps, n, c, spatial, seed=0):
    """Batches whose per-channel scale/offset push r and d past their bounds in both directions."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([8.0, 0.05, 1.0, 1.0, 1.3, 0.9][:c], dtype=torch.float64)
    shift = torch.tensor([0.0, 0.0, 9.0, -9.0, 0.2, -0.1][:c], dtype=torch.float64)
    shape = (n, c) + spatial
    bshape = (1, c) + (1,) * len(spatial)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * scale.view(bshape) + shift.view(bshape) for _ in range(steps)]


LAYOUTS = {
    "2d": ((5, 3), None),
    "2d-channels_last": ((5, 3), torch.channels_last),
    "1d-flat": ((), None),
    "1d-seq": ((7,), None),
    "3d": ((2, 3, 2), None),
    "3d-channels_last": ((2, 3, 2), torch.channels_last_3d),
}
# compiling costs seconds per graph: the compiled routes run on the layouts that exercise distinct code
COMPILED_LAYOUTS = ("2d", "2d-channels_last", "1d-flat")


# what the tests run: every route, and Route.COMPILED also under a partitioner that may recompute (MUST_SAVE)
VARIANTS = {
    "cpp": Route.CPP, "aten": Route.ATEN, "compiled": Route.COMPILED, "compiled_must_save": Route.COMPILED,
    "compiled_cpp": Route.COMPILED_CPP,
}


@contextlib.contextmanager
def on_route(variant: str):
    """Runs ``batch_renorm`` calls inside the block on ``variant``'s route: yields a function that wraps a step."""
    if variant in ("cpp", "compiled_cpp") and not cpu_kernels.available():
        pytest.skip(f"C++ CPU kernels unavailable here: {cpu_kernels.build_error() or 'disabled by LIGHTNING_BRN_CPP'}")
    if variant in ("cpp", "aten"):
        with cpu_kernels.use_cpp(variant == "cpp"):
            yield lambda fn: fn
        return
    torch._dynamo.reset()
    budget = 0.5 if variant == "compiled_must_save" else 1.0
    # Route.COMPILED with microbatches: the C++ kernels off while tracing (they would take Route.COMPILED_CPP)
    with torch._functorch.config.patch(activation_memory_budget=budget), cpu_kernels.use_cpp(variant != "compiled"):
        yield lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)
    torch._dynamo.reset()


def _route_cases():
    for variant in VARIANTS:
        for layout in LAYOUTS:
            if variant.startswith("compiled") and layout not in COMPILED_LAYOUTS:
                continue
            for mb in (None, 4):
                if variant == "compiled_cpp" and mb is None:
                    continue  # microbatches only
                yield pytest.param(variant, layout, mb, id=f"{variant}-{layout}-mb{mb}")


@pytest.mark.parametrize("variant, layout, microbatch_size", list(_route_cases()))
def test_every_route_matches_literal_algorithm1_float64(variant, layout, microbatch_size):
    spatial, memory_format = LAYOUTS[layout]
    c, n = 6, 8
    rmax, dmax, alpha = 2.0, 1.5, 0.3
    torch.manual_seed(0)
    gamma = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(c, dtype=torch.float64).requires_grad_()
    running_mean = torch.zeros(c, dtype=torch.float64)
    running_var = torch.ones(c, dtype=torch.float64)
    mu = running_mean.clone()
    sigma = torch.sqrt(running_var + EPS)
    saw_r_hi = saw_r_lo = saw_d_hi = saw_d_lo = saw_free = False

    seen = []  # the routes choose_route picks for the step's inputs

    def step(x, running_mean, running_var, gamma, beta):
        groups = x.shape[0] // microbatch_size if microbatch_size else 1
        seen.append(choose_route(x, (gamma, beta, running_mean, running_var), (rmax, dmax, alpha), True, groups))
        return batch_renorm(x, running_mean, running_var, gamma, beta, True, alpha, EPS, rmax, dmax, microbatch_size)

    with on_route(variant) as wrap:
        run = wrap(step)
        for x in _clipping_batches(5, n, c, spatial):
            if memory_format is not None:
                x = x.to(memory_format=memory_format)
            x_ref = x.clone().requires_grad_()
            x_ours = x.clone().requires_grad_()
            y_ref, mu, sigma, r, d, raw_r, raw_d = literal_algorithm1(
                x_ref, mu, sigma, gamma, beta, rmax, dmax, alpha, EPS, microbatch_size
            )
            saw_r_hi |= bool((raw_r > rmax).any())
            saw_r_lo |= bool((raw_r < 1 / rmax).any())
            saw_d_hi |= bool((raw_d > dmax).any())
            saw_d_lo |= bool((raw_d < -dmax).any())
            saw_free |= bool(((raw_r < rmax) & (raw_r > 1 / rmax) & (raw_d.abs() < dmax)).any())
            y = run(x_ours, running_mean, running_var, gamma, beta)
            torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
            grad = torch.randn_like(y)
            g_ref = torch.autograd.grad(y_ref, (x_ref, gamma, beta), grad)
            g_ours = torch.autograd.grad(y, (x_ours, gamma, beta), grad)
            for a, b, name in zip(g_ours, g_ref, ("input", "weight", "bias")):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")
            torch.testing.assert_close(running_mean, mu, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(running_var, sigma**2 - EPS, rtol=1e-10, atol=1e-12)
            if memory_format is not None:
                assert y.stride() == x.stride()
    assert saw_r_hi and saw_r_lo and saw_d_hi and saw_d_lo and saw_free, "the data must exercise every clipping case"
    assert set(seen) == {VARIANTS[variant]}, seen  # the step ran on the route under test


@pytest.mark.parametrize(
    "variant, microbatch_size",
    [(v, mb) for v in VARIANTS for mb in (None, 2) if not (v == "compiled_cpp" and mb is None)],  # microbatches only
)
def test_every_route_is_batchnorm_at_rmax1_dmax0(variant, microbatch_size):
    """rmax = 1, dmax = 0: output, gradients and moving averages of torch's batchnorm (per microbatch, the
    averages moving towards the mean over microbatches)."""
    g = torch.Generator().manual_seed(3)
    layer = BatchRenorm2d(4, momentum=0.2, rmax=1.0, dmax=0.0, microbatch_size=microbatch_size).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    x = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * 3 + 1
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    k = microbatch_size or 8
    with on_route(variant) as wrap:
        run = wrap(layer)
        xa = x.clone().requires_grad_()
        y = run(xa)
        got = torch.autograd.grad(y, [xa, layer.weight, layer.bias], dy)
    xb = x.clone().requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    ys, sigmas, means = [], [], []
    for start in range(0, 8, k):  # torch's batchnorm on each microbatch
        ys.append(torch.nn.functional.batch_norm(xb[start : start + k], None, None, w, b, True, 0.0, EPS))
        means.append(x[start : start + k].mean((0, 2, 3)))
        sigmas.append((x[start : start + k].var((0, 2, 3), unbiased=False) + EPS).sqrt())
    y_bn = torch.cat(ys)
    want = torch.autograd.grad(y_bn, [xb, w, b], dy)
    torch.testing.assert_close(y, y_bn, rtol=1e-10, atol=1e-10)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)
    sigma0 = torch.ones(4, dtype=torch.float64).add(EPS).sqrt()  # the initial sigma, eps inside
    mean_want = 0.2 * torch.stack(means).mean(0)
    sigma_want = sigma0 + 0.2 * (torch.stack(sigmas).mean(0) - sigma0)
    torch.testing.assert_close(layer.running_mean, mean_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, sigma_want**2 - EPS, rtol=1e-10, atol=1e-12)


def test_choose_route_table_in_eager_mode():
    x32 = torch.randn(4, 3, 2, 2)
    per_channel = (torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3))
    hyper = (2.0, 1.0, 0.1)
    cpp = Route.CPP if cpu_kernels.available() else Route.ATEN
    assert choose_route(x32, per_channel, hyper, True) is cpp
    assert choose_route(x32.double(), (None, None, None, None), hyper, False) is cpp
    # anything the C++ operator does not take as it is goes to batchnorm's kernels
    assert choose_route(x32.half(), per_channel, hyper, True) is Route.ATEN
    assert choose_route(x32.double(), per_channel, hyper, True) is Route.ATEN  # float32 parameters
    assert choose_route(x32, per_channel, (torch.tensor([2.0]), 1.0, 0.1), True) is Route.ATEN  # fx graphs
    assert choose_route(x32, per_channel, (2.0, True, 0.1), True) is Route.ATEN
    assert choose_route(x32, (torch.ones(6)[::2], None, None, None), hyper, False) is Route.ATEN
    assert choose_route(x32.to("meta"), (None, None, None, None), hyper, False) is Route.ATEN
    with cpu_kernels.use_cpp(False):
        assert choose_route(x32, per_channel, hyper, True) is Route.ATEN


@pytest.mark.parametrize("budget, has_running, groups, want", [
    (1.0, True, 1, Route.COMPILED), (1.0, True, 2, Route.COMPILED_CPP), (1.0, False, 2, Route.COMPILED),
    (0.5, True, 2, Route.COMPILED),  # a partitioner that may recompute: MUST_SAVE on Route.COMPILED
])
def test_choose_route_inside_torch_compile(budget, has_running, groups, want):
    if want is Route.COMPILED_CPP and not cpu_kernels.available():
        want = Route.COMPILED
    torch._dynamo.reset()
    seen = []

    def f(x):
        seen.append(choose_route(x, (None, None, None, None), (2.0, 1.0, 0.1), has_running, groups))
        return x + 1

    with torch._functorch.config.patch(activation_memory_budget=budget):
        torch.compile(f, fullgraph=True)(torch.randn(4, 3))
    torch._dynamo.reset()
    assert seen == [want]


@pytest.mark.parametrize("shape, memory_format", [
    ((8, 3), None), ((8, 3, 5), None), ((8, 3, 4, 5), None), ((8, 3, 4, 5), torch.channels_last),
    ((8, 3, 2, 4, 5), torch.channels_last_3d),
])
def test_groups_as_channels_layout_and_inverse(shape, memory_format):
    x = torch.randn(shape)
    if memory_format is not None:
        x = x.to(memory_format=memory_format)
    xs = groups_as_channels(x, 4)  # 4 groups of 2 examples
    assert xs.shape == (2, 12, *shape[2:])
    for g in range(4):
        for j in range(2):
            assert torch.equal(xs[j, g * 3 : (g + 1) * 3], x[g * 2 + j])
    if memory_format is not None:
        assert xs.is_contiguous(memory_format=memory_format)
    back = channels_as_groups(xs, x, 4)
    assert torch.equal(back, x) and back.stride() == x.stride()
    assert groups_as_channels(x, 1) is x and channels_as_groups(x, x, 1) is x


@pytest.mark.parametrize("variant, microbatch_size", [("compiled", None), ("compiled", 2), ("compiled_cpp", 2)])
def test_compiled_routes_follow_new_hyperparameters_without_recompiling(variant, microbatch_size, clipping_layer):
    """rmax, dmax and momentum changing every step: the compiled layer (inductor around the step, or around the
    C++ operators) equals eager, from one graph."""
    layer = clipping_layer(BatchRenorm2d, 4, microbatch_size=microbatch_size)
    ref = copy.deepcopy(layer)
    with on_route(variant) as wrap:
        compiled = wrap(layer)
        frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for step in range(3):
            for m in (layer, ref):
                m.rmax, m.dmax, m.momentum = 1.0 + 0.5 * step, 0.2 * step, 0.1 / (step + 1)
            x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 1
