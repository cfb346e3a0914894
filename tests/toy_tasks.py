"""A minimal task for testing the multi-task machinery independently of the real tasks.

``Brightness``: predict the mean brightness of the (grey) image from its trunk features, a
regression with a known optimum, so the machinery tests do not depend on the paper's tasks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection

from mtssl_lightning.data.batch import ClipBatch, ImageBatch, TaskBatch
from mtssl_lightning.data.datamodule import MultiTaskDataModule
from mtssl_lightning.tasks.base import InputMode, Task, TaskSampler


@dataclass
class BrightnessBatch(TaskBatch):
    target: Tensor  # (B,)


class BrightnessSampler(TaskSampler):
    def build(self, images: Tensor, generator: torch.Generator | None = None) -> BrightnessBatch:
        scale = torch.rand(images.shape[0], 1, 1, 1, device=images.device, generator=generator)
        inputs = self.harmonize(images * scale)
        return BrightnessBatch(inputs=inputs, target=inputs.mean(dim=(1, 2, 3)))


class Brightness(Task):
    def __init__(self, batch_size: int = 32, image_size: int = 224, loss_weight: float = 1.0, input_mode: InputMode = "rgb") -> None:
        super().__init__(BrightnessSampler(batch_size, image_size, input_mode), loss_weight)

    def build_head(self, channels: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))

    def forward(self, features: Tensor, batch: TaskBatch) -> Tensor:
        return super().forward(features, batch).squeeze(1)

    def loss(self, prediction: Tensor, batch: BrightnessBatch) -> Tensor:
        return nn.functional.mse_loss(prediction, batch.target)

    def make_metrics(self) -> MetricCollection:
        return MetricCollection({"mse": MeanSquaredError()})

    def metric_inputs(self, prediction: Tensor, batch: BrightnessBatch) -> tuple[Tensor, Tensor]:
        return prediction, batch.target


class StepMarker(Callback):
    """Writes the global step to ``path`` after every training batch (a subprocess test polls it);
    ``delay`` seconds of sleep per batch keep a tiny run going long enough to be interrupted."""

    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path(self.path).write_text(str(trainer.global_step))
        time.sleep(self.delay)


class LossRecorder(Callback):
    """Keeps every per-step training loss the module logged (``train/…loss_step``), in order."""

    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.losses.append({k: float(v) for k, v in sorted(metrics.items()) if k.startswith("train/") and k.endswith("loss_step")})


#: a complete `mtssl fit` config around the toy task: two CPU steps, no logger, no workers
TOY_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_progress_bar: false
  limit_val_batches: 1
model:
  trunk:
    class_path: mtssl_lightning.trunks.ResNetV2
    init_args: {depth: tiny, width: 0.125}
  tasks:
    bright:
      class_path: toy_tasks.Brightness
      init_args: {batch_size: 2, image_size: 32}
data:
  num_workers: 0
  steps_per_epoch: 2
  val_samples: 2
"""


def build_batches(model, raw: dict[str, ImageBatch | ClipBatch | None], training: bool = True) -> dict[str, TaskBatch | None]:
    """Ready task batches from raw ``{task: ImageBatch}``, as the DataModule makes them for ``model``'s tasks."""
    return MultiTaskDataModule(samplers=model.task_samplers()).build(raw, training=training)
