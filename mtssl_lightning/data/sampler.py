"""``TaskSampler``: one task's input builder, the piece the DataModule and the task share.

A sampler turns what the CPU workers deliver for one task — ``uint8`` images
(:class:`~mtssl_lightning.data.batch.ImageBatch`) or clips
(:class:`~mtssl_lightning.data.batch.ClipBatch`) — into that task's trunk inputs and targets
(a :class:`~mtssl_lightning.data.batch.TaskBatch`), batched, on the batch's device: patch grids
and pair labels, Lab lightness and ab targets, augmented views, motion masks. Each task's
sampler lives in the task's own file (beside its head, loss, metrics and pictures).

Who calls it: :class:`~mtssl_lightning.data.datamodule.MultiTaskDataModule` in its
``on_after_batch_transfer`` (so a DataModule alone yields complete task batches), and the task
itself for convenience (``Task.build``, notebooks, tests). A sampler is configuration only — no
learned state and nothing saved in checkpoints; state that belongs to the loss (colorization's
running bin prior) stays on the task, in the LightningModule.

Randomness comes from the ``generator`` passed to :meth:`TaskSampler.build` (the DataModule
gives each rank its own, see ``MultiTaskDataModule``), or torch's global RNG when it is ``None``.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from mtssl_lightning.data.batch import ClipBatch, DataRequest, ImageBatch, TaskBatch
from mtssl_lightning.data.color import lab_gray
from mtssl_lightning.data.datasets import crop_scale_range

__all__ = ["InputMode", "SourceKind", "TaskSampler", "TaskSamplerProvider"]

InputMode = Literal["rgb", "lab_gray"]
SourceKind = Literal["images", "videos"]


class TaskSampler(abc.ABC):
    """Base class of the task input builders (see the module docstring).

    Args:
        batch_size: images (or clips) per step for this task; each task gets its own sub-batch.
        image_size: side of the square crops the DataModule delivers to this task.
        input_mode: ``"rgb"``, or ``"lab_gray"`` for the paper's input harmonization (Lab L
            replicated three times, scaled to [0, 1] like RGB).
        crop_area: ``(smallest, largest)`` area of this task's random crops (training and
            validation alike) as fractions of the image (or video frame); ``None`` = the
            DataModule's ``(min_scale, 1)``. A per-task setting because the tasks want different
            scales: relative position's patches should stay near native resolution (the original
            cut them from the full image, not from a downscaled whole photo), while exemplar and
            colorization take crops of any size.
    """

    #: which DataModule source feeds the task
    source: ClassVar[SourceKind] = "images"

    def __init__(
        self, batch_size: int = 32, image_size: int = 224, input_mode: InputMode = "rgb",
        crop_area: tuple[float, float] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"{self.task_name}: `batch_size` must be >= 1, got {batch_size}")
        if input_mode not in ("rgb", "lab_gray"):
            raise ValueError(f"{self.task_name}: `input_mode` must be 'rgb' or 'lab_gray', got {input_mode!r}")
        if crop_area is not None:  # the datasets' own check, with this task's name in the message
            crop_area = crop_scale_range((crop_area[0], crop_area[1]), f"{self.task_name}.crop_area")
        self.batch_size = batch_size
        self.image_size = image_size
        self.crop_area = crop_area
        self.input_mode: InputMode = input_mode

    @property
    def task_name(self) -> str:
        """The task's class name, for messages (``RelativePositionSampler`` -> ``RelativePosition``)."""
        return type(self).__name__.removesuffix("Sampler")

    def data_request(self) -> DataRequest:
        """What this task needs from the DataModule."""
        return DataRequest(source=self.source, batch_size=self.batch_size, image_size=self.image_size, crop_area=self.crop_area)

    def rescale(self, factor: float) -> None:
        """Multiply every pixel size of the task by ``factor`` (``model.pixel_scale``).

        The base class scales ``image_size``; samplers with more pixel sizes (patches, gaps)
        extend it. Lets one overlay config (``configs/tiny.yaml``) shrink any experiment.
        """
        self.image_size = max(1, round(self.image_size * factor))

    def harmonize(self, rgb: Tensor) -> Tensor:
        """Apply the task's ``input_mode`` to ``(N, 3, H, W)`` RGB in [0, 1]."""
        return lab_gray(rgb) if self.input_mode == "lab_gray" else rgb

    def prepare(self, batch: ImageBatch | ClipBatch, generator: torch.Generator | None = None) -> TaskBatch:
        """The task's batch from what the workers delivered, on the batch's device, without gradient.

        Image tasks: ``uint8`` images to float in [0, 1], then :meth:`build`. Video samplers
        (``source = "videos"``) override :meth:`_prepare` to read :class:`ClipBatch` clips (and
        masks). The result records how many images (clips) it came from and how many files the
        workers skipped (``samples``, ``skipped``), for the throughput and bad-file counters.
        """
        with torch.no_grad():
            built = self._prepare(batch, generator)
        built.samples, built.skipped = len(batch), batch.skipped
        return built

    def _prepare(self, batch: ImageBatch | ClipBatch, generator: torch.Generator | None) -> TaskBatch:
        if not isinstance(batch, ImageBatch):
            raise TypeError(f"{self.task_name} reads images, got {type(batch).__name__}")
        return self.build(batch.images.float().div_(255.0), generator=generator)

    @abc.abstractmethod
    def build(self, images: Tensor, generator: torch.Generator | None = None) -> TaskBatch:
        """Make the trunk inputs and targets from ``(B, 3, H, W)`` float RGB in [0, 1] on the device.

        Called without gradient. Randomness comes from ``generator`` (on the images' device), or
        torch's global RNG when it is ``None``.
        """


@runtime_checkable
class TaskSamplerProvider(Protocol):
    """What a LightningModule offers a :class:`~mtssl_lightning.data.datamodule.MultiTaskDataModule`
    that was given no samplers: its tasks' samplers, ``{task: sampler}`` in task order
    (:class:`~mtssl_lightning.MultiTaskSSL` implements it)."""

    def task_samplers(self) -> dict[str, TaskSampler]:
        """``{task name: sampler}``, in the order the tasks are stepped and logged."""
        ...
