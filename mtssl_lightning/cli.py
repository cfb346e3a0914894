"""``mtssl``: the LightningCLI (``mtssl fit|validate|test|predict --config …``)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

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


class MTSSLCLI(LightningCLI):
    """LightningCLI for :class:`MultiTaskSSL` + :class:`MultiTaskDataModule`; prints where outputs went."""

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
        MultiTaskSSL,
        MultiTaskDataModule,
        auto_configure_optimizers=False,  # the module owns its optimizer(s)
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
