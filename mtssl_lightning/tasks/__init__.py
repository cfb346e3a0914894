"""The self-supervised tasks; each file holds one task's sampling, head, loss and metrics."""

from mtssl_lightning.tasks.base import Task

__all__ = ["Task"]
