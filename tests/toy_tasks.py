"""A minimal task for testing the multi-task machinery independently of the real tasks.

``Brightness``: predict the mean brightness of the (grey) image from its trunk features, a
regression with a known optimum, so the machinery tests do not depend on the paper's tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection

from mtssl_lightning.data.batch import TaskBatch
from mtssl_lightning.tasks.base import Task


@dataclass
class BrightnessBatch(TaskBatch):
    target: Tensor  # (B,)


class Brightness(Task):
    def build_head(self, channels: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))

    def build(self, images: Tensor) -> BrightnessBatch:
        scale = torch.rand(images.shape[0], 1, 1, 1, device=images.device)
        inputs = self.harmonize(images * scale)
        return BrightnessBatch(inputs=inputs, target=inputs.mean(dim=(1, 2, 3)))

    def forward(self, features: Tensor, batch: TaskBatch) -> Tensor:
        return super().forward(features, batch).squeeze(1)

    def loss(self, prediction: Tensor, batch: BrightnessBatch) -> Tensor:
        return nn.functional.mse_loss(prediction, batch.target)

    def make_metrics(self) -> MetricCollection:
        return MetricCollection({"mse": MeanSquaredError()})

    def metric_inputs(self, prediction: Tensor, batch: BrightnessBatch) -> tuple[Tensor, Tensor]:
        return prediction, batch.target
