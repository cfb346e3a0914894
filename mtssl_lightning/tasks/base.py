"""The task interface: a task is a small object that owns its sampling, head, loss and metrics.

Each task file holds two classes:

* a :class:`~mtssl_lightning.data.sampler.TaskSampler` (``RelativePositionSampler``, …): the
  input builder, configuration only. The DataModule calls it on the device, so every batch the
  training step receives is ready;
* a :class:`Task` (``RelativePosition``, …): an ``nn.Module`` with the head, the loss, the
  torchmetrics, the pictures and any state that belongs to the loss; it creates its sampler from
  its own arguments and exposes it as ``task.sampler``.

Life of one training step for one task (see ``MultiTaskSSL`` and ``MultiTaskDataModule``):

1. a CPU worker delivers an :class:`~mtssl_lightning.data.batch.ImageBatch` (uint8 crops) or a
   :class:`~mtssl_lightning.data.batch.ClipBatch`;
2. on the device, the DataModule's ``on_after_batch_transfer`` lets ``task.sampler`` turn it into
   a :class:`TaskBatch` — the trunk's ``inputs`` plus the task's targets — with batched
   tensor/Kornia ops, no per-sample Python;
3. the LightningModule calls :meth:`Task.observe` (training batches only), runs the shared trunk
   on ``inputs``, hands the features to :meth:`Task.forward` (the head), then :meth:`Task.loss`
   and the task's metrics.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from mtssl_lightning.data.batch import ClipBatch, DataRequest, ImageBatch, TaskBatch
from mtssl_lightning.data.sampler import InputMode, SourceKind, TaskSampler
from mtssl_lightning.tasks import pictures as draw

__all__ = ["InputMode", "Task", "TaskSampler"]


class Task(nn.Module, abc.ABC):
    """Base class of the self-supervised tasks (the LightningModule side of a task).

    Args:
        sampler: the task's input builder; its settings (batch size, crop size, patch sizes …)
            are the task's sampling settings, read through ``task.sampler``.
        loss_weight: weight of this task's loss in the "sum of weighted losses" mode.
    """

    def __init__(self, sampler: TaskSampler, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.sampler = sampler  # a plain object: not a submodule, nothing of it in checkpoints
        self.loss_weight = loss_weight
        self.head: nn.Module | None = None

    # ---- the sampler's settings the rest of the package reads --------------------------

    @property
    def source(self) -> SourceKind:
        """Which DataModule source feeds the task (``"images"`` or ``"videos"``)."""
        return self.sampler.source

    @property
    def batch_size(self) -> int:
        """Images (or clips) per step for this task."""
        return self.sampler.batch_size

    @property
    def image_size(self) -> int:
        """Side of the square crops the DataModule delivers to this task."""
        return self.sampler.image_size

    @property
    def input_mode(self) -> InputMode:
        """``"rgb"`` or ``"lab_gray"`` (harmonized input)."""
        return self.sampler.input_mode

    def data_request(self) -> DataRequest:
        """What this task needs from the DataModule (its sampler's request)."""
        return self.sampler.data_request()

    def rescale(self, factor: float) -> None:
        """Multiply every pixel size of the task by ``factor`` (``model.pixel_scale``), before :meth:`attach`."""
        self.sampler.rescale(factor)

    # ---- convenience: build inputs with this task's sampler (notebooks, tests) ---------

    def build(self, images: Tensor, generator: torch.Generator | None = None) -> TaskBatch:
        """``self.sampler.build``: inputs and targets from ``(B, 3, H, W)`` float RGB in [0, 1].

        Training batches come ready from the DataModule; this is for notebooks and tests.
        """
        return self.sampler.build(images, generator=generator)

    def prepare(self, batch: ImageBatch | ClipBatch, generator: torch.Generator | None = None) -> TaskBatch:
        """``self.sampler.prepare``: inputs and targets from what the workers delivered."""
        return self.sampler.prepare(batch, generator=generator)

    # ---- the model side -----------------------------------------------------------------

    def attach(self, channels: int, stride: int) -> None:
        """Create the head for a trunk with ``channels`` output channels at ``stride``."""
        self.head = self.build_head(channels, stride)

    @abc.abstractmethod
    def build_head(self, channels: int, stride: int) -> nn.Module:
        """The task's head, reading ``(N, channels, h, w)`` trunk features."""

    def observe(self, batch: TaskBatch) -> None:
        """Update state that belongs to the loss from a training batch, before its loss.

        Called by the LightningModule once per training batch of this task (not in validation).
        The base class has none; colorization counts its running bin prior here.
        """

    def synchronize(self, all_reduce: Callable[[Tensor], Tensor]) -> None:
        """Make what :meth:`observe` gathered this step the same on every rank.

        Called by the LightningModule once per training step for every task, on every rank (so a
        task may run collectives: ``all_reduce`` sums a tensor over the ranks on the device, the
        identity on one process). The base class has nothing to share.
        """

    def forward(self, features: Tensor, batch: TaskBatch) -> Tensor:
        """Run the head on ``(N, C, h, w)`` trunk features; returns the task's predictions."""
        assert self.head is not None, "call attach() before forward()"
        return self.head(features)

    @abc.abstractmethod
    def loss(self, prediction: Tensor, batch: TaskBatch) -> Tensor:
        """Scalar loss of ``prediction`` against the targets in ``batch``."""

    @abc.abstractmethod
    def make_metrics(self) -> MetricCollection:
        """Fresh torchmetrics for this task (one copy per stage is made by the LightningModule)."""

    @abc.abstractmethod
    def metric_inputs(self, prediction: Tensor, batch: TaskBatch) -> tuple[Any, ...]:
        """Arguments for ``make_metrics()``'s ``update``, e.g. ``(logits, labels)``."""

    @torch.no_grad()
    def pictures(self, batch: TaskBatch, prediction: Tensor | None = None, max_items: int = 4) -> dict[str, Tensor]:
        """Named RGB pictures ``(3, H, W)`` float in [0, 1] (CPU) of what the task sees: inputs, targets and, when
        ``prediction`` (the output of the task's forward on ``batch``) is given, predictions; for W&B media and notebooks.

        The base class shows one row of the first ``max_items`` trunk inputs (key ``"inputs"``);
        the tasks override it with their own layouts.
        """
        return {"inputs": draw.grid(batch.inputs[:max_items]).cpu()}

    def extra_repr(self) -> str:
        return repr(self.sampler)
