"""``MultiTaskSSL``: the shared trunk plus a dictionary of self-supervised tasks.

One training step: every task receives its own named sub-batch, builds its inputs and targets
on the device (``on_after_batch_transfer``), the shared trunk embeds them, the task's head and
loss run, and per-task losses and metrics are logged under ``{stage}/{task}/…``. The step's
loss is the weighted sum ``Σ_t loss_weight_t · loss_t`` (one optimizer). Single-task training is
the same module with one task.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from mtssl_lightning.data.batch import ClipBatch, DataRequest, ImageBatch, TaskBatch
from mtssl_lightning.tasks.base import Task
from mtssl_lightning.trunks import ResNetV2, Trunk

STAGES = ("train", "val")


class MultiTaskSSL(pl.LightningModule):
    """Multi-task self-supervised pretraining of one shared trunk.

    Args:
        tasks: ``{name: task}``; names become log prefixes (``train/<name>/loss``) and must be
            Python identifiers. Each task's head is created here for the trunk's output.
        trunk: the shared trunk (default: ResNet-v2-101 cut after block 3, as in the paper).
        optimizer: builds the optimizer from the parameters (default: RMSProp, lr 1e-3,
            the paper's optimizer family; the paper's exact settings are not published).
        lr_scheduler: optional; stepped every training step.
        val_seed: seed of the task-side randomness in validation (patch positions, …), so
            validation inputs are identical every epoch.
        pixel_scale: multiplies every task's pixel sizes (crop size, patch size, gap, …) before
            the heads are built; ``configs/tiny.yaml`` uses 0.25 to shrink any experiment.
    """

    def __init__(
        self,
        tasks: dict[str, Task],
        trunk: Trunk | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        val_seed: int = 1234,
        pixel_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError(
                "`model.tasks` is empty: configure at least one task, e.g. "
                "`rp: {class_path: mtssl_lightning.tasks.RelativePosition}`"
            )
        for name in tasks:
            if not name.isidentifier():
                raise ValueError(f"task name {name!r} must be a Python identifier (letters, digits, _)")
        self.trunk = trunk if trunk is not None else ResNetV2()
        if pixel_scale <= 0:
            raise ValueError(f"`pixel_scale` must be positive, got {pixel_scale}")
        self.tasks = nn.ModuleDict(tasks)
        for task in self.tasks.values():
            if pixel_scale != 1.0:
                task.rescale(pixel_scale)
            task.attach(self.trunk.out_channels, self.trunk.out_stride)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": task.make_metrics().clone(prefix=f"{stage}/{name}/")
                for stage in STAGES
                for name, task in self.tasks.items()
            }
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.val_seed = val_seed
        self._val_batches_seen = 0

    # ------------------------------------------------------------------- data
    def data_requests(self) -> dict[str, DataRequest]:
        """What each task needs from the DataModule (read by ``MultiTaskDataModule``)."""
        return {name: task.data_request() for name, task in self.tasks.items()}

    def build_task_batches(self, batch: dict[str, ImageBatch | ClipBatch | None]) -> dict[str, TaskBatch | None]:
        """Let each task turn its uint8 images (or clips) into inputs and targets, on the batch's device."""
        out: dict[str, TaskBatch | None] = {}
        with torch.no_grad():
            for name, task in self.tasks.items():
                sub = batch.get(name)
                out[name] = None if sub is None else task.prepare(sub)
        return out

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, (ImageBatch, ClipBatch)):  # prediction: one task's loader at a time, in task order
            batch = {list(self.tasks)[dataloader_idx]: batch}
        if not isinstance(batch, dict):
            return batch
        if self.trainer.training:
            return self.build_task_batches(batch)
        # validation/test: fixed randomness per batch, so every epoch sees the same inputs
        seed = self.val_seed + 1_000_003 * self.global_rank + self._val_batches_seen
        self._val_batches_seen += 1
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.build_task_batches(batch)

    def on_validation_epoch_start(self) -> None:
        self._val_batches_seen = 0

    # ------------------------------------------------------------------- steps
    def task_forward(self, name: str, batch: TaskBatch) -> Tensor:
        """Trunk + head of task ``name`` on its batch; returns the task's predictions."""
        features = self.trunk(batch.inputs).features
        return self.tasks[name](features, batch)

    def _shared_step(self, batch: dict[str, TaskBatch | None], stage: str) -> Tensor:
        total: Tensor | None = None
        for name, task in self.tasks.items():
            sub = batch.get(name)
            if sub is None:  # this task's validation loader is exhausted
                continue
            prediction = self.task_forward(name, sub)
            loss = task.loss(prediction, sub)
            size = sub.inputs.shape[0]
            self.log(f"{stage}/{name}/loss", loss, batch_size=size, prog_bar=True, on_step=stage == "train", on_epoch=True)
            metrics = self.metrics[f"{stage}_{name}"]
            metrics.update(*task.metric_inputs(prediction.detach(), sub))
            self.log_dict(metrics, batch_size=size, on_step=False, on_epoch=True)
            weighted = task.loss_weight * loss
            total = weighted if total is None else total + weighted
        assert total is not None, "a batch with no task sub-batch"
        self.log(f"{stage}/loss", total, batch_size=1, on_step=stage == "train", on_epoch=True)
        return total

    def training_step(self, batch: dict[str, TaskBatch | None], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, TaskBatch | None], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, TaskBatch | None], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def predict_step(self, batch: dict[str, TaskBatch | None], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Each task's predictions on its validation-style inputs, ``{task: prediction}``."""
        return {name: self.task_forward(name, sub) for name, sub in batch.items() if sub is not None}

    # -------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            optimizer = torch.optim.RMSprop(self.parameters(), lr=1e-3)
        else:
            optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain strings/numbers only, so `load_trunk` can rebuild the trunk with weights_only=True
        checkpoint["trunk_spec"] = self.trunk.spec()
