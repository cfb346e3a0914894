"""A logged validation pass before the first training step, so every curve starts at the untrained model.

Lightning validates during ``fit`` only after training steps; its sanity check runs before them
but logs nothing (and by default sees 2 batches). A dashboard whose validation curves start
after the first epoch cannot show how far the untrained trunk is from where the curve begins,
which is the first thing to check in self-supervised pretraining (did the task learn anything,
or is epoch 1 already where the run ends?). :class:`ValidateBeforeTraining` runs the fit's own
validation loop once at ``on_train_start`` — every logger, metric and callback sees it as a
normal validation at step 0 — and leaves the random state of the run as it found it, so a run
trains the same batches with or without it.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.seed import isolate_rng


class ValidateBeforeTraining(Callback):
    """Validate (and log) the model before its first training step.

    Skipped when the fit does not validate (``limit_val_batches=0``, no validation data) and when
    it resumes from a checkpoint (``global_step > 0``: the curve already has its start). A fit it
    validates first skips Lightning's sanity check (a subset of the same pass, just before it).
    ``mtssl fit`` adds it to every run; ``enabled=False`` in the config's callbacks turns it off.
    The validation uses the random state of a copy: torch's (CPU and CUDA), NumPy's and Python's
    generators are restored afterwards (``isolate_rng``), so the training batches and the
    initial dropout masks are those of a run without this pass.

    Args:
        enabled: run the pass (``False``: a config's way to opt out of the default).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit that starts from scratch runs the whole validation before its first step, which
        # fails as early as Lightning's sanity check would and sees every batch: skip the sanity
        # check (2 batches of every loader, seconds per run). A resumed fit keeps it (so does one
        # whose strategy restores checkpoints after this hook: whether it resumes is unknown here).
        resuming = trainer.ckpt_path is not None or trainer.strategy.restore_checkpoint_after_setup
        if self.enabled and not resuming and trainer.enable_validation:
            trainer.num_sanity_val_steps = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.global_step > 0 or not trainer.enable_validation:
            return
        # what Lightning's training epoch loop does around a mid-training validation
        # (loops/training_epoch_loop.py, on_advance_end): mark the stage, keep the logger's
        # per-epoch state, come back to training afterwards
        logger_connector = trainer._logger_connector
        first_loop_iter = logger_connector._first_loop_iter
        with isolate_rng():
            trainer.validating = True
            trainer.fit_loop.epoch_loop.val_loop.run()
            trainer.training = True
        logger_connector._first_loop_iter = first_loop_iter
