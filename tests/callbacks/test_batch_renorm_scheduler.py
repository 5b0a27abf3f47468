"""Tests of lightning_brn.callbacks.BatchRenormScheduler with real (tiny, CPU) Trainer runs (issue 5)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_brn import BatchRenorm2d, BatchRenormAct2d, RenormSchedule, is_batch_renorm
from lightning_brn.callbacks import BatchRenormScheduler

# warm-up 2 steps, rmax 1 -> 3 at step 6, dmax 0 -> 4 at step 4
SMALL = RenormSchedule(warmup_steps=2, rmax=3.0, rmax_steps=6, dmax=4.0, dmax_steps=4, momentum=0.1)
METRICS = [
    "brn/rmax",
    "brn/dmax",
    "brn/momentum",
    "brn/r_clipped_frac",
    "brn/d_clipped_frac",
    "brn/mean_abs_r_minus_1",
    "brn/mean_abs_d",
]


def make_net(norm: str = "brn") -> nn.Module:
    if norm == "brn":
        n1: nn.Module = BatchRenorm2d(4)
        n2: nn.Module = BatchRenormAct2d(6)
    else:
        n1, n2 = nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(6), nn.ReLU())
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), n1, nn.ReLU(), nn.Conv2d(4, 6, 3), n2, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)
    )


class TinyModule(pl.LightningModule):
    """Records the renorm values every layer carries when each training step runs."""

    def __init__(self, norm: str = "brn", n: int = 32, batch_size: int = 4, compile_backend: Any = None) -> None:
        super().__init__()
        self.net = make_net(norm)
        if compile_backend is not None:
            self.net = torch.compile(self.net, backend=compile_backend)
        self.n, self.batch_size = n, batch_size
        self.seen: list[tuple[int, int, list[tuple[float, float, float]]]] = []
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 3, 6, 6, generator=g) * 2 + 0.5
        self.y = torch.randint(0, 2, (n,), generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        vals = [(m.rmax, m.dmax, m.momentum) for m in self.modules() if is_batch_renorm(m)]
        self.seen.append((self.global_step, batch_idx, vals))
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


def trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def renorm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if is_batch_renorm(m)]


def layer_values(module: nn.Module) -> list[tuple[float, float, float]]:
    return [(m.rmax, m.dmax, m.momentum) for m in renorm_layers(module)]


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.fixture(autouse=True)
def _no_seed_leak():
    # ``seed_everything`` writes PL_GLOBAL_SEED / PL_SEED_WORKERS: keep them out of other tests.
    keys = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --------------------------------------------------------------------------- values per step
def test_values_change_once_per_optimizer_step_with_accumulation(tmp_path):
    model = TinyModule(n=40)  # 10 batches per epoch: 5 optimizer steps per epoch
    trainer(tmp_path, [BatchRenormScheduler(SMALL, verbose=False)], max_steps=9, accumulate_grad_batches=2).fit(model)
    assert len(model.seen) == 18
    for i, (step, _, vals) in enumerate(model.seen):
        assert step == i // 2  # two batches per optimizer step
        expected = tuple(SMALL.values(step))
        assert len(vals) == 2 and all(v == pytest.approx(expected) for v in vals)
    rmax_per_batch = [vals[0][0] for _, _, vals in model.seen]
    assert rmax_per_batch[0::2] == rmax_per_batch[1::2]
    expected = [(1.0, 0.0, 0.1), (1.5, 2.0, 0.1), (2.0, 4.0, 0.1), (2.5, 4.0, 0.1), (3.0, 4.0, 0.1), (3.0, 4.0, 0.1)]
    for s, want in zip((2, 3, 4, 5, 6, 8), expected):
        assert model.seen[2 * s][2][0] == pytest.approx(want)


def test_values_set_at_fit_start_before_any_forward(tmp_path):
    model = TinyModule()
    for m in renorm_layers(model):
        m.rmax, m.dmax, m.momentum = 7.0, 7.0, 0.9  # stale values from elsewhere

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            self.values = layer_values(pl_module)

    probe = Probe()
    schedule = RenormSchedule(warmup_steps=0, rmax_steps=0, dmax_steps=0, momentum=0.05)
    trainer(tmp_path, [BatchRenormScheduler(schedule, verbose=False), probe], max_steps=1).fit(model)
    assert probe.values == [(1.0, 0.0, 0.05)] * 2


# --------------------------------------------------------------------------- eval loops
def test_validate_test_predict_never_update_moving_averages(tmp_path):
    model = TinyModule()
    cb = BatchRenormScheduler(SMALL, verbose=False)
    t = trainer(tmp_path, [cb], max_steps=6, limit_val_batches=2, num_sanity_val_steps=2, val_check_interval=3)
    t.fit(model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert snapshot and not all(torch.equal(v, torch.zeros_like(v)) for v in snapshot.values())
    assert renorm_layers(model)[0].num_batches_tracked.item() == 6  # sanity check and validation did not count
    t.validate(model, verbose=False)
    t.test(model, verbose=False)
    t.predict(model)
    for k, v in model.state_dict().items():
        if k in snapshot:
            assert torch.equal(v, snapshot[k]), k


# --------------------------------------------------------------------------- resume
class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def _fit_uninterrupted(tmp_path: Path, **kwargs: Any) -> TinyModule:
    pl.seed_everything(7, verbose=False)
    model = TinyModule(n=24)  # 6 batches per epoch
    trainer(tmp_path / "full", [BatchRenormScheduler(SMALL, verbose=False)], **kwargs).fit(model)
    return model


def test_crash_and_resume_at_epoch_end_gives_identical_values_and_weights(tmp_path, deterministic):
    ref = _fit_uninterrupted(tmp_path, max_epochs=3)  # 18 steps: through warm-up, ramps and constant part

    pl.seed_everything(7, verbose=False)
    model = TinyModule(n=24)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # at every epoch end
    crashing = trainer(
        tmp_path / "a", [BatchRenormScheduler(SMALL, verbose=False), ckpt, CrashAt(step=6)], max_epochs=3, enable_checkpointing=True
    )
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        crashing.fit(model)
    last = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    assert last.exists()

    pl.seed_everything(99, verbose=False)  # a different init: everything must come from the checkpoint
    resumed = TinyModule(n=24)
    for m in renorm_layers(resumed):
        m.rmax, m.dmax, m.momentum = 9.0, 9.0, 0.5  # stale values must never reach a forward
    t = trainer(tmp_path / "b", [BatchRenormScheduler(SMALL, verbose=False)], max_epochs=3, enable_checkpointing=True)
    t.fit(resumed, ckpt_path=last)
    assert t.global_step == 18
    # the values every layer carried at every step after the resume are the uninterrupted run's
    assert resumed.seen[0][0] == 6
    assert [(s, b, v) for s, b, v in ref.seen if s >= 6] == resumed.seen
    assert layer_values(resumed) == layer_values(ref)
    # and, with deterministic CPU settings, the same weights and moving averages after the same steps
    ref_sd, res_sd = ref.state_dict(), resumed.state_dict()
    assert ref_sd.keys() == res_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], res_sd[k]), k


def test_crash_mid_epoch_and_resume_restores_values_of_the_restored_step(tmp_path):
    ref = _fit_uninterrupted(tmp_path, max_steps=10)
    pl.seed_everything(7, verbose=False)
    model = TinyModule(n=24)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(
            tmp_path / "a", [BatchRenormScheduler(SMALL, verbose=False), ckpt, CrashAt(step=5)], max_steps=10, enable_checkpointing=True
        ).fit(model)
    ckpt_path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert ckpt_path.exists()

    resumed = TinyModule(n=24)
    for m in renorm_layers(resumed):
        m.rmax, m.dmax, m.momentum = 9.0, 9.0, 0.5
    with pytest.warns(Warning, match="resuming from a checkpoint that ended before the epoch ended"):
        trainer(tmp_path / "b", [BatchRenormScheduler(SMALL, verbose=False)], max_steps=10).fit(resumed, ckpt_path=ckpt_path)
    steps = [s for s, _, _ in resumed.seen]
    assert steps == list(range(4, 10))
    ref_by_step = {s: v for s, _, v in ref.seen}
    for s, _, v in resumed.seen:
        assert v == ref_by_step[s]
    assert layer_values(resumed) == layer_values(ref)


def test_state_dict_is_plain_and_a_changed_schedule_warns(tmp_path):
    cb = BatchRenormScheduler(SMALL)
    sd = cb.state_dict()
    assert sd == {"schedule": SMALL.to_dict()}
    BatchRenormScheduler(SMALL).load_state_dict(sd)  # same schedule: silent
    with pytest.warns(UserWarning, match="resuming with RenormSchedule.*warmup_steps=5000"):
        BatchRenormScheduler().load_state_dict(sd)
    BatchRenormScheduler().load_state_dict({})  # tolerant of checkpoints without the key


# --------------------------------------------------------------------------- logging
def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_logged_metric_names_and_values_in_csv(tmp_path):
    model = TinyModule(n=40)
    logger = CSVLogger(tmp_path, name="csv")
    cb = BatchRenormScheduler(SMALL, log_every_n_steps=2, verbose=False)
    trainer(tmp_path, [cb], max_steps=8, logger=logger, log_every_n_steps=2).fit(model)
    rows = _read_csv(Path(logger.log_dir) / "metrics.csv")
    assert set(METRICS) <= set(rows[0].keys())
    brn_rows = [r for r in rows if r["brn/rmax"]]
    assert [int(r["step"]) for r in brn_rows] == [1, 3, 5, 7]  # Lightning's own step-logging cadence
    for r in brn_rows:
        step = int(r["step"])
        assert float(r["brn/rmax"]) == pytest.approx(SMALL.rmax_at(step))
        assert float(r["brn/dmax"]) == pytest.approx(SMALL.dmax_at(step))
        assert float(r["brn/momentum"]) == pytest.approx(0.1)
        for name in METRICS[3:]:
            assert 0.0 <= float(r[name]) and math.isfinite(float(r[name]))
        assert float(r["brn/r_clipped_frac"]) <= 1.0 and float(r["brn/d_clipped_frac"]) <= 1.0
        # the same step carries the module's own step logging (train_loss): rows line up
        assert any(int(o["step"]) == step and o.get("train_loss") for o in rows)
    warm = brn_rows[0]  # step 1: rmax = 1, dmax = 0, every r and d is on its bound
    assert float(warm["brn/mean_abs_r_minus_1"]) == 0.0 and float(warm["brn/mean_abs_d"]) == 0.0
    assert float(warm["brn/r_clipped_frac"]) == 1.0 and float(warm["brn/d_clipped_frac"]) == 1.0
    late = brn_rows[-1]  # step 7: rmax = 3, dmax = 4: the correction is active and mostly unclipped
    assert float(late["brn/d_clipped_frac"]) < 1.0 and float(late["brn/mean_abs_d"]) > 0.0
    # recording is switched off outside the logged steps and after fit
    assert not any(m.track_correction for m in renorm_layers(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_values_and_logging_on_gpu(tmp_path):
    model = TinyModule(n=40)
    logger = CSVLogger(tmp_path, name="csv")
    cb = BatchRenormScheduler(SMALL, log_every_n_steps=2, verbose=False)
    trainer(tmp_path, [cb], max_steps=8, logger=logger, log_every_n_steps=2, accelerator="gpu").fit(model)
    assert all(m._schedule.device.type == "cuda" for m in renorm_layers(model))
    assert layer_values(model) == [tuple(SMALL.values(7))] * 2
    rows = [r for r in _read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("brn/rmax")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7]
    assert all(r["brn/mean_abs_r_minus_1"] for r in rows)


def test_logging_follows_trainer_cadence_and_accumulation(tmp_path):
    model = TinyModule(n=40)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(
        tmp_path, [BatchRenormScheduler(SMALL, verbose=False)], max_steps=6, logger=logger, log_every_n_steps=3, accumulate_grad_batches=2
    ).fit(model)
    rows = [r for r in _read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("brn/rmax")]
    assert [int(r["step"]) for r in rows] == [2, 5]
    assert [float(r["brn/rmax"]) for r in rows] == pytest.approx([SMALL.rmax_at(2), SMALL.rmax_at(5)])


def test_metrics_reach_callback_metrics_and_the_rows_of_the_module_metrics(tmp_path):
    model = TinyModule(n=40)
    logger = CSVLogger(tmp_path, name="csv")
    monitor = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="brn/mean_abs_d", mode="max", every_n_train_steps=2)
    t = trainer(
        tmp_path, [BatchRenormScheduler(SMALL, verbose=False), monitor], max_steps=8, logger=logger, log_every_n_steps=2,
        enable_checkpointing=True,
    )
    t.fit(model)
    for metrics in (t.callback_metrics, t.logged_metrics):
        assert set(METRICS) <= set(metrics)
        assert float(metrics["brn/rmax"]) == pytest.approx(SMALL.rmax_at(7))
    assert monitor.best_model_path and monitor.best_model_score is not None  # monitored a brn/ metric
    rows = [r for r in _read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("brn/rmax")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7]
    assert all(r["train_loss"] for r in rows)  # one row per step for the module's metrics and the callback's


def test_own_cadence_logs_at_its_steps_and_into_callback_metrics(tmp_path):
    model = TinyModule(n=40)
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(
        tmp_path, [BatchRenormScheduler(SMALL, log_every_n_steps=2, verbose=False)], max_steps=8, logger=logger,
        log_every_n_steps=3,
    )
    t.fit(model)
    rows = [r for r in _read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("brn/rmax")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7]
    assert [float(r["brn/rmax"]) for r in rows] == pytest.approx([SMALL.rmax_at(s) for s in (1, 3, 5, 7)])
    assert float(t.callback_metrics["brn/rmax"]) == pytest.approx(SMALL.rmax_at(7))


class TwoOptimizers(TinyModule):
    """Manual optimization stepping two optimizers per batch (a GAN's pattern)."""

    def __init__(self) -> None:
        super().__init__(n=16)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.seen.append((self.global_step, batch_idx, layer_values(self)))
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = list(self.parameters())
        return [torch.optim.SGD(params[:4], lr=0.1), torch.optim.SGD(params[4:], lr=0.1)]


def test_several_optimizers_under_manual_optimization_advance_the_schedule_per_optimizer_step(tmp_path):
    model = TwoOptimizers()
    t = trainer(tmp_path, [BatchRenormScheduler(SMALL, verbose=False)], max_epochs=1)
    t.fit(model)
    assert t.global_step == 8 and t.estimated_stepping_batches == 4  # as documented: size the schedule in steps
    assert [s for s, _, _ in model.seen] == [0, 2, 4, 6]
    for step, _, vals in model.seen:
        assert vals == [pytest.approx(tuple(SMALL.values(step)))] * 2


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning_brn import BatchRenorm1d, RenormSchedule
    from lightning_brn.callbacks import BatchRenormScheduler

    out = sys.argv[1]
    torch.set_num_threads(1)

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), BatchRenorm1d(8), nn.ReLU(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x + 3 * self.global_rank), y)  # ranks see different data

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g))
            return DataLoader(data, batch_size=8)

    class Dump(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("brn/")}
            with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
                json.dump({"metrics": metrics}, f)

    callbacks = [
        BatchRenormScheduler(RenormSchedule(warmup_steps=1, rmax_steps=4, dmax_steps=4), verbose=False),
        ModelCheckpoint(dirpath=f"{out}/ckpt", monitor="brn/mean_abs_d", mode="max", every_n_train_steps=2),
        EarlyStopping(monitor="brn/rmax", mode="max", patience=100, check_on_train_epoch_end=True),
        Dump(),
    ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, log_every_n_steps=2, logger=CSVLogger(out),
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=True,
    )
    trainer.fit(M())
    """
)


def test_ddp_every_rank_logs_the_all_reduced_metrics_so_they_can_be_monitored(tmp_path, ddp_subprocess_env):
    """Under DDP the brn/ metrics exist on every rank (a monitored metric on rank 0 only hangs ModelCheckpoint's
    barrier and fails EarlyStopping on the others), with the channels of both ranks in the fractions."""
    script = tmp_path / "ddp_monitor.py"
    script.write_text(_DDP_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240, env=ddp_subprocess_env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert set(METRICS) <= set(ranks[0]["metrics"])
    # the ranks normalize different data: equal values are the all-reduced ones
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert list((tmp_path / "ckpt").glob("*.ckpt"))  # the monitored checkpoint was written
    rows = [r for r in _read_csv(next(tmp_path.glob("lightning_logs/version_0/metrics.csv"))) if r.get("brn/rmax")]
    assert rows and all(r["brn/r_clipped_frac"] for r in rows)


def test_without_a_logger_the_metrics_still_reach_callback_metrics(tmp_path):
    model = TinyModule(n=40)
    t = trainer(tmp_path, [BatchRenormScheduler(SMALL, verbose=False)], max_steps=4, log_every_n_steps=2)
    t.fit(model)
    assert set(METRICS) <= set(t.callback_metrics)
    assert not any(m.track_correction for m in renorm_layers(model))


def test_log_every_n_steps_zero_disables_logging_and_recording(tmp_path):
    model = TinyModule()

    class Spy(Callback):
        tracked = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.tracked |= any(m.track_correction for m in renorm_layers(pl_module))

    spy = Spy()
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [BatchRenormScheduler(SMALL, log_every_n_steps=0, verbose=False), spy], max_steps=4, logger=logger, log_every_n_steps=1).fit(model)
    rows = _read_csv(Path(logger.log_dir) / "metrics.csv")
    assert not any(k.startswith("brn/") for k in rows[0])
    assert not spy.tracked


# --------------------------------------------------------------------------- conversion and errors
def test_model_without_renorm_layers_is_an_error_at_fit_start(tmp_path):
    model = TinyModule(norm="bn")
    with pytest.raises(MisconfigurationException, match="no Batch Renorm layer in TinyModule.*convert=True") as info:
        trainer(tmp_path, [BatchRenormScheduler(SMALL, verbose=False)], max_steps=1).fit(model)
    assert isinstance(info.value, ValueError)


def test_convert_true_converts_in_setup_before_optimizers(tmp_path):
    model = TinyModule(norm="bn")
    assert not renorm_layers(model)

    class OptimizerProbe(Callback):
        def on_train_start(self, trainer, pl_module):
            self.opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}

    probe = OptimizerProbe()
    cb = BatchRenormScheduler(SMALL, convert=True, verbose=False)
    trainer(tmp_path, [cb, probe], max_steps=5).fit(model)
    layers = renorm_layers(model)
    assert len(layers) == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(id(p) in probe.opt_params for m in layers for p in m.parameters())
    assert layer_values(model) == [tuple(SMALL.values(4))] * 2
    assert model.seen[3][2] == [tuple(SMALL.values(3))] * 2


def test_convert_passes_microbatch_size_and_exclude(tmp_path):
    model = TinyModule(norm="bn")
    cb = BatchRenormScheduler(SMALL, convert=True, microbatch_size=2, exclude="net.4.*", verbose=False)
    trainer(tmp_path, [cb], max_steps=2).fit(model)
    layers = renorm_layers(model)
    assert len(layers) == 1 and layers[0] is model.net[1] and layers[0].microbatch_size == 2
    assert isinstance(model.net[4][0], nn.BatchNorm2d)  # excluded by name pattern
    assert cb.layers == layers


def test_custom_schedule_with_the_same_interface(tmp_path):
    class StepSchedule:
        def values(self, step):
            return (1.0 + step, 0.5 * step, 0.2)

        def to_dict(self):
            return {"kind": "step"}

    model = TinyModule()
    trainer(tmp_path, [BatchRenormScheduler(StepSchedule(), verbose=False)], max_steps=3).fit(model)
    assert [v[0] for _, _, v in model.seen] == [(1.0, 0.0, 0.2), (2.0, 0.5, 0.2), (3.0, 1.0, 0.2)]


@pytest.mark.parametrize(
    ("kwargs", "kind", "match"),
    [
        (dict(schedule={"warmup_steps": 3}), TypeError, "`schedule` must be a lightning_brn.RenormSchedule.*warmup_steps"),
        (dict(schedule=0.01), TypeError, "`schedule` must be a lightning_brn.RenormSchedule.*got 0.01 of type float"),
        (dict(convert="yes"), TypeError, "convert must be a bool, got convert='yes'"),
        (dict(log_every_n_steps=-1), ValueError, "log_every_n_steps=-1"),
        (dict(log_every_n_steps=2.5), TypeError, "log_every_n_steps=2.5"),
        (dict(log_every_n_steps=True), TypeError, "log_every_n_steps=True"),
        (dict(convert=True, microbatch_size=0), ValueError, "microbatch_size=0"),
        (dict(convert=True, microbatch_size="4"), TypeError, "microbatch_size='4'"),
        (dict(microbatch_size=4), ValueError, "need convert=True"),
        (dict(exclude=["head"]), ValueError, "need convert=True"),
        (dict(verbose=None), TypeError, "verbose=None"),
    ],
)
def test_bad_arguments_are_named(kwargs, kind, match):
    # Lightning's MisconfigurationException, and the TypeError / ValueError that RenormSchedule raises
    with pytest.raises(MisconfigurationException, match=match) as info:
        BatchRenormScheduler(**kwargs)
    assert isinstance(info.value, kind)


def test_defaults_and_jsonargparse():
    assert BatchRenormScheduler().schedule == RenormSchedule()
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--cb", type=BatchRenormScheduler)
    cfg = parser.parse_string(
        """
cb:
  class_path: lightning_brn.callbacks.BatchRenormScheduler
  init_args:
    schedule:
      class_path: lightning_brn.RenormSchedule
      init_args: {warmup_steps: 10, rmax_steps: 20, dmax_steps: 20}
    log_every_n_steps: 5
"""
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    cb = instantiate(cfg).cb
    assert isinstance(cb, BatchRenormScheduler)
    assert cb.schedule == RenormSchedule(warmup_steps=10, rmax_steps=20, dmax_steps=20)


# --------------------------------------------------------------------------- compile and console
def test_compiled_model_does_not_recompile_when_values_change(tmp_path):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = TinyModule(compile_backend=counter)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [BatchRenormScheduler(SMALL, log_every_n_steps=3, verbose=False)], max_steps=8, logger=logger).fit(model)
    torch._dynamo.reset()
    # rmax/dmax change at steps 3..6 (in-place fills): no recompile. Recording in logged steps is one more graph.
    assert 1 <= counter.frame_count <= 2
    assert layer_values(model) == [tuple(SMALL.values(7))] * 2
    rows = [r for r in _read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("brn/rmax")]
    assert [int(r["step"]) for r in rows] == [2, 5]
    assert all(r["brn/r_clipped_frac"] for r in rows)


def test_one_time_summary_rich_and_plain(tmp_path, capsys, caplog):
    from lightning.pytorch.callbacks import RichProgressBar

    pytest.importorskip("rich")
    model = TinyModule()
    trainer(tmp_path, [BatchRenormScheduler(SMALL), RichProgressBar()], max_steps=1, enable_progress_bar=True).fit(model)
    out = capsys.readouterr().out
    assert "Batch Renorm" in out and "BatchRenorm2d" in out and "BatchRenormAct2d" in out

    import logging

    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [BatchRenormScheduler(SMALL)], max_steps=1).fit(TinyModule())
    assert "Batch Renorm: renorm layers: 2" in caplog.text


# --------------------------------------------------------------------------- fitted to the run, order, non-finite
@pytest.mark.parametrize("length", [dict(max_epochs=2, max_steps=-1), dict(max_steps=5)], ids=["epochs", "steps"])
def test_schedule_fitted_to_the_run_length_lightning_knows(tmp_path, length):
    cb = BatchRenormScheduler(RenormSchedule.for_run, verbose=False)
    with pytest.raises(RuntimeError, match="fitted to the run's length at fit start"):
        cb.schedule
    model = TinyModule(n=32)  # 8 batches an epoch
    t = trainer(tmp_path, [cb], **length)
    t.fit(model)
    total = 16 if "max_epochs" in length else 5
    assert t.global_step == total
    assert cb.schedule == RenormSchedule.for_run(total)
    assert cb.state_dict() == {"schedule": RenormSchedule.for_run(total).to_dict()}


def test_fitted_schedule_with_zero_steps_and_without_a_length(tmp_path):
    cb = BatchRenormScheduler(RenormSchedule.for_run, verbose=False)
    trainer(tmp_path, [cb], max_steps=0).fit(TinyModule())  # nothing to train: no error
    with pytest.raises(MisconfigurationException, match="run has none .max_steps=-1 and max_epochs=-1"):
        trainer(tmp_path, [BatchRenormScheduler(RenormSchedule.for_run)], max_steps=-1, max_epochs=-1).fit(TinyModule())


@pytest.mark.parametrize("ema_first", [True, False], ids=["ema-first", "scheduler-first"])
@pytest.mark.parametrize("ema_source", ["lightning", "lightning_brn"])
def test_convert_works_in_either_callback_order_with_weight_averaging(tmp_path, ema_first, ema_source):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from lightning_brn.callbacks import ResumableEMAWeightAveraging

    ema_class = EMAWeightAveraging if ema_source == "lightning" else ResumableEMAWeightAveraging
    ema = ema_class(decay=0.5, use_buffers=True)
    scheduler = BatchRenormScheduler(SMALL, convert=True, verbose=False)
    model = TinyModule(norm="bn")  # two batchnorms of different widths
    trainer(tmp_path, [ema, scheduler] if ema_first else [scheduler, ema], max_steps=3).fit(model)
    assert len(renorm_layers(model)) == 2
    # the average was taken of the converted model, and copied back into it at the end of training
    assert all(torch.isfinite(m.running_var).all() for m in renorm_layers(model))
    assert ema.should_update(step_idx=3)


def test_resume_summary_shows_the_restored_step(tmp_path, caplog):
    import logging

    model = TinyModule(n=24)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path, [BatchRenormScheduler(SMALL, verbose=False), ckpt], max_steps=4, enable_checkpointing=True).fit(model)
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [BatchRenormScheduler(SMALL)], max_steps=6).fit(TinyModule(n=24), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert "now: step 4:" in caplog.text and "now: step 0" not in caplog.text


class OneBadBatch(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        if self.global_step == 1:
            x = x.clone()
            x[0, 0, 0, 0] = float("inf")
        loss = nn.functional.cross_entropy(self(x), y)
        return loss if torch.isfinite(loss) else None  # Lightning skips the optimizer step


def test_nonfinite_batches_are_logged_and_summed_at_the_end(tmp_path):
    model = OneBadBatch()
    cb = BatchRenormScheduler(SMALL, log_every_n_steps=1, verbose=False)
    t = trainer(tmp_path, [cb], max_steps=4)
    with pytest.warns(UserWarning, match=r"BatchRenormScheduler: 2 training batch\(es\) .* non-finite"):
        t.fit(model)
    assert t.callback_metrics["brn/nonfinite_batches"].item() == 2  # both layers saw it
    assert all(torch.isfinite(m.running_mean).all() and m.nonfinite_batches == 1 for m in renorm_layers(model))


def test_a_fitting_function_that_returns_no_schedule_is_named(tmp_path):
    def bad(total_steps: int) -> Any:
        return {"steps": total_steps}

    with pytest.raises(MisconfigurationException, match=r"returned \{'steps': 5\} of type dict for 5 steps"):
        trainer(tmp_path, [BatchRenormScheduler(bad, verbose=False)], max_steps=5).fit(TinyModule())
