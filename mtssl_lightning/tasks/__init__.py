"""The self-supervised tasks; each file holds one task's sampling (its ``…Sampler``, the input
builder the DataModule runs on the device), head, loss, metrics and pictures (the ``Task``)."""

from mtssl_lightning.tasks.base import Task, TaskSampler
from mtssl_lightning.tasks.colorization import Colorization, ColorizationSampler
from mtssl_lightning.tasks.exemplar import Exemplar, ExemplarSampler
from mtssl_lightning.tasks.motion_segmentation import MotionSegmentation, MotionSegmentationSampler
from mtssl_lightning.tasks.relative_position import RelativePosition, RelativePositionSampler

__all__ = [
    "Colorization",
    "ColorizationSampler",
    "Exemplar",
    "ExemplarSampler",
    "MotionSegmentation",
    "MotionSegmentationSampler",
    "RelativePosition",
    "RelativePositionSampler",
    "Task",
    "TaskSampler",
]
