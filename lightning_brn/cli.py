"""``lightning-brn``: train timm models with batchnorm or Batch Renorm from YAML recipes.

A thin :class:`lightning.pytorch.cli.LightningCLI` (``fit / validate / test / predict``,
``--config``, ``--print_config``, dotted overrides) with three additions:

* recipes by name: ``--recipe NAME`` (or ``--config NAME`` when no such file exists) loads
  ``NAME.yaml`` shipped inside the package (:mod:`lightning_brn.recipes`), so recipes work
  from a wheel as well as from a checkout;
* a bare ``lightning-brn fit`` (no ``--config`` / ``--recipe``) runs the embedded default
  recipe ``default``: Batch Renorm on Fashion-MNIST, a few minutes on a laptop CPU;
* logging to a CSV logger (plus TensorBoard when it is installed) under ``runs/<recipe>/`` (under
  ``<default_root_dir>/<recipe>/`` with ``--trainer.default_root_dir``),
  and a short summary at the end of ``fit``.

Examples::

    $ lightning-brn fit                                    # the embedded default
    $ lightning-brn fit --recipe fmnist_noniid_brn --trainer.max_steps 500
    $ lightning-brn fit --config recipes/imagenet_iid_brn.yaml --data.init_args.data_dir /data/imagenet
    $ lightning-brn fit --recipe default --print_config > my_recipe.yaml
    $ lightning-brn validate --recipe default --ckpt_path runs/default/version_0/checkpoints/last.ckpt

    >>> from lightning_brn.cli import available_recipes
    >>> "default" in available_recipes()
    True
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import torch
from typing_extensions import override
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_brn.data import ClassificationDataModule
from lightning_brn.module import TimmClassifier, check_batch_config

__all__ = [
    "BatchRenormCLI", "RunProgressBar", "available_recipes", "recipe_path", "recipe_chain", "load_recipe",
    "expand_recipe_args", "find_last_checkpoint", "load_checkpoint", "cli_main", "main",
]

#: The recipe a bare ``lightning-brn fit`` runs.
DEFAULT_RECIPE = "default"
#: Root folder of the default loggers.
DEFAULT_LOG_DIR = "runs"
#: A run this long on the CPU because ``accelerator: auto`` found no GPU is warned about (the ImageNet recipes).
_LONG_RUN_STEPS = 20_000
_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_HELP_FLAGS = ("-h", "--help")


# --------------------------------------------------------------------------------------
# Recipes shipped as package data
# --------------------------------------------------------------------------------------
def _recipe_dir() -> Any:
    return resources.files("lightning_brn.recipes")


def available_recipes() -> dict[str, str]:
    """Shipped recipe names mapped to the first line of their header comment.

    Examples::

        >>> sorted(available_recipes())[:2]
        ['default', 'fmnist_iid_bn']
    """
    out: dict[str, str] = {}
    for entry in sorted(_recipe_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            summary = ""
            for line in entry.read_text(encoding="utf-8").splitlines():
                if line.startswith("#"):
                    summary = line.lstrip("#").strip()
                    if summary:
                        break
            out[entry.name[: -len(".yaml")]] = summary
    return out


def recipe_path(name: str) -> str:
    """The file of the shipped recipe ``name`` (with or without ``.yaml``).

    Raises:
        ValueError: ``name`` is not a shipped recipe (the message lists them).

    Examples::

        >>> recipe_path("default").endswith("default.yaml")
        True
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    entry = _recipe_dir() / f"{stem}.yaml"
    if not entry.is_file():
        import difflib

        names = list(available_recipes())
        close = difflib.get_close_matches(stem, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}.{hint} Shipped recipes: {', '.join(names)}")
    # Installed packages (wheel or editable) are plain folders, so the entry is a real file.
    return os.fspath(entry)


#: A recipe's header line naming the recipe it changes: ``# extends: NAME`` (a shipped recipe, or a file path
#: relative to the recipe's folder). ``--recipe`` / ``--config`` then load that one first, as LightningCLI's
#: several ``--config`` files: a recipe family is one full recipe plus small deltas.
_EXTENDS = "# extends:"


def recipe_chain(path: Union[str, os.PathLike]) -> list[str]:
    """The config files a recipe file stands for: the recipes it extends (``# extends: NAME`` in its header
    comment), base first, then the file itself.

    Examples::

        >>> [os.path.basename(p) for p in recipe_chain(recipe_path("imagenet_iid_bn"))]
        ['imagenet_iid_brn.yaml', 'imagenet_iid_bn.yaml']
    """
    chain: list[str] = []
    current: Optional[str] = os.fspath(path)
    while current is not None:
        if current in chain:
            raise ValueError(f"recipe {current!r} extends itself (through {', '.join(chain)})")
        chain.insert(0, current)
        current = _extended(current)
    return chain


def _extended(path: str) -> Optional[str]:
    """The file named by ``path``'s ``# extends:`` header line, or ``None``."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.startswith("#"):
                    break
                if line.startswith(_EXTENDS):
                    name = line[len(_EXTENDS):].strip()
                    nearby = os.path.join(os.path.dirname(path), name)
                    return nearby if os.path.isfile(nearby) else recipe_path(name)
    except (OSError, UnicodeDecodeError):  # not a readable file (an inline JSON config, ...): nothing to extend
        return None
    return None


def load_recipe(name: str) -> dict[str, Any]:
    """A shipped recipe as one plain dict: the files of its chain (:func:`recipe_chain`) merged as LightningCLI
    merges several ``--config`` files (mappings key by key, anything else replaced).

    Examples::

        >>> load_recipe("imagenet_iid_bn")["model"]["normalization"]
        'bn'
    """
    import yaml

    def merge(base: Any, delta: Any) -> Any:
        if isinstance(base, dict) and isinstance(delta, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in delta.items()}}
        return delta

    merged: dict[str, Any] = {}
    for path in recipe_chain(recipe_path(name)):
        with open(path, encoding="utf-8") as f:
            merged = merge(merged, yaml.safe_load(f) or {})
    return merged


def expand_recipe_args(argv: Sequence[str]) -> tuple[list[str], str]:
    """Rewrite ``--recipe NAME`` / ``--config NAME`` into ``--config <file>``; add the default recipe.

    Returns the new argument list and the run name (the last recipe or config file's stem),
    used for the log folder. A subcommand without any ``--config``/``--recipe`` gets
    ``--config <default recipe>`` inserted right after it, so dotted overrides still apply.

    Examples::

        >>> args, name = expand_recipe_args(["fit", "--trainer.max_steps", "5"])
        >>> [os.path.basename(a) for a in args[1:5]], args[5:], name  # the default recipe extends fmnist_iid_brn
        (['--config', 'fmnist_iid_brn.yaml', '--config', 'default.yaml'], ['--trainer.max_steps', '5'], 'default')
    """
    argv = list(argv)
    out: list[str] = []
    name: Optional[str] = None
    has_config = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in ("--recipe", "--config", "-c"):
            if eq:
                i += 1
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 2
            else:
                raise SystemExit(f"lightning-brn: {key} needs a value (recipes: {', '.join(available_recipes())})")
            if key == "--recipe" or (not Path(value).exists() and not value.lstrip().startswith("{")):
                try:
                    value = recipe_path(value)
                except ValueError as err:
                    if key == "--recipe" or not Path(value).suffix or Path(value).name == value:
                        raise SystemExit(f"lightning-brn: {err}") from None
                    # a path that does not exist: let jsonargparse report it
            for file in recipe_chain(value) if not value.lstrip().startswith("{") else [value]:
                out += ["--config", file]
            has_config = True
            if not value.lstrip().startswith("{"):
                name = Path(value).stem
            continue
        out.append(arg)
        i += 1
    if out and out[0] in _SUBCOMMANDS and not has_config:
        out[1:1] = [arg for file in recipe_chain(recipe_path(DEFAULT_RECIPE)) for arg in ("--config", file)]
        name = DEFAULT_RECIPE
    return out, name or "lightning_brn"


def _recipes_help() -> str:
    lines = ["Recipes (run one with --recipe NAME, or --config NAME / --config FILE.yaml):"]
    recipes = available_recipes()
    width = max((len(n) for n in recipes), default=0)
    for n, summary in recipes.items():
        lines.append(f"  {n.ljust(width)}  {summary}")
    lines.append(f"A subcommand without --config/--recipe runs the '{DEFAULT_RECIPE}' recipe.")
    lines.append("Show or copy a recipe: lightning-brn fit --recipe NAME --print_config")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------
def _raw_formatter() -> type:
    from jsonargparse import DefaultHelpFormatter

    class _Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:  # keep the recipe table's lines
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return _Formatter


def _launched_processes() -> int:
    """How many processes a cluster launcher started for this job (torchrun, SLURM's srun), else 1."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return int(os.environ.get("WORLD_SIZE", "1"))
    if SLURMEnvironment.detect():
        # tasks that srun started for this job step (a batch script's own process has no step count: not counted)
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    return 1


def _check_launch(trainer: Trainer) -> None:
    """A launcher's N processes each running a one-process Trainer would be N independent runs writing one log
    folder (``devices: auto`` on a node where each task sees one GPU): refused, with what to set."""
    launched = _launched_processes()
    if launched > 1 and trainer.world_size == 1:
        raise MisconfigurationException(
            f"this process is one of {launched} started by a cluster launcher (torchrun WORLD_SIZE / SLURM_NTASKS), "
            f"but the Trainer runs a single process ({type(trainer.strategy).__name__}, {trainer.num_devices} "
            "device(s)), so each would train on its own: set --trainer.devices to the GPUs per node and "
            "--trainer.num_nodes to the nodes of the launch, and let every process of a node see all of its GPUs "
            "(no per-task GPU binding such as srun --gpus-per-task) (docs/recipes.md, 'One GPU, 8 GPUs, several "
            "nodes')"
        )


class RunProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar``, whose training description reads ``Epoch N`` rather than ``Epoch N/-2`` in a
    run that ``max_steps`` ends (``max_epochs=-1``). The CLI adds it unless ``--trainer.enable_progress_bar false``
    or the configuration lists a progress bar of its own."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        # (Lightning's own method, which appends "/{max_epochs - 1}" whenever max_epochs is not None)
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"/{max_epochs - 1}", "", 1)
        return description


def _default_loggers(run_name: str, save_dir: str = DEFAULT_LOG_DIR) -> list[Logger]:
    """A CSV logger, plus TensorBoard when installed, sharing ``<save_dir>/<run_name>/version_N``."""
    csv = CSVLogger(save_dir=save_dir, name=run_name)
    loggers: list[Logger] = [csv]
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=save_dir, name=run_name, version=csv.version, default_hp_metric=False))
    return loggers


class BatchRenormCLI(LightningCLI):
    """LightningCLI for :class:`~lightning_brn.module.TimmClassifier` and the recipe data modules.

    Adds default loggers (CSV, plus TensorBoard when installed) when the config gives none,
    checks the batch configuration before any training, and prints a summary after ``fit``.
    """

    def __init__(self, *args: Any, run_name: str = "lightning_brn", **kwargs: Any) -> None:
        self.run_name = run_name
        self._start_time = time.perf_counter()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # ``main`` always passes the (recipe-expanded) command line as ``args``; hide ``sys.argv`` meanwhile so
        # that LightningCLI does not warn about getting both.
        argv = sys.argv
        sys.argv = argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's step that reloads the model settings a checkpoint saved, taken over so that ``--ckpt_path``
        is checked before anything is built: ``last`` resolved first (so that it behaves as the path it resolves
        to), the file loaded with ``--weights_only`` as given, and a missing, truncated or foreign file reported in
        one line naming it. The settings are merged as LightningCLI merges them."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        try:
            self._reload_checkpoint_settings(subcommand)
        except Exception as err:
            _mark_config_error(err)
            raise

    def _reload_checkpoint_settings(self, subcommand: str) -> None:
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None and subcommand != "fit" and not _loads_pretrained_weights(config):
            raise ValueError(
                f"lightning-brn {subcommand} needs --ckpt_path PATH (or --ckpt_path last, the newest last checkpoint "
                f"of this recipe's runs): without one it would {'score' if subcommand != 'predict' else 'run'} the "
                "untrained model"
            )
        if ckpt_path == "last":
            found = self._last_checkpoint_from_config(subcommand)
            if found is None:
                return  # not known before the Trainer exists (a logger of the config's own): resolved then
            if not found:
                if subcommand == "fit":  # Lightning warns and starts from scratch
                    return
                raise FileNotFoundError(
                    f"{subcommand} --ckpt_path last: no run of {self.run_name!r} has written a last checkpoint (looked "
                    "as lightning_brn.cli.find_last_checkpoint does, in the run's version_*/checkpoints folders); pass "
                    "--ckpt_path PATH"
                )
            print(f"lightning-brn: --ckpt_path last -> {found}", file=sys.stderr)
            config["ckpt_path"] = ckpt_path = found
        if not ckpt_path or ckpt_path in ("best", "last", "hpc", "registry") or "://" in str(ckpt_path):
            return  # Lightning's own names, and remote files, are Lightning's to resolve and read
        checkpoint = load_checkpoint(ckpt_path, weights_only=config.get("weights_only"))
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        for key, value in list(hparams.items()):
            if hasattr(value, "to_dict") and hasattr(value, "values"):  # a RenormSchedule: as its YAML form
                hparams[key] = {"class_path": f"{type(value).__module__}.{type(value).__qualname__}",
                                "init_args": value.to_dict()}
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _last_checkpoint_from_config(self, subcommand: str) -> Optional[str]:
        """``--ckpt_path last`` resolved from the configuration, before anything is built: the newest last checkpoint
        in the folders ``find_last_checkpoint`` would search (``""`` when there is none), or ``None`` when the
        configuration names a logger of its own, whose folders only the built Trainer knows."""
        trainer_cfg = self.config[subcommand].get("trainer") or {}
        logger = trainer_cfg.get("logger")
        root = str(trainer_cfg.get("default_root_dir") or "")
        folders: list[str] = []
        default_folder: Optional[str]
        if logger in (None, True):  # the CLI's default loggers: runs/<recipe>/version_N, a new N every run
            default_folder = os.path.join(root or DEFAULT_LOG_DIR, self.run_name, "version_*", "checkpoints")
        elif logger is False:
            default_folder = os.path.join(root or os.getcwd(), "checkpoints")
        else:
            return None
        checkpointing = trainer_cfg.get("enable_checkpointing") is not False
        for callback in trainer_cfg.get("callbacks") or []:
            class_path = str(callback.get("class_path", "")) if hasattr(callback, "get") else ""
            if class_path.rsplit(".", 1)[-1] in ("ModelCheckpoint", "OnExceptionCheckpoint"):
                init_args = callback.get("init_args") or {}
                where = init_args.get("dirpath")
                if class_path.endswith("OnExceptionCheckpoint"):
                    folders.append(os.path.join(str(where), f"{init_args.get('filename') or 'on_exception'}.ckpt"))
                else:
                    folders.append(str(where) if where is not None else default_folder)
        if not folders and checkpointing:
            folders.append(default_folder)  # Lightning's default ModelCheckpoint
        return _newest_last_checkpoint(folders) or ""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            _mark_config_error(err)
            raise

    def after_instantiate_classes(self) -> None:
        if self.datamodule is not None and isinstance(self.model, TimmClassifier):
            try:
                check_batch_config(self.model, self.datamodule)
                if isinstance(self.datamodule, ClassificationDataModule):
                    self.datamodule.check_data("fit" if self.subcommand in (None, "fit") else self.subcommand)
            except Exception as err:
                _mark_config_error(err)
                raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True) and "logger" not in kwargs:
            # under --trainer.default_root_dir when given (as Lightning's own default logger), else ./runs
            root = trainer_cfg.get("default_root_dir") or DEFAULT_LOG_DIR
            kwargs["logger"] = _default_loggers(self.run_name, save_dir=str(root))
        callbacks = trainer_cfg.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer_cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            # the recipes' bar, added here rather than listed in them, so that --trainer.enable_progress_bar false works
            trainer_cfg["callbacks"] = [*callbacks, RunProgressBar()]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:
            accelerator = str(trainer_cfg.get("accelerator", "auto"))
            if accelerator not in ("gpu", "cuda") or torch.cuda.is_available():
                raise
            raise MisconfigurationException(
                f"{err} The configuration asks for trainer.accelerator={accelerator!r} (devices="
                f"{trainer_cfg.get('devices')!r}, strategy={trainer_cfg.get('strategy')!r}) and this machine has no "
                "CUDA GPU: to run it on the CPU, add --trainer.accelerator cpu --trainer.devices 1 "
                "--trainer.strategy auto (docs/recipes.md, 'One GPU, 8 GPUs, several nodes')"
            ) from None
        _check_launch(trainer)
        return trainer

    def before_fit(self) -> None:
        self._start_time = time.perf_counter()
        self._resolve_last_checkpoint("fit")
        trainer = self.trainer
        asked = str(self._get(self.config_init, "trainer", default={}).get("accelerator", "auto"))
        if asked == "auto" and isinstance(trainer.accelerator, CPUAccelerator) and not trainer.fast_dev_run:
            if trainer.max_steps >= _LONG_RUN_STEPS:
                rank_zero_warn(
                    f"lightning-brn: no GPU found, so this run of max_steps={trainer.max_steps} trains on the CPU "
                    "(the recipe's accelerator is 'auto'); pass --trainer.accelerator gpu to require a GPU"
                )

    def before_validate(self) -> None:
        self._resolve_last_checkpoint("validate")

    def before_test(self) -> None:
        self._resolve_last_checkpoint("test")

    def before_predict(self) -> None:
        self._resolve_last_checkpoint("predict")

    def _resolve_last_checkpoint(self, subcommand: str) -> None:
        """``--ckpt_path last``: the newest last checkpoint of this run name, in any of its version folders.

        Lightning looks for ``last`` only in this run's own checkpoint folder, and the default loggers give every
        run a new ``version_N`` folder, so it would find nothing there and start from scratch with a warning. When
        there is none: ``fit`` starts from scratch with Lightning's warning, the other subcommands are refused
        (they would evaluate the untrained model).
        """
        config = self.config_init.get(subcommand)
        if config is None or config.get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(self.trainer)
        if found is not None:
            config["ckpt_path"] = found
            if self.trainer.is_global_zero:
                print(f"lightning-brn: --ckpt_path last -> {found}", file=sys.stderr)
            saved = load_checkpoint(found, weights_only=config.get("weights_only")).get("hyper_parameters") or {}
            built = dict(self.model.hparams) if isinstance(self.model, TimmClassifier) else {}
            differ = sorted(k for k in built if k in saved and saved[k] != built[k])
            if differ:  # (with the CLI's own loggers, `last` is resolved before the model is built, from its settings)
                err = ValueError(
                    f"{subcommand} --ckpt_path last resolved to {found}, whose model settings differ from this "
                    f"configuration's ({', '.join(differ)}); pass --ckpt_path {found} to build the model from the "
                    "checkpoint's settings"
                )
                _mark_config_error(err)
                raise err
        elif subcommand != "fit":  # Lightning would warn and evaluate the untrained model
            err = FileNotFoundError(
                f"{subcommand} --ckpt_path last: no run of {self.run_name!r} has written a last checkpoint (looked as "
                "lightning_brn.cli.find_last_checkpoint does, in the run's version_*/checkpoints folders); pass "
                "--ckpt_path PATH"
            )
            _mark_config_error(err)
            raise err

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted or trainer.fast_dev_run:
            return
        # what BatchRenormScheduler logged last: a closing validate() starts with empty callback_metrics
        renorm = _metrics(trainer, "brn/")
        last_val = getattr(self.model, "_last_val_step", None)
        if last_val != trainer.global_step and trainer.limit_val_batches != 0:
            # on every rank: under DDP validation is collective (it syncs metrics and the log folder)
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if trainer.is_global_zero:
            print_summary(trainer, time.perf_counter() - self._start_time, renorm)


def find_last_checkpoint(trainer: Trainer) -> Optional[str]:
    """The newest last checkpoint (``last.ckpt``, ``last-v1.ckpt``, ...) of a run with this trainer's settings.

    Looks where Lightning itself looks for ``ckpt_path="last"``, with its file-name rule (a name that starts with
    ``last``): the folder of each ``ModelCheckpoint`` (its ``dirpath``, else the first logger's
    ``<save_dir>/<name>/<version>/checkpoints``) and the file of each ``OnExceptionCheckpoint``. When the first
    logger numbers its versions itself (``runs/<recipe>/version_N``: every run, a resumed one too, gets a new
    one), it also looks in the ``checkpoints`` folder of every ``version_*`` of that run; a version the user
    named (a string) is searched alone, as Lightning does. The newest file by modification time wins (ties: the
    larger path, so that every rank picks the same one). Remote folders (``s3://`` and the like) are searched
    through fsspec. ``None`` when there is none.

    Examples::

        >>> from lightning.pytorch import Trainer
        >>> find_last_checkpoint(Trainer(logger=False, enable_checkpointing=False)) is None
        True
    """
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    places: list[str] = [str(c.ckpt_path) for c in trainer.callbacks if isinstance(c, OnExceptionCheckpoint)]
    logger = trainer.loggers[0] if trainer.loggers else None
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is not None:
            places.append(str(callback.dirpath))
        elif logger is None:
            places.append(os.path.join(str(trainer.default_root_dir), "checkpoints"))
        else:
            save_dir = str(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir)
            run_dir = os.path.join(save_dir, str(logger.name))
            version = logger.version
            version_dir = version if isinstance(version, str) else "version_*"  # a user-named version alone
            places.append(run_dir.rstrip("/") + f"/{version_dir}/checkpoints")
    return _newest_last_checkpoint(places)


def _newest_last_checkpoint(folder_patterns: Sequence[str]) -> Optional[str]:
    """The newest ``last*.ckpt`` in folders given as paths or glob patterns (local or fsspec), or of files."""
    import re

    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.callbacks import ModelCheckpoint

    last = re.compile(rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-(\d+))?")
    ext = ModelCheckpoint.FILE_EXTENSION
    files: set[str] = set()
    for pattern in folder_patterns:
        fs = get_filesystem(pattern)
        if fs.isfile(pattern):
            files.add(pattern)
            continue
        globbed = any(c in pattern for c in "*?[")
        for folder in ([_with_protocol(pattern, str(f)) for f in fs.glob(pattern)] if globbed else [pattern]):
            if fs.isdir(folder):
                # fsspec drops a remote path's protocol in what it lists: re-join the names to the folder as given
                files.update(
                    folder.rstrip("/") + "/" + name
                    for name in (os.path.basename(str(p).rstrip("/")) for p in fs.ls(folder, detail=False))
                    if name.endswith(ext) and last.match(name[: -len(ext)])
                )
    return _newest(files)


def _with_protocol(pattern: str, path: str) -> str:
    """``path`` as fsspec's glob returned it for ``pattern``, with the protocol (``s3://``) it drops put back."""
    protocol, sep, _ = pattern.partition("://")
    return f"{protocol}://{path}" if sep and "://" not in path else path


def _newest(files: Any) -> Optional[str]:
    """The newest of ``files`` by modification time (ties: the larger path, the same on every rank), or ``None``."""
    from lightning.fabric.utilities.cloud_io import get_filesystem

    stamped: dict[str, float] = {}
    for path in files:
        fs = get_filesystem(path)
        try:
            if fs.isfile(path):  # (a dangling save_last="link" symlink is not)
                modified = fs.modified(path)
                stamped[path] = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
        except (OSError, NotImplementedError):  # a file gone meanwhile, a filesystem without modification times
            continue
    if not stamped:
        return None
    return max(stamped, key=lambda p: (stamped[p], p))


def load_checkpoint(path: Union[str, os.PathLike], weights_only: Optional[bool] = None) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU, with one error that names the file and what is wrong with it.

    ``weights_only`` as ``Trainer.fit(weights_only=...)`` takes it (``None``: torch's default, ``True``).

    Raises:
        FileNotFoundError: ``path`` does not exist or is a folder.
        ValueError: the file is truncated or not a PyTorch checkpoint, weights-only loading refused what it holds
            (the message says to pass ``--weights_only false`` for a file you trust), or it holds no ``state_dict``.

    Examples::

        >>> import os, tempfile
        >>> bad = os.path.join(tempfile.mkdtemp(), "bad.ckpt")
        >>> _ = open(bad, "wb").write(os.urandom(64))
        >>> load_checkpoint(bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --ckpt_path '...bad.ckpt' is not a PyTorch checkpoint, or is truncated (torch.load: ...)
    """
    where = f"--ckpt_path {os.fspath(path)!r}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: no such file")
    if os.path.isdir(path):
        raise FileNotFoundError(f"{where} is a folder; expected a checkpoint file (.ckpt)")
    wo = True if weights_only is None else bool(weights_only)
    try:
        try:  # memory-mapped: the tensors are not read, only the structure (the Trainer loads the file for real)
            checkpoint = torch.load(path, map_location="cpu", weights_only=wo, mmap=True)
        except Exception:  # noqa: BLE001 - not a zip checkpoint: a legacy file, or no checkpoint (the load says)
            checkpoint = torch.load(path, map_location="cpu", weights_only=wo)
    except Exception as err:  # noqa: BLE001 - whatever torch.load raises for a file it cannot read
        text = str(err).strip()
        if wo and "Unsupported global" in text:
            line = next(ln for ln in text.splitlines() if "Unsupported global" in ln).strip()
            raise ValueError(
                f"{where} holds objects that weights-only loading refuses ({line}); if you trust the file, pass "
                "--weights_only false"
            ) from None
        # the reason, without torch's weights-only advice around it
        reason = text.rsplit("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if text else ""
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
        raise ValueError(f"{where} is not a PyTorch checkpoint, or is truncated (torch.load: {reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{where} is not a Lightning checkpoint: expected a dict with a 'state_dict' (a file written by "
            f"Trainer.save_checkpoint or ModelCheckpoint), got {type(checkpoint).__name__}"
            + (f" with keys {sorted(checkpoint)[:5]}" if isinstance(checkpoint, dict) else "")
        )
    return checkpoint


def _loads_pretrained_weights(config: Any) -> bool:
    """Whether the configured model starts from pretrained timm weights (then evaluating it without a checkpoint
    is meaningful)."""
    model = config.get("model") if hasattr(config, "get") else None
    init_args = model.get("init_args", model) if hasattr(model, "get") else None
    kwargs = init_args.get("model_kwargs") if hasattr(init_args, "get") else None
    return bool(kwargs and hasattr(kwargs, "get") and kwargs.get("pretrained"))


def _metrics(trainer: Trainer, prefix: str) -> dict[str, float]:
    """The Trainer's ``callback_metrics`` whose names start with ``prefix``, as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


def print_summary(trainer: Trainer, seconds: float, renorm: Optional[Mapping[str, float]] = None) -> None:
    """Print validation accuracy, what Batch Renorm did, checkpoint and log locations of a finished ``fit``.

    ``renorm``: the ``brn/*`` metrics of the last step ``BatchRenormScheduler`` logged (default: those in
    ``trainer.callback_metrics``).
    """
    from rich.console import Console
    from rich.table import Table

    metrics = _metrics(trainer, "val/")
    table = Table(title="lightning-brn fit: done", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths wrap rather than lose their end
    table.add_row("steps", f"{trainer.global_step} optimizer steps, {trainer.current_epoch} epoch(s), {seconds:.0f} s")
    if "val/acc1" in metrics:
        acc = f"top-1 {100 * metrics['val/acc1']:.2f}%"
        if "val/acc5" in metrics:
            acc += f", top-5 {100 * metrics['val/acc5']:.2f}%"
        if "val/loss" in metrics:
            acc += f", loss {metrics['val/loss']:.4f}"
        table.add_row("validation", acc)
    brn = dict(renorm) if renorm is not None else _metrics(trainer, "brn/")
    if "brn/rmax" in brn:  # the last step BatchRenormScheduler logged
        text = f"rmax {brn['brn/rmax']:.3g}, dmax {brn['brn/dmax']:.3g}"
        if "brn/r_clipped_frac" in brn:
            r_pct, d_pct = 100 * brn["brn/r_clipped_frac"], 100 * brn["brn/d_clipped_frac"]
            text += f"; channels clipped: r {r_pct:.1f}%, d {d_pct:.1f}%"
        table.add_row("batch renorm", text + " (last logged step)")
    ckpt = trainer.checkpoint_callback
    if ckpt is not None:
        best = getattr(ckpt, "best_model_path", "") or ""
        last = getattr(ckpt, "last_model_path", "") or ""
        if best:
            table.add_row("best checkpoint", best)
        if last and last != best:
            table.add_row("last checkpoint", last)
        if not best and not last:
            dirpath = getattr(ckpt, "dirpath", None)
            written = bool(dirpath) and os.path.isdir(str(dirpath)) and any(os.scandir(str(dirpath)))
            # (a resumed run already past max_steps trains nothing and writes nothing)
            table.add_row("checkpoints", str(dirpath) if written else "no checkpoint written (no step was trained)")
    for logger in trainer.loggers:
        table.add_row(f"{type(logger).__name__} logs", str(logger.log_dir))
    Console().print(table)


def cli_main(args: Optional[Sequence[str]] = None, **kwargs: Any) -> BatchRenormCLI:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``) and return it (for tests and notebooks)."""
    argv, run_name = expand_recipe_args(sys.argv[1:] if args is None else args)
    help_text = _recipes_help()
    subcommand_kwargs = {
        sub: {"description": f"lightning-brn {sub}\n\n{help_text}", "formatter_class": _raw_formatter()}
        for sub in _SUBCOMMANDS
    }
    parser_kwargs: dict[str, Any] = {
        "prog": "lightning-brn",
        "description": "Train timm image classifiers with batchnorm or Batch Renorm (Ioffe 2017).\n\n" + help_text,
        "formatter_class": _raw_formatter(),
        **subcommand_kwargs,
    }
    parser_kwargs.update(kwargs.pop("parser_kwargs", {}))
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return BatchRenormCLI(
        TimmClassifier,
        ClassificationDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_kwargs=parser_kwargs,
        args=argv,
        run_name=run_name,
        **kwargs,
    )


_CONFIG_ERROR_ATTR = "_lightning_brn_config_error"
#: Set this environment variable to see the full traceback of a configuration error.
TRACEBACK_ENV = "LIGHTNING_BRN_TRACEBACK"


def _mark_config_error(err: BaseException) -> None:
    """Tag an exception raised while building the model, data and trainer (before any training)."""
    try:
        setattr(err, _CONFIG_ERROR_ATTR, True)
    except AttributeError:  # pragma: no cover - exceptions without a __dict__
        pass


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s cause/context chain (the one that says what is wrong)."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def main(args: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``lightning-brn`` console script and ``python -m lightning_brn``.

    A configuration that cannot work (unknown model, missing data folder, batch size not divisible by the
    microbatch size or by ``examples_per_label``, ...) stops before training with a one-line
    ``lightning-brn: error: ...`` and exit status 2 instead of a traceback (set ``LIGHTNING_BRN_TRACEBACK=1``
    to see it). :func:`cli_main` raises the exception itself.
    """
    try:
        cli_main(args)
    except Exception as err:
        if not getattr(err, _CONFIG_ERROR_ATTR, False) or os.environ.get(TRACEBACK_ENV):
            raise
        cause = _root_cause(err)
        print(f"lightning-brn: error: {type(cause).__name__}: {cause}", file=sys.stderr)
        print(f"(nothing was trained; set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
