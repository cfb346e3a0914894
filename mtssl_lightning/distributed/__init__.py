"""Distributed training: the task-parallel strategy (each rank runs a subset of the tasks)."""

from mtssl_lightning.distributed.task_parallel import TaskParallelStrategy

__all__ = ["TaskParallelStrategy"]
