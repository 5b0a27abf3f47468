"""Every shipped recipe parses and runs a ``fast_dev_run`` on tiny generated data.

Only the data path, the input/batch size and (for the ImageNet recipes, written for GPUs with DDP)
the device are overridden.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_brn import is_batch_renorm
from lightning_brn.cli import available_recipes, cli_main, expand_recipe_args, load_recipe, recipe_chain, recipe_path

RECIPES = sorted(available_recipes())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, make_fmnist, make_image_folder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "fmnist": make_fmnist(root / "fmnist", n_train=40, n_test=40),
        "imagenet": make_image_folder(root / "imagenet", size=40),
    }


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_header_and_settings(name: str) -> None:
    text = Path(recipe_path(name)).read_text()
    assert text.startswith("# "), "each recipe starts with a header comment"
    cfg = load_recipe(name)  # with the recipe it extends, if any
    model, trainer = cfg["model"], cfg["trainer"]
    assert trainer["use_distributed_sampler"] is False
    assert trainer["gradient_clip_val"] == 2.0 and model["label_smoothing"] == 0.1
    assert model["optimizer"]["class_path"] == "timm.optim.RMSpropTF"
    opt = model["optimizer"]["init_args"]
    assert (opt["lr"], opt["alpha"], opt["eps"]) == (0.045, 0.9, 1.0)
    ema = [c for c in trainer["callbacks"] if c["class_path"].endswith("EMAWeightAveraging")]
    assert ema and ema[0]["class_path"] == "lightning_brn.callbacks.ResumableEMAWeightAveraging"
    assert ema[0]["init_args"]["use_buffers"] is True and ema[0]["init_args"]["warmup"] is True  # (TF)
    if name.startswith("imagenet"):
        assert "targets" in text.splitlines()[0]
        assert model["model_name"] == "inception_v3"
        # every GPU of the node with DDP where there are GPUs, one process on a CPU-only machine
        assert (trainer["accelerator"], trainer["devices"], trainer["strategy"]) == ("auto", "auto", "auto")
        assert cfg["data"]["init_args"]["batch_size"] == 32
        assert model["lr_scheduler"]["init_args"] == {"step_size": 2, "gamma": 0.94}
        assert model["lr_scheduler_interval"] == "epoch"
        if model["normalization"] == "brn":
            assert model["renorm_schedule"]["init_args"] == {
                "warmup_steps": 5000, "rmax": 3.0, "rmax_steps": 40000, "dmax": 5.0, "dmax_steps": 25000, "momentum": 0.01
            }
        expected_steps = {"imagenet_microbatch_bn": 210_000, "imagenet_noniid_brn": 120_000}.get(name, 130_000)
        assert trainer["max_steps"] == expected_steps
    if "microbatch" in name:
        assert model["microbatch_size"] == 4
    if "noniid" in name:
        assert cfg["data"]["init_args"]["sampling"] == "non_iid"
        # the paper's 16 labels x 2 of 1,000 classes; Fashion-MNIST's 10 classes need 2 x 16 for the same regime
        assert cfg["data"]["init_args"]["examples_per_label"] == (16 if name.startswith("fmnist") else 2)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_fast_dev_run(name: str, tiny_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--recipe", name, "--trainer.fast_dev_run", "true", "--trainer.enable_model_summary", "false"]
    if name.startswith("imagenet"):
        batch = "4" if "microbatch" in name else "2"
        args += [
            "--data.init_args.data_dir", str(tiny_data["imagenet"]),
            "--data.init_args.img_size", "75",  # inception_v3's smallest valid input
            "--data.init_args.batch_size", batch,
        ]  # only data-path and size overrides: the recipe's own devices and data workers
        if torch.cuda.device_count() > 1:  # (DDP would start one copy of this pytest process per GPU)
            args += ["--trainer.devices", "1"]
    else:
        args += ["--data.init_args.data_dir", str(tiny_data["fmnist"]), "--data.init_args.batch_size", "8"]
        if "noniid" in name:  # (4 images per class here: too few for the recipe's 16 per label)
            args += ["--data.init_args.examples_per_label", "2"]
    torch.manual_seed(0)
    cli = cli_main(args)
    assert cli.trainer.global_step == 1
    has_renorm = any(is_batch_renorm(m) for m in cli.model.modules())
    assert has_renorm == (name.endswith("brn") or "microbatch" in name or name == "default")
    assert "val/acc1" in cli.trainer.callback_metrics
    assert cli.trainer.world_size == 1 and not torch.distributed.is_initialized()  # one process, no process group


FAMILY_BASES = {"imagenet": "imagenet_iid_brn", "fmnist": "fmnist_iid_brn", "default": "fmnist_iid_brn"}


@pytest.mark.parametrize("name", RECIPES)
def test_a_family_is_one_full_recipe_plus_small_deltas(name: str, tmp_path: Path) -> None:
    family = name.split("_")[0]
    base = FAMILY_BASES.get(family)
    chain = [Path(p).stem for p in recipe_chain(recipe_path(name))]
    if base is None:
        return
    assert chain == ([base] if name == base else [base, name])
    if name != base:
        body = [ln for ln in Path(recipe_path(name)).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(body) <= 12, f"{name}: a delta of {len(body)} lines"
        # --recipe and --config of the file itself load the base first, then the delta
        for flag, value in (("--recipe", name), ("--config", recipe_path(name))):
            args, run = expand_recipe_args(["fit", flag, value])
            assert args == ["fit", "--config", recipe_path(base), "--config", recipe_path(name)] and run == name
        # a copy elsewhere extends the shipped base by name
        copy = tmp_path / "mine.yaml"
        copy.write_text(Path(recipe_path(name)).read_text())
        assert recipe_chain(copy) == [recipe_path(base), str(copy)]


def test_a_recipe_that_extends_itself_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("# a\n# extends: b.yaml\nseed_everything: 1\n")
    b.write_text("# b\n# extends: a.yaml\nseed_everything: 2\n")
    with pytest.raises(ValueError, match="extends itself"):
        recipe_chain(a)
