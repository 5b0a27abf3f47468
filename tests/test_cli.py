"""The ``lightning-brn`` command: recipes by name, the embedded default, resume, bad configs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_brn.cli import DEFAULT_RECIPE, available_recipes, cli_main, expand_recipe_args, main, recipe_path

QUIET = ["--trainer.enable_model_summary", "false"]


@pytest.fixture()
def fmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_fmnist) -> Path:
    monkeypatch.chdir(tmp_path)  # runs/ lands in tmp_path
    return make_fmnist(tmp_path / "fmnist")


# ----------------------------------------------------------------------------- recipe names
def test_recipes_ship_as_package_data() -> None:
    names = available_recipes()
    assert DEFAULT_RECIPE in names
    for setting in ("iid", "microbatch", "noniid"):
        for norm in ("bn", "brn"):
            assert f"imagenet_{setting}_{norm}" in names and f"fmnist_{setting}_{norm}" in names
    assert all(summary for summary in names.values()), "every recipe starts with a header comment"
    assert Path(recipe_path("fmnist_iid_brn")).is_file()


def test_expand_recipe_args() -> None:
    base = ["--config", recipe_path("fmnist_iid_brn")]  # the recipe the fmnist variants and the default extend
    args, name = expand_recipe_args(["fit", "--recipe", "fmnist_iid_bn", "--trainer.max_steps=3"])
    assert args == ["fit", *base, "--config", recipe_path("fmnist_iid_bn"), "--trainer.max_steps=3"]
    assert name == "fmnist_iid_bn"
    args, _ = expand_recipe_args(["fit", "--config=fmnist_noniid_brn.yaml"])
    assert args == ["fit", *base, "--config", recipe_path("fmnist_noniid_brn")]
    args, name = expand_recipe_args(["test", "--ckpt_path", "x.ckpt"])
    assert args[:5] == ["test", *base, "--config", recipe_path(DEFAULT_RECIPE)] and name == DEFAULT_RECIPE
    assert expand_recipe_args(["--help"])[0] == ["--help"]
    with pytest.raises(SystemExit, match=r"unknown recipe 'fmnist_iid_brnn'.*Did you mean fmnist_iid_brn"):
        expand_recipe_args(["fit", "--recipe", "fmnist_iid_brnn"])


def test_config_file_path_is_kept(tmp_path: Path) -> None:
    cfg = tmp_path / "mine.yaml"
    shutil.copy(recipe_path("default"), cfg)
    args, name = expand_recipe_args(["fit", "--config", str(cfg)])
    assert args == ["fit", "--config", recipe_path("fmnist_iid_brn"), "--config", str(cfg)] and name == "mine"


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"]])
def test_help_lists_recipes(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in available_recipes():
        assert name in out
    assert "--recipe NAME" in out


def test_print_config_of_a_recipe(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--recipe", "imagenet_noniid_brn", "--print_config"])
    out = capsys.readouterr().out
    assert "model_name: inception_v3" in out and "sampling: non_iid" in out and "RMSpropTF" in out


def test_python_dash_m_and_console_script() -> None:
    out = subprocess.run([sys.executable, "-m", "lightning_brn", "--help"], capture_output=True, text=True, check=True)
    assert "fmnist_iid_brn" in out.stdout and "fit" in out.stdout
    assert "args parameter" not in out.stderr  # no LightningCLI warning about argv on every command line
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-brn"]
    assert script.value == "lightning_brn.cli:main"


# ----------------------------------------------------------------------------- the embedded default
def test_embedded_default_end_to_end_and_resume(fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    """A bare ``fit`` (plus a cut-down budget and tiny data) trains, validates, checkpoints, logs and resumes."""
    budget = ["--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "8", "--trainer.log_every_n_steps", "2", *QUIET]
    cli = cli_main(["fit", *budget, "--trainer.max_steps", "6"])
    trainer = cli.trainer
    assert trainer.global_step == 6
    assert cli.model.normalization == "brn"
    out = capsys.readouterr().out
    assert "lightning-brn fit: done" in out and "top-1" in out
    assert "batch renorm" in out and "channels clipped" in " ".join(out.split())  # (rich may wrap the row)
    assert "val/acc1" in trainer.callback_metrics
    last = Path("runs/default/version_0/checkpoints/last.ckpt")
    assert last.is_file()
    assert Path("runs/default/version_0/metrics.csv").is_file()
    metrics = Path("runs/default/version_0/metrics.csv").read_text()
    assert "val/acc1" in metrics and "brn/rmax" in metrics
    saved = torch.load(last, weights_only=True)  # written as fit ended: the EMA, and the training weights to resume
    assert saved["global_step"] == 6 and saved["state_dict"].keys() == saved["current_model_state"].keys()
    assert not all(torch.equal(v, saved["current_model_state"][k]) for k, v in saved["state_dict"].items())

    cli2 = cli_main(["fit", *budget, "--trainer.max_steps", "9", "--ckpt_path", str(last)])
    assert cli2.trainer.global_step == 9
    assert Path("runs/default/version_1").is_dir()

    cli3 = cli_main(["validate", *budget, "--ckpt_path", str(last)])
    assert "val/acc1" in cli3.trainer.callback_metrics


def _first_logged_step(version_dir: Path) -> int:
    import csv

    with open(version_dir / "metrics.csv", newline="") as f:
        return min(int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss"))


def test_ckpt_path_last_resumes_from_the_newest_version(fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    """Every run gets a new version folder, where Lightning's own ``ckpt_path="last"`` finds nothing and trains
    from scratch: the CLI looks in all versions of the run and takes the newest last.ckpt."""
    budget = ["--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "8",
              "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1", *QUIET]
    with pytest.warns(UserWarning, match="no last checkpoint available"):  # nothing yet: Lightning's warning
        cli = cli_main(["fit", *budget, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4 and _first_logged_step(Path("runs/default/version_0")) == 0
    capsys.readouterr()

    cli = cli_main(["fit", *budget, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert _resolved_last(capsys) == Path("runs/default/version_0/checkpoints/last.ckpt").resolve()
    assert cli.trainer.global_step == 6
    assert _first_logged_step(Path("runs/default/version_1")) >= 4  # resumed at step 4, not retrained from 0

    cli = cli_main(["fit", *budget, "--trainer.max_steps", "8", "--ckpt_path", "last"])
    assert _resolved_last(capsys) == Path("runs/default/version_1/checkpoints/last.ckpt").resolve()  # the newest
    assert _first_logged_step(Path("runs/default/version_2")) >= 6

    cli = cli_main(["validate", *budget, "--ckpt_path", "last"])
    assert _resolved_last(capsys) == Path("runs/default/version_2/checkpoints/last.ckpt").resolve()
    assert Path(cli.trainer.ckpt_path).resolve() == Path("runs/default/version_2/checkpoints/last.ckpt").resolve()


def test_ckpt_path_last_with_nothing_to_evaluate_is_refused(fmnist: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """validate/test/predict with no last checkpoint would evaluate the untrained model (Lightning warns)."""
    monkeypatch.delenv("LIGHTNING_BRN_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["validate", "--data.init_args.data_dir", str(fmnist), "--ckpt_path", "last", *QUIET])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "validate --ckpt_path last: no run of 'default' has written a last checkpoint" in err
    assert "Traceback" not in err


def test_ckpt_path_last_with_an_explicit_checkpoint_folder(fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    budget = ["--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "8",
              "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1", *QUIET,
              "--trainer.callbacks.dirpath", "ckpts"]  # the recipe's ModelCheckpoint, its last callback
    cli_main(["fit", *budget, "--trainer.max_steps", "3"])
    assert Path("ckpts/last.ckpt").is_file()
    capsys.readouterr()
    cli = cli_main(["fit", *budget, "--trainer.max_steps", "5", "--ckpt_path", "last"])
    assert _resolved_last(capsys) == Path("ckpts/last.ckpt").resolve()
    assert cli.trainer.global_step == 5 and _first_logged_step(Path("runs/default/version_1")) >= 3


def _resolved_last(capsys: pytest.CaptureFixture) -> Path:
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "--ckpt_path last -> " in ln]
    return Path(line.split(" -> ", 1)[1]).resolve()


def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_find_last_checkpoint_follows_lightnings_rules(tmp_path: Path) -> None:
    """Which file ``--ckpt_path last`` takes, without training: the newest last checkpoint of this run's versions
    (Lightning's name rule), never another run's, a user-named version alone, OnExceptionCheckpoint files, ties
    broken the same way on every rank, remote (fsspec) folders."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_brn.cli import find_last_checkpoint

    runs = tmp_path / "runs"

    def trainer(*callbacks: Any, version: Any = None) -> Trainer:
        return Trainer(logger=CSVLogger(runs, name="r", version=version), callbacks=list(callbacks),
                       default_root_dir=tmp_path, enable_progress_bar=False)

    assert find_last_checkpoint(trainer(ModelCheckpoint(save_last=True))) is None
    v0 = _touch(runs / "r/version_0/checkpoints/last.ckpt", 1000)
    v1 = _touch(runs / "r/version_1/checkpoints/last-v1.ckpt", 2000)
    _touch(runs / "r/version_1/checkpoints/epoch=3-val_last=0.5.ckpt", 3000)  # not a last checkpoint by name
    _touch(runs / "r/version_1/checkpoints/last.ckpt.tmp", 3000)
    _touch(runs / "other/version_0/checkpoints/last.ckpt", 4000)  # another run
    _touch(runs / "r/notes/checkpoints/last.ckpt", 4000)  # not a numbered version
    found = find_last_checkpoint(trainer(ModelCheckpoint(save_last=True)))
    assert found is not None and Path(found).resolve() == v1.resolve()
    os.utime(v0, (2000, 2000))  # a tie: the larger path, whatever the hash seed of each rank
    assert Path(find_last_checkpoint(trainer(ModelCheckpoint(save_last=True)))).resolve() == v1.resolve()
    os.utime(v0, (2500, 2500))
    assert Path(find_last_checkpoint(trainer(ModelCheckpoint(save_last=True)))).resolve() == v0.resolve()
    (v1.parent / "last-link.ckpt").symlink_to(tmp_path / "gone.ckpt")  # a dangling save_last="link"
    assert Path(find_last_checkpoint(trainer(ModelCheckpoint(save_last=True)))).resolve() == v0.resolve()

    a = _touch(runs / "r/a/checkpoints/last.ckpt", 1000)  # a version named by the user is searched alone
    _touch(runs / "r/b/checkpoints/last.ckpt", 5000)
    assert Path(find_last_checkpoint(trainer(ModelCheckpoint(save_last=True), version="a"))).resolve() == a.resolve()

    exc = _touch(tmp_path / "exc/on_exception.ckpt", 6000)
    both = trainer(ModelCheckpoint(save_last=True), OnExceptionCheckpoint(tmp_path / "exc"))
    assert Path(find_last_checkpoint(both)).resolve() == exc.resolve()

    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/lbrn_ckpts/last.ckpt", b"x")
    fs.pipe("/lbrn_ckpts/epoch=0-step=1.ckpt", b"x")
    try:
        assert find_last_checkpoint(trainer(ModelCheckpoint(dirpath="memory://lbrn_ckpts", save_last=True))) == (
            "memory://lbrn_ckpts/last.ckpt"
        )
    finally:
        fs.rm("/lbrn_ckpts", recursive=True)


def test_a_long_run_on_the_cpu_for_want_of_a_gpu_is_warned_about(fmnist: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base = ["fit", "--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "8", *QUIET,
            "--trainer.accelerator", "auto", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0"]
    with pytest.warns(UserWarning, match=r"no GPU found, so this run of max_steps=130000 trains on the CPU"):
        cli_main([*base, "--trainer.max_steps", "130000", "--trainer.max_epochs", "1"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no GPU found.*")
        cli_main([*base, "--trainer.max_steps", "100", "--trainer.max_epochs", "1"])


def test_a_launch_of_several_processes_each_running_one_alone_is_refused(fmnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun / srun started 4 processes but each Trainer would run alone (e.g. devices: auto seeing one GPU):
    four independent runs writing one log folder. Refused before training, naming what to set."""
    for k, v in {"RANK": "1", "GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512", "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(k, v)
    _fails(
        ["fit", "--data.init_args.data_dir", str(fmnist), "--trainer.max_steps", "1", *QUIET],
        MisconfigurationException,
        r"one of 4 started by a cluster launcher .*single process .*--trainer.devices .*--trainer.num_nodes",
    )
    assert not Path("runs").exists()


def test_srun_tasks_are_counted_but_a_batch_scripts_own_process_is_not(fmnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    base = ["fit", "--data.init_args.data_dir", str(fmnist), "--trainer.max_steps", "1", *QUIET]
    cli_main([*base, "--trainer.limit_val_batches", "0"])  # sbatch --ntasks=4 running one python: allowed
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # srun started 4 tasks, each a one-process Trainer
    for k, v in {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(k, v)
    _fails(base, MisconfigurationException, r"one of 4 started by a cluster launcher")


def test_default_root_dir_holds_logs_config_and_checkpoints(fmnist: Path, tmp_path: Path) -> None:
    root = tmp_path / "elsewhere"
    cli = cli_main([
        "fit", "--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "8", "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(root), *QUIET,
    ])
    run = root / "default" / "version_0"
    assert Path(cli.trainer.log_dir) == run
    for name in ("metrics.csv", "config.yaml", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert not Path("runs").exists()  # (the working directory is tmp_path)


# ----------------------------------------------------------------------------- bad configs fail before training
def _fails(argv: list[str], exc: Any, match: str) -> None:
    with pytest.raises(exc, match=match):
        cli_main(argv)


def test_unknown_model_fails_with_suggestion(fmnist: Path) -> None:
    _fails(
        ["fit", "--data.init_args.data_dir", str(fmnist), "--model.model_name", "test_resnett", *QUIET],
        ValueError,
        r"unknown timm model 'test_resnett'; did you mean 'test_resnet'",
    )


def test_missing_data_folder_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # jsonargparse may re-raise the data module's FileNotFoundError as a ValueError quoting it
    missing = (FileNotFoundError, ValueError)
    _fails(["fit", "--data.init_args.data_dir", str(tmp_path / "none")], missing, "apt-get install dataset-fashion-mnist")
    _fails(
        ["fit", "--recipe", "imagenet_iid_brn", "--data.init_args.data_dir", str(tmp_path / "none")],
        missing,
        "ImageNet layout",
    )
    assert not Path("runs").exists(), "nothing may start before the config is validated"


def test_batch_not_divisible_by_microbatch_fails(fmnist: Path) -> None:
    _fails(
        ["fit", "--recipe", "fmnist_microbatch_brn", "--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "30"],
        ValueError,
        r"batch_size=30 is not divisible by microbatch_size=4.*--data.init_args.batch_size to a multiple of 4",
    )
    assert not Path("runs").exists()


def test_batch_not_divisible_by_k_fails(fmnist: Path) -> None:
    _fails(
        ["fit", "--recipe", "fmnist_noniid_brn", "--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "31",
         "--data.init_args.examples_per_label", "2"],
        ValueError,
        r"batch_size=31 is not divisible by examples_per_label=2.*multiple of 2",
    )


def test_bad_normalization_is_rejected_by_the_parser(fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--data.init_args.data_dir", str(fmnist), "--model.normalization", "gn"])
    assert "normalization" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--model.model_name", "test_resnett"], "lightning-brn: error: ValueError: unknown timm model 'test_resnett'; did you mean 'test_resnet'"),
        (["--data.init_args.data_dir", "{missing}"], "lightning-brn: error: FileNotFoundError: Fashion-MNIST not found: the folder '{missing}' does not exist"),
        (["--recipe", "fmnist_microbatch_brn", "--data.init_args.batch_size", "30"], "lightning-brn: error: ValueError: batch_size=30 is not divisible by microbatch_size=4"),
        (["--data.init_args.batch_size", "128"], "lightning-brn: error: ValueError: the training set has 64 examples, fewer than one global batch of 128 (1 process(es) x batch_size=128): lower batch_size (--data.init_args.batch_size"),
        (["--recipe", "fmnist_noniid_brn", "--data.init_args.batch_size", "128"], "lightning-brn: error: ValueError: the dataset is too small for non-i.i.d. batches"),
    ],
)
def test_console_script_reports_config_errors_without_traceback(
    argv: list[str], match: str, fmnist: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LIGHTNING_BRN_TRACEBACK", raising=False)
    missing = str(fmnist.parent / "missing")
    argv = [a.replace("{missing}", missing) for a in argv]
    if "--data.init_args.data_dir" not in argv:
        argv += ["--data.init_args.data_dir", str(fmnist)]
    with pytest.raises(SystemExit) as exc:
        main(["fit", *argv, *QUIET])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match.replace("{missing}", missing) in err
    assert "Traceback" not in err and "nothing was trained" in err
    assert not Path("runs").exists()
    # with the variable set, the exception itself propagates (for debugging)
    monkeypatch.setenv("LIGHTNING_BRN_TRACEBACK", "1")
    with pytest.raises((ValueError, FileNotFoundError)):
        main(["fit", *argv, *QUIET])


@pytest.mark.parametrize("broken", ["no_images", "val_class_not_in_train"])
def test_broken_image_folder_fails_before_training_without_traceback(
    broken: str, tmp_path: Path, make_image_folder: Any, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What only a scan of the files finds (a class folder with no image, a validation class the training folder
    lacks) is reported like the other configuration errors: before any training, one line, exit status 2."""
    monkeypatch.delenv("LIGHTNING_BRN_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "inet", classes=2, per_class=2)
    if broken == "no_images":
        for f in (root / "train" / "n00000001").iterdir():
            f.unlink()
        (root / "train" / "n00000001" / "readme.txt").write_text("not an image")
        match = r"FileNotFoundError: image folder '.*train': Found no valid file for the classes n00000001"
    else:
        (root / "val" / "n00000001").rename(root / "val" / "n99999999")
        match = r"ValueError: '.*val' has classes not in the training folder: \['n99999999'\]"
    argv = [
        "fit", "--recipe", "imagenet_iid_brn", "--data.init_args.data_dir", str(root), "--data.init_args.img_size", "75",
        "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.strategy", "auto", "--trainer.fast_dev_run", "1",
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and re.search(r"lightning-brn: error: " + match, err), err
    assert "Traceback" not in err and "nothing was trained" in err
    assert not Path("runs").exists()


def test_gpu_recipe_on_a_machine_without_gpu_names_the_flags_to_change(
    tmp_path: Path, make_image_folder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the recipe's accelerator works")
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "inet", classes=2, per_class=2)
    _fails(
        ["fit", "--recipe", "imagenet_iid_brn", "--data.init_args.data_dir", str(root), "--trainer.fast_dev_run", "1",
         "--trainer.accelerator", "gpu"],
        MisconfigurationException,
        r"trainer.accelerator='gpu'.*no CUDA GPU.*--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto",
    )
    assert not Path("runs").exists()


def test_ddp_two_cpu_processes_train_validate_and_summarize(fmnist: Path, ddp_subprocess_env: dict[str, str]) -> None:
    """A real 2-process DDP run (gloo, CPU) of a non-i.i.d. recipe with EMA: the EMA copy of the module
    works under DDP, and the closing validation runs on every rank (it is collective)."""
    cmd = [
        sys.executable, "-m", "lightning_brn", "fit", "--recipe", "fmnist_noniid_brn",
        "--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "8", "--data.init_args.examples_per_label", "2",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "2", *QUIET,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ddp_subprocess_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Starting with 2 processes" in out.stdout + out.stderr
    assert "lightning-brn fit: done" in out.stdout and "top-1" in out.stdout
    assert Path("runs/fmnist_noniid_brn/version_0/checkpoints/last.ckpt").is_file()


# ----------------------------------------------------------------------------- what a user meets (issue 20)
def _error_line(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("LIGHTNING_BRN_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(subcommand: str, fmnist: Path, capsys, monkeypatch) -> None:
    err = _error_line([subcommand, "--data.init_args.data_dir", str(fmnist), *QUIET], capsys, monkeypatch)
    assert f"lightning-brn {subcommand} needs --ckpt_path PATH (or --ckpt_path last" in err and "untrained model" in err


def _train(fmnist: Path, *extra: str, steps: int = 2) -> Path:
    cli_main(["fit", "--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "8",
              "--trainer.limit_val_batches", "1", "--trainer.max_steps", str(steps), *QUIET, *extra])
    return Path("runs")


def test_ckpt_path_last_builds_the_model_from_the_checkpoint(fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    """`last` is resolved before the model is built, so the checkpoint's model settings apply, as for a path."""
    _train(fmnist, "--model.model_name", "resnet10t")
    capsys.readouterr()
    cli = cli_main(["validate", "--data.init_args.data_dir", str(fmnist), "--trainer.limit_val_batches", "1",
                    "--ckpt_path", "last", *QUIET])  # the recipe says test_resnet
    assert cli.model.model_name == "resnet10t" and "val/acc1" in cli.trainer.callback_metrics
    assert _resolved_last(capsys) == Path("runs/default/version_0/checkpoints/last.ckpt").resolve()


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", r"--ckpt_path '.*nothing\.ckpt': no such file"),
        ("random", r"--ckpt_path '.*random\.ckpt' is not a PyTorch checkpoint, or is truncated \(torch.load: "),
        ("truncated", r"--ckpt_path '.*truncated\.ckpt' is not a PyTorch checkpoint, or is truncated"),
        ("foreign", r"--ckpt_path '.*foreign\.ckpt' is not a Lightning checkpoint: expected a dict with a 'state_dict'"),
    ],
)
@pytest.mark.parametrize("weights_only", [None, "false"])
def test_bad_checkpoints_get_one_line_naming_the_file(kind, match, weights_only, fmnist: Path, tmp_path: Path,
                                                      capsys, monkeypatch) -> None:
    path = tmp_path / f"{'nothing' if kind == 'missing' else kind}.ckpt"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
        path.write_bytes(path.read_bytes()[:1500])
    elif kind == "foreign":
        torch.save({"w": torch.zeros(2)}, path)
    extra = [] if weights_only is None else ["--weights_only", weights_only]
    err = _error_line(["validate", "--data.init_args.data_dir", str(fmnist), "--ckpt_path", str(path), *extra, *QUIET],
                      capsys, monkeypatch)
    assert re.search("lightning-brn: error: [A-Za-z]+: " + match, err), err
    assert "weights_only" not in err.lower() or kind != "random"  # not torch's weights-only advice for random bytes


def test_a_checkpoint_holding_a_schedule_loads_weights_only(fmnist: Path) -> None:
    from lightning_brn.cli import load_checkpoint

    _train(fmnist, "--model.renorm_schedule", '{"class_path": "lightning_brn.RenormSchedule", "init_args": {"warmup_steps": 1, "rmax_steps": 2, "dmax_steps": 2}}')
    last = Path("runs/default/version_0/checkpoints/last.ckpt")
    assert load_checkpoint(last)["hyper_parameters"]["renorm_schedule"]  # (LightningCLI saves it in its config form)
    from lightning_brn import RenormSchedule

    holding = Path("holding.ckpt")  # a checkpoint saved from Python holds the object itself
    torch.save({"state_dict": {}, "hyper_parameters": {"renorm_schedule": RenormSchedule.for_run(100)}}, holding)
    assert load_checkpoint(holding)["hyper_parameters"]["renorm_schedule"] == RenormSchedule.for_run(100)
    cli = cli_main(["validate", "--data.init_args.data_dir", str(fmnist), "--trainer.limit_val_batches", "1",
                    "--ckpt_path", str(last), *QUIET])
    assert cli.model.renorm_schedule.warmup_steps == 1


def test_progress_bar_flag_and_epoch_based_runs(fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    """The usual Trainer flags work with the recipes: no bar, and a run that max_epochs ends (the schedule is fitted
    to its length); max_steps 0 trains nothing, without an error."""
    base = ["--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "16", "--trainer.limit_val_batches", "1", *QUIET]
    cli = cli_main(["fit", *base, "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "-1",
                    "--trainer.max_epochs", "2"])
    assert cli.trainer.progress_bar_callback is None
    assert cli.trainer.global_step == 8  # 64 images / 16 a batch, 2 epochs
    (scheduler,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "BatchRenormScheduler"]
    from lightning_brn import RenormSchedule

    assert scheduler.schedule == RenormSchedule.for_run(8)
    cli = cli_main(["fit", *base, "--trainer.max_steps", "0"])
    assert cli.trainer.global_step == 0


def test_progress_bar_reads_epoch_n_in_a_run_that_max_steps_ends(fmnist: Path) -> None:
    from lightning_brn.cli import RunProgressBar

    cli = cli_main(["fit", "--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "16",
                    "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", *QUIET])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, RunProgressBar) and cli.trainer.max_epochs == -1
    assert bar._get_train_description(0).strip() == "Epoch 0"


def test_summary_names_no_checkpoint_folder_that_was_never_written(fmnist: Path, capsys: pytest.CaptureFixture) -> None:
    _train(fmnist, steps=3)
    last = Path("runs/default/version_0/checkpoints/last.ckpt")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli_main(["fit", "--data.init_args.data_dir", str(fmnist), "--data.init_args.batch_size", "8",
                  "--trainer.max_steps", "2", "--ckpt_path", str(last), *QUIET])  # already past max_steps
    out = " ".join(capsys.readouterr().out.split())
    assert "version_1/checkpoints" not in out and "no checkpoint written" in out
