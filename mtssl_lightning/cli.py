"""``mtssl``: the LightningCLI (``mtssl fit|validate|test|predict --config …``).

Pretraining configs give ``model:``/``data:`` as :class:`MultiTaskSSL` /
:class:`MultiTaskDataModule` arguments directly (those are the defaults); evaluation configs
(``configs/eval/``) name another LightningModule and DataModule with ``class_path``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mtssl_lightning.callbacks import PreemptionCheckpoint
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


class MTSSLCLI(LightningCLI):
    """LightningCLI over any LightningModule/DataModule, defaulting to :class:`MultiTaskSSL` +
    :class:`MultiTaskDataModule` (so pretraining configs need no ``class_path``); prints where
    outputs went."""

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
    """Entry point of the ``mtssl`` console script (``args`` replaces ``sys.argv[1:]``)."""
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
        save_config_kwargs={"overwrite": True},
        # on every run: pre-emption (SIGTERM) saves a checkpoint that `--ckpt_path last` resumes
        trainer_defaults={"callbacks": [PreemptionCheckpoint()]},
        args=args,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
