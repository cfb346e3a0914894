"""The self-supervised tasks; each file holds one task's sampling, head, loss and metrics."""

from mtssl_lightning.tasks.base import Task
from mtssl_lightning.tasks.colorization import Colorization

__all__ = ["Colorization", "Task"]
