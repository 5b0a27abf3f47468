"""lightning_brn.distributed and lightning_brn.plugins: real multi-process gloo runs on CPU, in float64.

The runs themselves are scripts (``tests/_dist_worker.py`` for plain torch, ``tests/_dist_lightning.py`` for
Lightning's launcher), started once per module; every test reads what the ranks saved. The reference is always one
process over the ranks' batches concatenated: ``microbatch_size`` = per-rank batch for per-device normalization with
shared averages, the whole batch for the synchronized layer.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_brn import BatchRenorm1d, BatchRenorm2d, BatchRenormAct2d
from lightning_brn.distributed import (
    RunningStatsSharing,
    SyncBatchRenorm,
    SyncBatchRenormAct,
    convert_sync_batch_renorm,
    renorm_buffer_names,
    revert_sync_batch_renorm,
    share_running_stats,
    wait_running_stats,
)

HERE = Path(__file__).parent
WORLD = 2
LIGHTNING = ["shared", "plugin", "sync_batchnorm", "factory", "fsdp2", "fsdp2_sync"]
PLAIN = ["ddp_auto", "ddp_explicit", "ddp_no_sync", "ddp_local", "ddp_microbatches", "resume", "fsdp", "compiled", "sync", "sync_subgroups",
         "sync_fsdp"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_brn_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(HERE))
    return module


worker = _load("_dist_worker")


def _run(args: list[str], env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    env = _subprocess_env()
    _run([str(HERE / "_dist_worker.py"), str(out), str(WORLD), ",".join(PLAIN)], env)
    return out


@pytest.fixture(scope="module")
def subgroup_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("subgroups")
    _run([str(HERE / "_dist_worker.py"), str(out), "4", "sync_subgroups"], _subprocess_env())
    return out


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lightning")
    _run([str(HERE / "_dist_lightning.py"), str(out), ",".join(LIGHTNING)], _subprocess_env())
    return out


def _subprocess_env() -> dict[str, str]:
    import os

    # what an in-process DDP run leaves in os.environ would make the scripts join its finished rendezvous
    skip = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _ranks(folder: Path, name: str, world: int = WORLD) -> list[dict]:
    return [torch.load(folder / f"{name}_rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor], exact: bool = False) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- shared moving averages
@pytest.mark.parametrize("name", ["ddp_auto", "ddp_explicit", "fsdp", "compiled"])
def test_shared_averages_identical_on_every_rank_and_equal_one_process_over_microbatches(plain_runs, name):
    """DDP with nothing configured (its buffer broadcast on), DDP after share_running_stats (broadcast off),
    FSDP2's fully_shard, and torch.compile(fullgraph=True) (a functional all-reduce in the graph): after every step the averages are bit-identical on both ranks and equal, in float64, one
    process normalizing the concatenated batch in microbatches of the per-rank batch."""
    ranks = _ranks(plain_runs, name)
    expected = worker.reference(WORLD)
    assert len(ranks[0]["seen"]) == worker.STEPS
    for step in range(worker.STEPS):
        _assert_same(ranks[0]["seen"][step], ranks[1]["seen"][step], exact=True)
        _assert_same(ranks[0]["seen"][step], expected[step])
    # rank-dependent data: the averages moved away from rank 0's own
    assert (ranks[0]["seen"][-1][0] - worker.make_model()[0].running_mean).abs().max() > 0.1


def test_shared_averages_weight_each_layer_by_its_groups(plain_runs):
    """One all-reduce for layers with different eps and microbatches (2 groups per rank in the first layer, 1 in the
    second): equal, in float64, one process over the concatenated batch with microbatches of 2 and of the per-rank
    batch."""
    ranks = _ranks(plain_runs, "ddp_microbatches")
    expected = worker.reference(WORLD, microbatch_size=(2, worker.B))
    for step in range(worker.STEPS):
        _assert_same(ranks[0]["seen"][step], ranks[1]["seen"][step], exact=True)
        _assert_same(ranks[0]["seen"][step], expected[step])


def test_without_sharing_the_averages_diverge(plain_runs):
    """share_running_stats(enabled=False): each rank keeps the averages of its own data (what DDP did before)."""
    ranks = _ranks(plain_runs, "ddp_local")
    assert (ranks[0]["seen"][-1][0] - ranks[1]["seen"][-1][0]).abs().max() > 0.5


def test_share_running_stats_keeps_renorm_buffers_out_of_ddp_broadcast(plain_runs):
    ignored = _ranks(plain_runs, "ddp_explicit")[0]["ignored"]
    assert {"0.running_mean", "0.running_var", "0._schedule", "0._correction", "2.running_var"} <= set(ignored)
    assert not any(n.endswith(("weight", "bias")) for n in ignored)


def test_gradient_accumulation_no_sync_shares_every_forward(plain_runs):
    """Under no_sync every forward moves the averages, as in one process, and each forward's update is shared."""
    ranks = _ranks(plain_runs, "ddp_no_sync")
    expected = worker.reference(WORLD, micro_steps=2)
    for step in range(worker.STEPS):
        _assert_same(ranks[0]["seen"][step], ranks[1]["seen"][step], exact=True)
        _assert_same(ranks[0]["seen"][step], expected[step])


def test_ddp_checkpoint_resumes_on_one_process_and_on_two(plain_runs):
    state = torch.load(plain_runs / "ddp_auto_rank0.pt", weights_only=False)["state"]
    final = worker.reference(WORLD)[-1]
    # the rank-0 checkpoint holds the shared averages
    model = worker.make_model()
    model.load_state_dict(state)
    _assert_same(worker.averages(model), final)
    # one process continuing from it over both ranks' next batches, as microbatches
    one = worker.make_model(microbatch_size=worker.B)
    one.load_state_dict(state)
    opt = torch.optim.SGD(one.parameters(), lr=0.1)
    worker.loss_fn(one(torch.cat([worker.batch(worker.STEPS, r) for r in range(WORLD)]))).backward()
    opt.step()
    two = _ranks(plain_runs, "resume")
    _assert_same(two[0]["seen"][0], two[1]["seen"][0], exact=True)
    _assert_same(two[0]["seen"][0], worker.averages(one))


# --------------------------------------------------------------------------- SyncBatchRenorm
def _check_sync(folder: Path, name: str, world: int, group_size: int) -> None:
    ref = worker.sync_reference(world, group_size)
    ranks = _ranks(folder, name, world)
    for rank, got in enumerate(ranks):
        for step in range(2):
            a, b = got["steps"][step], ref["steps"][step]
            torch.testing.assert_close(a["y"], b["y"].chunk(world)[rank], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a["grad_x"], b["grad_x"].chunk(world)[rank], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a["grads"], b["grads"], rtol=1e-12, atol=1e-12)  # weight and bias
        for key, value in ref["buffers"].items():
            torch.testing.assert_close(got["buffers"][key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_sync_layer_equals_one_process_on_the_concatenated_batch(plain_runs):
    """Output, input / weight / bias gradients and buffers over two steps (r and d clip on some channels)."""
    _check_sync(plain_runs, "sync", WORLD, WORLD)


def test_sync_layer_under_fsdp2_equals_one_process_on_the_concatenated_batch(plain_runs):
    """Under FSDP2's fully_shard: output, input gradient, gathered weight / bias gradients and state as above."""
    _check_sync(plain_runs, "sync_fsdp", WORLD, WORLD)


def test_sync_layer_over_singleton_subgroups_is_per_device_normalization_with_shared_averages(plain_runs):
    _check_sync(plain_runs, "sync_subgroups", WORLD, 1)


def test_sync_layer_over_subgroups_of_two_of_four_ranks(subgroup_runs):
    """4 processes, subgroups {0, 1} and {2, 3}: the paper's microbatches spread over devices, equal to one process
    with microbatches of two ranks' batches (statistics over each subgroup, averages shared by all four)."""
    _check_sync(subgroup_runs, "sync_subgroups", 4, 2)


# --------------------------------------------------------------------------- Lightning
def _lightning_reference(inputs: list[list[torch.Tensor]], microbatch_size) -> list[list[torch.Tensor]]:
    model = worker.make_model(microbatch_size=microbatch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step_inputs in zip(*inputs):
        worker.loss_fn(model(torch.cat(step_inputs))).backward()
        opt.step()
        opt.zero_grad()
        seen.append(worker.averages(model))
    return seen


@pytest.mark.parametrize("mode", ["shared", "fsdp2", "plugin", "factory", "fsdp2_sync"])
def test_lightning_averages_identical_on_every_rank_and_in_the_checkpoint(lightning_runs, mode):
    """devices=2: the default under DDP and under ModelParallelStrategy (FSDP2's fully_shard in configure_model)
    (shared averages, per-device normalization) equals one process over microbatches; plugins=[RenormLayerSync()],
    and sync_batchnorm=True alone (taken by the package's callbacks_factory entry point), train SyncBatchRenorm
    layers, equal one process over the whole batch, and revert them after fit; so do SyncBatchRenorm layers under
    ModelParallelStrategy (converted in configure_model, not reverted). The checkpoint holds the averages every rank
    holds."""
    ranks = _ranks(lightning_runs, mode)
    per_device = mode in ("shared", "fsdp2")
    expected = _lightning_reference([r["inputs"] for r in ranks], 4 if per_device else None)
    assert len(expected) == 3
    for step in range(len(expected)):
        _assert_same(ranks[0]["seen"][step], ranks[1]["seen"][step], exact=True)
        _assert_same(ranks[0]["seen"][step], expected[step])
    assert ranks[0]["classes"] == (["BatchRenorm1d"] if per_device else ["SyncBatchRenorm"])
    assert ranks[0]["after"] == (["SyncBatchRenorm"] if mode == "fsdp2_sync" else ["BatchRenorm1d"])
    assert ranks[0]["layer_sync"] == ("RenormLayerSync" if mode in ("plugin", "factory") else "NoneType")
    state = torch.load(lightning_runs / f"{mode}.ckpt", weights_only=False)["state_dict"]
    model = worker.make_model()
    model.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    _assert_same(worker.averages(model), ranks[1]["final"], exact=True)


def test_lightning_sync_batchnorm_true_synchronizes_renorm_layers_with_the_scheduler(lightning_runs):
    ranks = _ranks(lightning_runs, "sync_batchnorm")
    assert ranks[0]["classes"] == ["SyncBatchRenorm"] and ranks[0]["after"] == ["BatchRenorm1d"]
    for a, b in zip(ranks[0]["seen"], ranks[1]["seen"]):
        _assert_same(a, b, exact=True)


def _trainer_with_callbacks_factory(monkeypatch, **kwargs):
    """A Trainer built as with ``[project.entry-points."lightning.pytorch.callbacks_factory"]`` installed."""
    pl = pytest.importorskip("lightning.pytorch")
    lightning_script = _load("_dist_lightning")
    import lightning.fabric.utilities.registry as registry

    monkeypatch.setattr(registry, "entry_points", registry.entry_points)  # restored after the test
    lightning_script.register_callbacks_factory()
    return pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False, **kwargs)


def test_callbacks_factory_takes_sync_batchnorm_once_for_models_with_renorm_layers(monkeypatch):
    """Any LightningModule: the entry point's callback replaces Lightning's plugin in setup("fit") when the model has
    renorm layers, says so once, and leaves models without them, other stages and sync_batchnorm=False alone."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from lightning_brn import plugins
    from lightning_brn.plugins import RenormLayerSync, TakeSyncBatchnorm

    said: list[str] = []
    monkeypatch.setattr(plugins, "rank_zero_info", said.append)

    class WithRenorm(pl.LightningModule):
        def __init__(self, renorm: bool) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 3), BatchRenorm1d(3) if renorm else nn.BatchNorm1d(3))

    trainer = _trainer_with_callbacks_factory(monkeypatch, sync_batchnorm=True)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, TakeSyncBatchnorm)]
    callback.setup(trainer, WithRenorm(renorm=False), "fit")  # batchnorm only: Lightning's plugin does it all
    callback.setup(trainer, WithRenorm(renorm=True), "validate")  # the plugin is applied for fit only
    assert type(trainer.strategy._layer_sync) is TorchSyncBatchNorm
    assert said == []
    for _ in range(2):
        callback.setup(trainer, WithRenorm(renorm=True), "fit")
    assert type(trainer.strategy._layer_sync) is RenormLayerSync
    assert len(said) == 1 and "synchronizes the Batch Renorm layers too" in said[0]
    plain = _trainer_with_callbacks_factory(monkeypatch)  # sync_batchnorm off: nothing to take
    (callback,) = [c for c in plain.callbacks if isinstance(c, TakeSyncBatchnorm)]
    callback.setup(plain, WithRenorm(renorm=True), "fit")
    assert plain.strategy._layer_sync is None


def test_take_sync_batchnorm_replaces_only_lightnings_plugin():
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from lightning_brn.plugins import RenormLayerSync, take_sync_batchnorm

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", sync_batchnorm=True, logger=False)
    assert type(trainer.strategy._layer_sync) is TorchSyncBatchNorm
    assert take_sync_batchnorm(trainer) is True
    assert type(trainer.strategy._layer_sync) is RenormLayerSync
    assert take_sync_batchnorm(trainer) is False  # once
    plain = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False)
    assert take_sync_batchnorm(plain) is False and plain.strategy._layer_sync is None


# --------------------------------------------------------------------------- one process: surgery and refusals
def test_layer_sync_plugin_round_trips_the_layers():
    from lightning_brn.plugins import RenormLayerSync

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), BatchRenorm2d(4, rmax=2.0, dmax=0.5), nn.BatchNorm2d(4), BatchRenormAct2d(4, act_layer="silu")
    )
    params = [id(p) for p in model.parameters()]
    buffers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model).eval()
    plugin = RenormLayerSync()
    synced = plugin.apply(model)
    assert [type(m) for m in synced] == [nn.Conv2d, SyncBatchRenorm, nn.SyncBatchNorm, SyncBatchRenormAct]
    assert isinstance(synced[3].act, nn.SiLU)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(synced.eval()(x), reference(x))  # the act survives: eval outputs are the same
    assert synced[1].rmax == 2.0 and synced[1].dmax == 0.5
    assert "1.running_mean" in synced._ddp_params_and_buffers_to_ignore
    back = plugin.revert(synced)
    assert [type(m).__name__ for m in back] == ["Conv2d", "BatchRenorm2d", "_BatchNormXd", "BatchRenormAct2d"]
    assert isinstance(back[3].act, nn.SiLU)
    assert [id(p) for p in back.parameters()] == params  # the same Parameter objects throughout
    assert {k: v.data_ptr() for k, v in back.state_dict().items()} == buffers
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert back[1].rmax == 2.0


def test_sync_batch_renorm_on_one_process_is_the_local_layer():
    torch.manual_seed(0)
    local = BatchRenorm2d(4, rmax=1.5, dmax=0.5, momentum=0.1).double()
    synced = convert_sync_batch_renorm(copy.deepcopy(local))
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(synced(x), local(x))
    torch.testing.assert_close(synced.running_var, local.running_var)
    assert "process_group=None" in repr(synced) and "rmax=1.5" in repr(synced)
    synced.eval()
    local.eval()
    torch.testing.assert_close(synced(x), local(x))


def test_refused_combinations():
    with pytest.raises(ValueError, match="SyncBatchRenorm does not take microbatch_size"):
        SyncBatchRenorm(4, microbatch_size=2)
    with pytest.raises(ValueError, match="layer '1' normalizes microbatches of 2"):
        convert_sync_batch_renorm(nn.Sequential(nn.Conv2d(3, 4, 1), BatchRenorm2d(4, microbatch_size=2)))
    with pytest.raises(ValueError, match="does not take microbatch_size"):
        SyncBatchRenorm(4).microbatch_size = 2
    with pytest.raises(TypeError, match="enabled must be a bool"):
        share_running_stats(nn.Sequential(BatchRenorm1d(2)), enabled="yes")


def test_one_process_pays_nothing_and_decides_nothing():
    """Without torch.distributed the layer shares nothing and attaches nothing (one attribute read per forward)."""
    layer = BatchRenorm1d(3)
    layer(torch.randn(4, 3))
    assert layer.running_stats_sharing is None and not layer._state_dict_pre_hooks


def test_sharing_is_neither_copied_nor_pickled():
    import pickle

    model = share_running_stats(nn.Sequential(nn.Linear(2, 3), BatchRenorm1d(3)))
    assert isinstance(model[1].running_stats_sharing, RunningStatsSharing)
    assert copy.deepcopy(model)[1].running_stats_sharing is None  # e.g. an EMA copy decides again
    assert pickle.loads(pickle.dumps(model))[1].running_stats_sharing is None
    wait_running_stats(model)  # nothing in flight: a no-op
    model(torch.randn(4, 2))  # no process group: the local step
    share_running_stats(model, enabled=False)
    assert model[1].running_stats_sharing is False
    assert renorm_buffer_names(model)[:3] == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert type(revert_sync_batch_renorm(convert_sync_batch_renorm(model))[1]) is BatchRenorm1d
