"""Save a checkpoint when the job is pre-empted (SIGTERM), so that ``--ckpt_path last`` resumes it.

Lightning already turns SIGTERM into a clean stop: its signal handler sets
``trainer.received_sigterm`` and the training loop raises ``SIGTERMException`` at the end of the
current batch (on every rank, through a broadcast), so the state is consistent — the last step
has been applied in full. This callback adds the missing half: it writes the checkpoint then.

Where: the ``ModelCheckpoint`` callback's folder as ``last.ckpt`` (so ``mtssl fit … --ckpt_path
last`` picks it, being the newest "last" file there), else ``<default_root_dir>/preempted.ckpt``.
The write is Lightning's (atomic: a temporary file renamed into place), so an interrupted save
never destroys the previous checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """On SIGTERM during ``fit``: save a checkpoint of the last completed step, then let the run stop.

    (Not Lightning's ``OnExceptionCheckpoint``: it saves on every exception, also one raised in the
    middle of a step, needs its folder when it is built, and deletes its file at teardown — here
    the ``ModelCheckpoint``'s ``last.ckpt``, where ``--ckpt_path last`` looks.)

    Args:
        filename: file name used when the trainer has no ``ModelCheckpoint`` with a folder
            (saved in ``trainer.default_root_dir``).
    """

    def __init__(self, filename: str = "preempted.ckpt") -> None:
        self.filename = filename

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Where the pre-emption checkpoint goes (see the module docstring)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        return Path(trainer.default_root_dir) / self.filename

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a SIGTERM also reaches DataLoader workers, so the main process may first see their death
        # (a RuntimeError while fetching the next batch): the flag, not the exception type, decides
        if not (isinstance(exception, SIGTERMException) or trainer.received_sigterm):
            return
        if not trainer.training or trainer.global_step == 0:
            return  # nothing trained yet: nothing worth saving
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # collective under DDP: every rank gets here via the broadcast
        if trainer.is_global_zero:
            message = (
                f"mtssl: SIGTERM received; checkpoint of step {trainer.global_step} saved to {path}. "
                "Resume with the same command plus `--ckpt_path last` (or `--ckpt_path <that file>`)."
            )
            log.warning(message)
            print(message, flush=True)
