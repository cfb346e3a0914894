"""The self-supervised tasks; each file holds one task's sampling, head, loss and metrics."""

from mtssl_lightning.tasks.base import Task
from mtssl_lightning.tasks.colorization import Colorization
from mtssl_lightning.tasks.exemplar import Exemplar
from mtssl_lightning.tasks.motion_segmentation import MotionSegmentation
from mtssl_lightning.tasks.relative_position import RelativePosition

__all__ = ["Colorization", "Exemplar", "MotionSegmentation", "RelativePosition", "Task"]
