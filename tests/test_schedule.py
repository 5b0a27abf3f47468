"""Tests of lightning_brn.RenormSchedule (issue 5)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import lightning_brn
from lightning_brn import BatchRenorm1d, BatchRenorm2d, BatchRenormAct2d, RenormSchedule, is_batch_renorm
from lightning_brn.schedule import RenormValues


def reference_values(step, warmup=5000, rmax=3.0, rmax_steps=40000, dmax=5.0, dmax_steps=25000, momentum=0.01, shape="linear"):
    """A literal reading of the paper: 1 / 0 through warm-up, ramps to the final values, constant after."""

    def ramp(end):
        if step <= warmup:
            return 0.0
        if step >= end:
            return 1.0
        t = (step - warmup) / (end - warmup)
        return t if shape == "linear" else (1 - math.cos(math.pi * t)) / 2

    return 1.0 + (rmax - 1.0) * ramp(rmax_steps), dmax * ramp(dmax_steps), momentum


@pytest.mark.parametrize(
    ("step", "rmax", "dmax"),
    [
        (0, 1.0, 0.0),
        (4999, 1.0, 0.0),
        (5000, 1.0, 0.0),
        (5001, 1.0 + 2.0 / 35000, 5.0 / 20000),
        (15000, 1.0 + 2.0 * 10000 / 35000, 2.5),
        (25000, 1.0 + 2.0 * 20000 / 35000, 5.0),
        (40000, 3.0, 5.0),
        (100000, 3.0, 5.0),
        (10**9, 3.0, 5.0),
    ],
)
def test_paper_boundary_steps(step, rmax, dmax):
    s = RenormSchedule()
    assert s.rmax_at(step) == pytest.approx(rmax, abs=1e-12)
    assert s.dmax_at(step) == pytest.approx(dmax, abs=1e-12)
    assert s.momentum_at(step) == 0.01
    assert s.values(step) == RenormValues(s.rmax_at(step), s.dmax_at(step), 0.01)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_matches_reference_everywhere(shape):
    kw = dict(warmup_steps=7, rmax=2.5, rmax_steps=31, dmax=4.0, dmax_steps=19, momentum=0.05, shape=shape)
    s = RenormSchedule(**kw)
    ref = dict(warmup=7, rmax=2.5, rmax_steps=31, dmax=4.0, dmax_steps=19, momentum=0.05, shape=shape)
    for step in range(50):
        assert s.values(step) == pytest.approx(reference_values(step, **ref), abs=1e-12)


def test_ramps_are_monotone_and_cosine_is_gentler_at_the_start():
    lin = RenormSchedule(warmup_steps=10, rmax_steps=110, dmax_steps=60)
    cos = RenormSchedule(warmup_steps=10, rmax_steps=110, dmax_steps=60, shape="cosine")
    for s in (lin, cos):
        r = [s.rmax_at(i) for i in range(130)]
        d = [s.dmax_at(i) for i in range(130)]
        assert all(b >= a for a, b in zip(r, r[1:])) and all(b >= a for a, b in zip(d, d[1:]))
    assert cos.rmax_at(20) < lin.rmax_at(20)
    assert cos.rmax_at(60) == pytest.approx(lin.rmax_at(60))  # both at half-way
    assert cos.rmax_at(100) > lin.rmax_at(100)


def test_degenerate_ramps_jump_right_after_warmup():
    s = RenormSchedule(warmup_steps=3, rmax=2.0, rmax_steps=3, dmax=1.0, dmax_steps=3)
    assert s.values(3)[:2] == (1.0, 0.0)
    assert s.values(4)[:2] == (2.0, 1.0)
    s0 = RenormSchedule(warmup_steps=0, rmax_steps=0, dmax_steps=0)
    assert s0.values(0)[:2] == (1.0, 0.0) and s0.values(1)[:2] == (3.0, 5.0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(rmax=0.5), ValueError, "rmax must be >= 1.*rmax=0.5"),
        (dict(dmax=-1.0), ValueError, "dmax must be >= 0.*dmax=-1.0"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps must be >= 0.*warmup_steps=-1"),
        (dict(rmax_steps=-5), ValueError, "rmax_steps"),
        (dict(dmax_steps=-5), ValueError, "dmax_steps"),
        (dict(warmup_steps=100, rmax_steps=50, dmax_steps=200), ValueError, "rmax_steps=50 < warmup_steps=100"),
        (dict(warmup_steps=100, rmax_steps=200, dmax_steps=50), ValueError, "dmax_steps=50 < warmup_steps=100"),
        (dict(momentum=-0.1), ValueError, r"momentum .* \[0, 1\].*momentum=-0.1"),
        (dict(momentum=1.5), ValueError, "momentum=1.5"),
        (dict(shape="exponential"), ValueError, "shape must be one of.*'exponential'"),
        (dict(warmup_steps=1.5), TypeError, "warmup_steps must be an int.*1.5"),
        (dict(rmax_steps=True), TypeError, "rmax_steps must be an int"),
        (dict(rmax="3"), TypeError, "rmax must be a real number"),
        (dict(dmax=float("nan")), ValueError, "dmax must be finite"),
        (dict(momentum=None), TypeError, "momentum must be a real number"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RenormSchedule(**kwargs)


@pytest.mark.parametrize(("step", "exc"), [(-1, ValueError), (1.0, TypeError), (True, TypeError), ("3", TypeError)])
def test_bad_step(step, exc):
    s = RenormSchedule()
    model = nn.Sequential(BatchRenorm2d(2))
    for call in (s.values, s.rmax_at, s.dmax_at, s.momentum_at, lambda st: s.apply(model, st)):
        with pytest.raises(exc, match="step"):
            call(step)


def test_numpy_and_python_ints_are_steps():
    np = pytest.importorskip("numpy")
    s = RenormSchedule()
    assert s.values(np.int64(30000)) == s.values(30000)


def test_apply_sets_every_renorm_layer_in_a_plain_loop():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        BatchRenorm2d(4),
        BatchRenormAct2d(4),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        BatchRenorm1d(6),
    )
    layers = [m for m in model.modules() if lightning_brn.is_batch_renorm(m)]
    assert len(layers) == 3
    s = RenormSchedule(warmup_steps=2, rmax=3.0, rmax_steps=6, dmax=4.0, dmax_steps=4, momentum=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(8):
        returned = s.apply(model, step)
        assert returned == s.values(step)
        for m in layers:
            assert (m.rmax, m.dmax, m.momentum) == pytest.approx(tuple(returned))
        loss = model(torch.randn(8, 3, 5, 5)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (layers[0].rmax, layers[0].dmax) == (3.0, 4.0)
    assert model[3].momentum == 0.1  # plain batchnorm untouched


def test_apply_rejects_non_modules_and_leaves_plain_models_alone():
    s = RenormSchedule()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        s.apply([BatchRenorm2d(2)], 0)  # type: ignore[arg-type]
    bn = nn.BatchNorm2d(3)
    assert s.apply(bn, 50000) == RenormValues(3.0, 5.0, 0.01)
    assert bn.momentum == 0.1


def test_for_run_scales_the_paper_points():
    s = RenormSchedule.for_run(130_000)
    assert s == RenormSchedule(momentum=0.01)
    s = RenormSchedule.for_run(13_000, rmax=2.0, dmax=1.0, shape="cosine")
    assert (s.warmup_steps, s.dmax_steps, s.rmax_steps) == (500, 2500, 4000)
    assert (s.rmax, s.dmax, s.shape) == (2.0, 1.0, "cosine")
    assert RenormSchedule.for_run(1000, momentum=0.3).momentum == 0.3
    assert RenormSchedule.for_run(1000).momentum == RenormSchedule.momentum_for_run(1000) == 0.1
    tiny = RenormSchedule.for_run(10)
    assert tiny.warmup_steps <= tiny.dmax_steps <= tiny.rmax_steps <= 10
    s = RenormSchedule.for_run(5000, reference_steps=50_000)  # (a reference shorter than 40,000 is refused)
    assert (s.warmup_steps, s.dmax_steps, s.rmax_steps) == (500, 2500, 4000)


def test_momentum_rule():
    rule = RenormSchedule.momentum_for_run
    assert rule(130_000) == 0.01
    assert rule(1_000_000) == 0.01
    assert rule(1) == rule(500) == rule(13_000) == 0.1
    assert rule(26_000) == pytest.approx(0.05)  # horizon 1/alpha = 20 steps = 100/130k of the run
    assert rule(5_000, reference_steps=10_000) == pytest.approx(0.02)
    values = [rule(t) for t in (100, 1000, 2000, 5000, 10_000, 20_000)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert all(0.01 <= v <= 0.1 for v in values)
    with pytest.raises(ValueError, match="total_steps must be >= 1.*total_steps=0"):
        rule(0)
    with pytest.raises(ValueError, match="total_steps"):
        RenormSchedule.for_run(-3)
    with pytest.raises(TypeError, match="total_steps must be an int"):
        RenormSchedule.for_run(1e4)


def test_repr_pickle_equality_and_immutability():
    s = RenormSchedule(warmup_steps=1, rmax=2.0, rmax_steps=3, dmax=0.5, dmax_steps=2, momentum=0.1, shape="cosine")
    assert repr(s) == (
        "RenormSchedule(warmup_steps=1, rmax=2.0, rmax_steps=3, dmax=0.5, dmax_steps=2, momentum=0.1, shape='cosine')"
    )
    assert eval(repr(s), {"RenormSchedule": RenormSchedule}) == s
    assert pickle.loads(pickle.dumps(s)) == s
    assert copy.deepcopy(s) == s and hash(copy.deepcopy(s)) == hash(s)
    assert RenormSchedule(**s.to_dict()) == s
    assert s != RenormSchedule()
    with pytest.raises(AttributeError):
        s.rmax = 5.0  # type: ignore[misc]


def test_built_from_yaml_by_jsonargparse():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--schedule", type=RenormSchedule)
    yaml = """
schedule:
  class_path: lightning_brn.RenormSchedule
  init_args:
    warmup_steps: 10
    rmax_steps: 40
    dmax_steps: 30
    shape: cosine
"""
    cfg = parser.parse_string(yaml)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    s = instantiate(cfg).schedule
    assert s == RenormSchedule(warmup_steps=10, rmax_steps=40, dmax_steps=30, shape="cosine")
    with pytest.raises(Exception, match="shape"):
        parser.parse_string(yaml.replace("cosine", "exponential"))


# --------------------------------------------------------------------------- reference run and fx graphs
def test_reference_steps_shorter_than_the_papers_points_are_refused():
    with pytest.raises(ValueError, match=r"reference_steps must be >= 40000 .* got reference_steps=1000"):
        RenormSchedule.for_run(1_000_000, reference_steps=1000)
    assert RenormSchedule.momentum_for_run(1_000_000, reference_steps=1000) == 0.01  # a horizon alone: any length
    s = RenormSchedule.for_run(1_000_000, reference_steps=40_000)
    assert s.rmax_steps == 1_000_000 and s.warmup_steps <= s.dmax_steps <= s.rmax_steps


def test_apply_reaches_the_layers_of_an_fx_feature_extractor():
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    from lightning_brn import convert_model

    torch.manual_seed(0)
    fe = create_feature_extractor(convert_model(torchvision.models.resnet18()), {"layer2": "c3"})
    assert not any(is_batch_renorm(m) for m in fe.modules())  # fx's plain copies of the layers
    schedule = RenormSchedule(warmup_steps=0, rmax=2.0, rmax_steps=10, dmax=3.0, dmax_steps=10, momentum=0.2)
    assert schedule.apply(fe, 10) == (2.0, 3.0, 0.2)
    buffers = [b for name, b in fe.named_buffers() if name.endswith("_schedule")]
    assert len(buffers) == 1 + 2 * 2 + 2 * 2 + 1  # bn1, layer1's four, layer2's four and its downsample
    assert all(b.tolist() == [2.0, 3.0, 0.2] for b in buffers)
    # and the graph uses them: the first layer's moving mean moves at rate 0.2
    fe.train()
    bn1_mean = dict(fe.named_buffers())["bn1.running_mean"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        batch_mean = fe.conv1(x).mean((0, 2, 3))
    expected = bn1_mean.lerp(batch_mean, 0.2)
    fe(x)
    torch.testing.assert_close(bn1_mean, expected)


def test_set_renorm_hyperparameters_checks_every_value_before_writing():
    from lightning_brn import set_renorm_hyperparameters

    model = torch.nn.Sequential(BatchRenorm2d(3, rmax=2.0))
    with pytest.raises(ValueError, match=r"dmax must be >= 0 .*got dmax=-1.0"):
        set_renorm_hyperparameters(model, rmax=3.0, dmax=-1.0, momentum=0.1)
    assert model[0].rmax == 2.0  # nothing written
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        set_renorm_hyperparameters("model", 1.0, 0.0, 0.1)  # type: ignore[arg-type]
