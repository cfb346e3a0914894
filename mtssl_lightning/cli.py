"""``mtssl``: the LightningCLI (``mtssl fit|validate|test|predict --config …``).

Pretraining configs give ``model:``/``data:`` as :class:`MultiTaskSSL` /
:class:`MultiTaskDataModule` arguments directly (those are the defaults); evaluation configs
(``configs/eval/``) name another LightningModule and DataModule with ``class_path``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from mtssl_lightning.callbacks import PreemptionCheckpoint, TrainingDashboard, ValidateBeforeTraining
from mtssl_lightning.config_bases import PARSER_MODE
from mtssl_lightning.data.datamodule import MultiTaskDataModule
from mtssl_lightning.pretrain import MultiTaskSSL


def wandb_configured() -> bool:
    """Whether the user set W&B up (mode, API key or a login); if not, we run it offline."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


#: ``ckpt_path`` values Lightning resolves itself (not file paths)
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def check_ckpt_path(ckpt_path: str | None) -> None:
    """Fail early, with the fix, when ``--ckpt_path`` names no file or a file that is no checkpoint.

    Lightning would otherwise find out after building the model and data (or, for a file that
    is not a checkpoint, with an unpickling traceback). Remote URLs are left to Lightning.
    """
    if ckpt_path is None or ckpt_path in SPECIAL_CKPT_PATHS or "://" in str(ckpt_path):
        return
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"--ckpt_path {str(ckpt_path)!r} does not exist; give a .ckpt written by `mtssl fit` "
            "(e.g. runs/<name>/checkpoints/last.ckpt) or `--ckpt_path last` to resume from the newest one"
        )
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not a checkpoint
        raise ValueError(
            f"--ckpt_path {str(ckpt_path)!r} is not a PyTorch checkpoint (not a torch.save archive); "
            "was the file truncated or is it another kind of file? Give a .ckpt written by `mtssl fit`."
        )


def git_revision() -> str:
    """The commit of this package's source tree (``+dirty`` with uncommitted changes), or why there is none."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return rev + ("+dirty" if dirty else "")


#: key under which a checkpoint records the W&B run it was logged to
WANDB_RUN_KEY = "mtssl_wandb_run_id"


def _class_of(config: Any) -> type | None:
    """The class a ``{class_path, init_args}`` config node names, or ``None``."""
    class_path = getattr(config, "class_path", None)
    if not isinstance(class_path, str):
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _as_list(node: Any) -> list[Any]:
    return [] if node is None or isinstance(node, bool) else list(node) if isinstance(node, list) else [node]


def resume_checkpoint(ckpt_path: str | None, callbacks: Any) -> Path | None:
    """The file ``--ckpt_path`` means, from the *config* (before anything is built): ``last`` is the
    newest ``last*.ckpt`` in the folders of the configured ``ModelCheckpoint`` callbacks."""
    if ckpt_path is None or "://" in str(ckpt_path):
        return None
    if ckpt_path == "last":
        folders = [
            Path(node.init_args.dirpath)
            for node in _as_list(callbacks)
            if (cls := _class_of(node)) is not None and issubclass(cls, ModelCheckpoint) and getattr(node.init_args, "dirpath", None)
        ]
        pattern = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}*{ModelCheckpoint.FILE_EXTENSION}"
        found = [path for folder in folders for path in folder.glob(pattern)]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    path = Path(ckpt_path)
    return path if path.is_file() else None


def continue_wandb_run(config: Any) -> None:
    """Point the configured W&B loggers at the run recorded in the checkpoint being resumed.

    Sets ``id`` in the ``WandbLogger``'s init args of the fit config (Lightning's ``WandbLogger``
    resumes a given id: it passes ``resume="allow"``); a logger given an ``id`` or ``version``
    keeps it. Called before the logger is built.
    """
    path = resume_checkpoint(config.get("ckpt_path"), config.trainer.get("callbacks"))
    if path is None:
        return
    # mmap: read one key of a possibly multi-GB checkpoint without loading its tensors
    run_id = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(WANDB_RUN_KEY)
    if not run_id:
        return
    for node in _as_list(config.trainer.get("logger")):
        cls = _class_of(node)
        if cls is not None and issubclass(cls, WandbLogger) and not node.init_args.get("id") and not node.init_args.get("version"):
            node.init_args.id = run_id


def quiet_unset_wandb_anonymous(logger: WandbLogger) -> None:
    """Stop ``logger`` from passing ``anonymous=None`` to ``wandb.init``, which makes W&B 0.23+ warn on
    every run that the (removed) setting has no effect.

    Lightning 2.6's ``WandbLogger`` always puts ``anonymous`` into its private ``_wandb_init`` and
    has no public way to leave it out; this is the one place that touches it (a test fails when
    Lightning changes that, so that this can go).
    """
    if logger._wandb_init.get("anonymous", "set") is None:
        del logger._wandb_init["anonymous"]


def keep_spawned_files_in_the_run_folder(logger: WandbLogger, trainer: pl.Trainer) -> None:
    """Make the processes a spawn launcher starts write their W&B files (logged pictures) into
    ``logger``'s run folder, by setting ``WANDB_DIR`` to its ``save_dir`` for them to inherit.

    Lightning's spawn launchers pickle the logger, and each process attaches to the run that the
    main process created (``wandb._attach``). W&B 0.31 rebuilds the attached run's settings from
    the attaching process's defaults, so its root folder is that process's ``WANDB_DIR`` or
    working directory, not ``save_dir``: a spawned rank's pictures landed in
    ``./wandb/offline-run-…/files`` while the run file and its history were in
    ``<save_dir>/wandb/offline-run-…``, and ``wandb sync`` of the run folder lost them.
    Runs not launched by spawning are left alone (their processes create or own the run).
    """
    save_dir = logger._wandb_init.get("dir")
    if save_dir and isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        os.environ["WANDB_DIR"] = str(Path(save_dir).resolve())


class RunRecord(SaveConfigCallback):
    """Saves the resolved config (``config.yaml`` in the log folder, as LightningCLI does) and
    ties the run to W&B: the config and the git revision go into the W&B run's config, the
    run's id goes into every checkpoint (so that :func:`continue_wandb_run` can continue that
    W&B run when the checkpoint is resumed)."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in loggers:
            logger.experiment.config.update({"mtssl_config": config, "git_revision": git_revision()}, allow_val_change=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint[WANDB_RUN_KEY] = str(logger.version)
                break


class MTSSLCLI(LightningCLI):
    """LightningCLI over any LightningModule/DataModule, defaulting to :class:`MultiTaskSSL` +
    :class:`MultiTaskDataModule` (so pretraining configs need no ``class_path``); prints where
    outputs went."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Every parser (main and subcommands) reads config files with ``_base_:`` (:mod:`mtssl_lightning.config_bases`)."""
        kwargs.setdefault("parser_mode", PARSER_MODE)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": f"{MultiTaskSSL.__module__}.{MultiTaskSSL.__qualname__}"},
                "data": {"class_path": f"{MultiTaskDataModule.__module__}.{MultiTaskDataModule.__qualname__}"},
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # before LightningCLI reads the checkpoint's hyperparameters (and before any model is built)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))

    def before_instantiate_classes(self) -> None:
        """When resuming a fit, continue the W&B run recorded in the checkpoint (see :func:`continue_wandb_run`)."""
        if self.subcommand == "fit":
            continue_wandb_run(self.config["fit"])

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The configured Trainer plus, unless the config already has them, the callbacks every
        run gets: :class:`PreemptionCheckpoint` (SIGTERM saves a checkpoint that ``--ckpt_path
        last`` resumes), :class:`TrainingDashboard` (learning rates, throughput, data-wait
        share, task pictures, lasso heatmap) and :class:`ValidateBeforeTraining` (a logged
        validation at step 0, so every validation curve starts at the untrained model)."""
        trainer = super().instantiate_trainer(**kwargs)
        for default in (PreemptionCheckpoint, TrainingDashboard, ValidateBeforeTraining):
            if not any(isinstance(callback, default) for callback in trainer.callbacks):
                trainer.callbacks.append(default())
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                quiet_unset_wandb_anonymous(logger)
                keep_spawned_files_in_the_run_folder(logger, trainer)
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = ["", "mtssl: training finished."]
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            lines.append(f"  checkpoints: {ckpt.dirpath}")
            if ckpt.last_model_path or ckpt.best_model_path:
                lines.append(f"  last/best:   {ckpt.last_model_path or ckpt.best_model_path}")
        for logger in trainer.loggers:
            run = getattr(logger, "experiment", None)
            run_dir = getattr(run, "dir", None)
            if run_dir:
                lines.append(f"  W&B run:     {Path(run_dir).parent}  (sync with `wandb sync <that folder>`)")
        print("\n".join(lines))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``mtssl`` console script (``args`` replaces ``sys.argv[1:]``).

    ``mtssl convert-slim …`` and ``mtssl optimize-data SRC DST`` are plain commands, not
    LightningCLI subcommands (no trainer).
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["convert-slim"]:
        from mtssl_lightning.slim.command import main as convert_slim_main

        raise SystemExit(convert_slim_main(argv[1:]))
    if argv[:1] == ["optimize-data"]:
        from mtssl_lightning.data.optimize import main as optimize_data_main

        raise SystemExit(optimize_data_main(argv[1:]))
    run(args)


def run(args: list[str] | None = None) -> MTSSLCLI:
    """Run the CLI and return it (tests and notebooks use ``cli.trainer``, ``cli.model``)."""
    if not wandb_configured():
        os.environ["WANDB_MODE"] = "offline"  # no account needed; a user's own setting wins
    return MTSSLCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the module owns its optimizer(s)
        save_config_callback=RunRecord,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
