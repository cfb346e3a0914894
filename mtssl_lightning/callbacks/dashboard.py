"""What a W&B dashboard of a run shows beyond losses and metrics (which the modules log).

:class:`TrainingDashboard` logs, for any LightningModule:

* ``lr/<name>``: the learning rate of every optimizer (``<name>`` = the task in the per-task
  ``combine: alternate`` mode, ``all`` for one optimizer, ``opt<i>`` otherwise);
* ``perf/samples_per_s``: images (or clips) per second through the whole step, and
  ``perf/data_wait_share``: the share of the step's wall-clock time spent between the end of a
  step and the start of the next one — fetching the batch from the workers, moving it to the
  device and building the task inputs there. A share near 0 means the trunk never waits.
  Wall-clock on the host without CUDA synchronisation: on a GPU the step time includes waiting
  for queued kernels, which is what matters for "is the GPU starved";

and, for :class:`~mtssl_lightning.MultiTaskSSL`, every ``media_every_n_steps`` training steps
(by global rank 0, to every logger that has ``log_image``, i.e. W&B):

* ``media/<task>/<picture>``: each task's :meth:`~mtssl_lightning.tasks.base.Task.pictures` of
  the current training batch with the model's predictions (relative-position pairs with true
  and predicted positions, colorization input/prediction/truth, exemplar views, motion masks);
* ``lasso/alpha_heatmap``: the lasso weights α as a tasks × units heatmap (lasso mode).

Under a task-parallel strategy rank 0 does not have every task's batch: each task's pictures are
drawn by the lowest rank that trains it, from its own batch, and gathered to rank 0 with one
``gather_object`` (a few small uint8 images per task) — every rank takes part on those steps.

The per-task gradient norm on the shared trunk (``grad_norm/<task>``) is logged by
``MultiTaskSSL`` itself, which has the task losses.
"""

from __future__ import annotations

import io
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from mtssl_lightning.device_scalars import DeviceScalars
from mtssl_lightning.interfaces import tasks_of_rank


def alpha_heatmap(alpha: Tensor, tasks: list[str]) -> np.ndarray:
    """Render lasso weights ``(T, U)`` as an RGB ``uint8 (H, W, 3)`` heatmap (rows: tasks, columns: units)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    values = alpha.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * values.shape[1] + 2), 0.5 * len(tasks) + 1.2), dpi=100)
    limit = max(float(np.abs(values).max()), 1e-6)
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("unit of the last block")
    ax.set_title("lasso α")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    from PIL import Image

    return np.asarray(Image.open(buffer).convert("RGB"))


def _image_loggers(trainer: pl.Trainer) -> list[Any]:
    return [logger for logger in trainer.loggers if hasattr(logger, "log_image")]


class TrainingDashboard(Callback):
    """Learning rates, throughput, data-wait share, task pictures and the lasso heatmap (see the module docstring).

    Args:
        media_every_n_steps: training steps between pictures (0 = never).
        max_items: samples per picture.
    """

    def __init__(self, media_every_n_steps: int = 200, max_items: int = 4) -> None:
        if media_every_n_steps < 0:
            raise ValueError(f"`media_every_n_steps` must be >= 0, got {media_every_n_steps}")
        self.media_every_n_steps, self.max_items = media_every_n_steps, max_items
        self._step_start: float | None = None
        self._last_end: float | None = None
        self._scalars = DeviceScalars()  # host numbers logged without a host-to-device copy per step

    # -------------------------------------------------------------------- speed
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None  # the gap across an epoch boundary (validation, loader restart) is not data wait

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # not Lightning's ThroughputMonitor: it synchronises CUDA after every step (a host sync the
        # training step is meant not to have) and has no data-wait share
        now = time.perf_counter()
        if self._step_start is not None and self._last_end is not None:
            wait, compute = self._step_start - self._last_end, now - self._step_start
            samples = getattr(pl_module, "last_batch_samples", None)
            metrics = {"perf/data_wait_share": wait / max(wait + compute, 1e-9)}
            if samples:
                metrics["perf/samples_per_s"] = samples / max(wait + compute, 1e-9)
            pl_module.log_dict(self._scalars(metrics, pl_module.device), on_step=True, on_epoch=False, batch_size=1)
        self._log_learning_rates(trainer, pl_module)
        step = trainer.global_step
        if self.media_every_n_steps and step % self.media_every_n_steps == 0:
            self._log_media(trainer, pl_module, batch, step)
        self._last_end = time.perf_counter()  # after our own work, so pictures do not count as data wait

    def _log_learning_rates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not Lightning's LearningRateMonitor: it names an optimizer without a scheduler after its
        # class ("lr-RMSprop-2"), not after its task, so the dashboard's keys would depend on the config
        optimizers = trainer.optimizers
        tasks = list(getattr(pl_module, "tasks", {}))
        if len(optimizers) == 1:
            names = ["all"]
        elif len(optimizers) == len(tasks):
            names = tasks
        else:
            names = [f"opt{i}" for i in range(len(optimizers))]
        rates = {f"lr/{name}": float(opt.param_groups[0]["lr"]) for name, opt in zip(names, optimizers)}
        pl_module.log_dict(self._scalars(rates, pl_module.device), on_step=True, on_epoch=False, batch_size=1)

    # -------------------------------------------------------------------- media
    def _log_media(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> None:
        tasks = getattr(pl_module, "tasks", None)
        if tasks is None or not isinstance(batch, dict):
            return
        gather = trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        if not gather and not (trainer.is_global_zero and _image_loggers(trainer)):
            return
        names = list(tasks)
        rank = trainer.global_rank
        # the tasks whose pictures this rank draws: those no lower rank trains (all, on rank 0, without task-parallelism)
        lower = {t for r in range(rank) for t in tasks_of_rank(trainer.strategy, r, names)}
        mine = [t for t in tasks_of_rank(trainer.strategy, rank, names) if t not in lower]
        pictures = self._pictures(pl_module, {t: batch.get(t) for t in mine})
        if gather:
            everyone: list[Any] | None = [None] * trainer.world_size if trainer.is_global_zero else None
            torch.distributed.gather_object(pictures, everyone, dst=0)
            pictures = {k: v for part in everyone or [] for k, v in part.items()}
        loggers = _image_loggers(trainer) if trainer.is_global_zero else []
        mixers = getattr(pl_module, "mixers", None)
        if loggers and getattr(pl_module, "mixing", None) == "lasso" and mixers:
            pictures["lasso/alpha_heatmap"] = alpha_heatmap(torch.stack([mixers[name].alpha for name in tasks]), names)
        for key in sorted(pictures):
            for logger in loggers:
                logger.log_image(key=key, images=[pictures[key]], step=step)

    @torch.no_grad()
    def _pictures(self, pl_module: pl.LightningModule, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """``{"media/<task>/<picture>": uint8 (H, W, 3)}`` of the tasks in ``batch`` with the model's predictions."""
        out: dict[str, np.ndarray] = {}
        was_training = pl_module.training
        pl_module.eval()  # predictions with running BN statistics, and no BN statistics updated
        try:
            for name, sub in batch.items():
                if sub is None:
                    continue
                prediction = pl_module.task_forward(name, sub)
                for key, picture in pl_module.tasks[name].pictures(sub, prediction, max_items=self.max_items).items():
                    out[f"media/{name}/{key}"] = (picture.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        finally:
            pl_module.train(was_training)
        return out
