"""The task interface: a task is a small object that owns its sampling, head, loss and metrics.

Life of one training step for one task (see ``MultiTaskSSL``):

1. a CPU worker delivers an :class:`~mtssl_lightning.data.batch.ImageBatch` (uint8 crops);
2. on the device, :meth:`Task.build` turns the images into a :class:`TaskBatch` — the trunk's
   ``inputs`` plus the task's targets — with batched tensor/Kornia ops, no per-sample Python;
3. the LightningModule runs the shared trunk on ``inputs`` and hands the features to
   :meth:`Task.forward` (the head), then :meth:`Task.loss` and the task's metrics.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from mtssl_lightning.data.batch import ClipBatch, DataRequest, ImageBatch, TaskBatch
from mtssl_lightning.data.color import lab_gray
from mtssl_lightning.tasks import pictures as draw

InputMode = Literal["rgb", "lab_gray"]


class Task(nn.Module, abc.ABC):
    """Base class of the self-supervised tasks.

    Args:
        batch_size: images (or clips) per step for this task; each task gets its own sub-batch.
        image_size: side of the square crops the DataModule delivers to this task.
        loss_weight: weight of this task's loss in the "sum of weighted losses" mode.
        input_mode: ``"rgb"``, or ``"lab_gray"`` for the paper's input harmonization (Lab L
            replicated three times, scaled to [0, 1] like RGB).
    """

    #: which DataModule source feeds the task
    source: ClassVar[Literal["images", "videos"]] = "images"

    def __init__(
        self,
        batch_size: int = 32,
        image_size: int = 224,
        loss_weight: float = 1.0,
        input_mode: InputMode = "rgb",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: `batch_size` must be >= 1, got {batch_size}")
        if input_mode not in ("rgb", "lab_gray"):
            raise ValueError(f"{type(self).__name__}: `input_mode` must be 'rgb' or 'lab_gray', got {input_mode!r}")
        self.batch_size = batch_size
        self.image_size = image_size
        self.loss_weight = loss_weight
        self.input_mode: InputMode = input_mode
        self.head: nn.Module | None = None

    def data_request(self) -> DataRequest:
        """What this task needs from the DataModule."""
        return DataRequest(source=self.source, batch_size=self.batch_size, image_size=self.image_size)

    def rescale(self, factor: float) -> None:
        """Multiply every pixel size of the task by ``factor`` (``model.pixel_scale``).

        The base class scales ``image_size``; tasks with more pixel sizes (patches, gaps)
        extend it. Lets one overlay config (``configs/tiny.yaml``) shrink any experiment.
        """
        self.image_size = max(1, round(self.image_size * factor))

    def attach(self, channels: int, stride: int) -> None:
        """Create the head for a trunk with ``channels`` output channels at ``stride``."""
        self.head = self.build_head(channels, stride)

    def harmonize(self, rgb: Tensor) -> Tensor:
        """Apply the task's ``input_mode`` to ``(N, 3, H, W)`` RGB in [0, 1]."""
        return lab_gray(rgb) if self.input_mode == "lab_gray" else rgb

    @abc.abstractmethod
    def build_head(self, channels: int, stride: int) -> nn.Module:
        """The task's head, reading ``(N, channels, h, w)`` trunk features."""

    def prepare(self, batch: ImageBatch | ClipBatch) -> TaskBatch:
        """Make the task's batch from what the workers delivered, on the device, without gradient.

        Image tasks: ``uint8`` images to float in [0, 1], then :meth:`build`. Video tasks
        (``source = "videos"``) override this to read :class:`ClipBatch` clips (and masks).
        """
        if not isinstance(batch, ImageBatch):
            raise TypeError(f"{type(self).__name__} reads images, got {type(batch).__name__}")
        return self.build(batch.images.float().div_(255.0))

    @abc.abstractmethod
    def build(self, images: Tensor) -> TaskBatch:
        """Make the trunk inputs and targets from ``(B, 3, H, W)`` float RGB in [0, 1] on the device.

        Called without gradient. Randomness comes from torch's global RNG (seeded per batch in
        validation, so validation inputs are the same every epoch).
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
