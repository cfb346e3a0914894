"""The one small interface between the multi-task LightningModule, its DataModule and a task-parallel strategy.

Three parties need a few facts from each other; they exchange them through these protocols
(structural types: nothing to inherit) instead of reaching into each other's attributes, and
none of the three modules imports another:

* *which tasks does rank r train* — the module (which losses to compute) and the DataModule
  (which loaders to open) ask the strategy: :class:`TaskAssignment`, read through
  :func:`tasks_of_rank`. A strategy that is not one (single device, plain DDP, FSDP) trains
  every task on every rank. :class:`TaskParallel` (a :class:`TaskAssignment` that also reduces
  each task's gradients over its ranks) is what the module drives in its training step;
  :class:`~mtssl_lightning.distributed.TaskParallelStrategy` is one.
* *which modules are shared, which belong to task t* — a task-parallel strategy asks the module
  (which gradients to reduce over which ranks, which buffers to sync): :class:`TaskModules`.
  :class:`~mtssl_lightning.MultiTaskSSL` is one.
* *what does each task need from the data* — the DataModule asks the module when it was given no
  samplers: :class:`~mtssl_lightning.data.sampler.TaskSamplerProvider` (in the data package,
  beside the samplers it returns).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["GradientSlots", "TaskAssignment", "TaskModules", "TaskParallel", "tasks_of_rank"]


@runtime_checkable
class TaskAssignment(Protocol):
    """A strategy that trains only some of the tasks on each rank."""

    def tasks_of_rank(self, rank: int, tasks: Sequence[str]) -> list[str]:
        """Those of ``tasks`` (in their order) that global rank ``rank`` trains."""
        ...


def tasks_of_rank(strategy: object, rank: int, tasks: Sequence[str]) -> list[str]:
    """The tasks global rank ``rank`` trains: ``strategy``'s assignment if it is a
    :class:`TaskAssignment`, else all of ``tasks`` (in order)."""
    if isinstance(strategy, TaskAssignment):
        return strategy.tasks_of_rank(rank, tasks)
    return list(tasks)


@runtime_checkable
class TaskModules(Protocol):
    """A multi-task model as a task-parallel strategy sees it: shared modules and per-task modules."""

    def task_names(self) -> list[str]:
        """The tasks, in the order they are stepped."""
        ...

    def shared_modules(self) -> list[nn.Module]:
        """Modules every task trains (the trunk)."""
        ...

    def task_modules(self, name: str) -> list[nn.Module]:
        """Modules only task ``name`` trains (its head, its lasso mixer)."""
        ...


class GradientSlots(Protocol):
    """Per-task gradient slots reduced across ranks, as the module's concurrent step drives them
    (:class:`mtssl_lightning.distributed.gradient_slots.GradientSlots` is one)."""

    def begin(self) -> None:
        """Zero every slot."""
        ...

    def collect(self, slot: str, tasks: Sequence[str], scale: float, launch: bool) -> AbstractContextManager[None]:
        """Around a backward pass: its gradients (× ``scale``) go into ``slot`` (and ``tasks``' own
        parameters'); with ``launch``, reductions start as the slot's buckets complete."""
        ...

    def finish(self) -> None:
        """Complete every reduction: each slot holds its sum over the ranks."""
        ...

    def assign(self, slot: str, tasks: Sequence[str]) -> None:
        """Point ``.grad`` of the shared parameters and of ``tasks``' own ones at ``slot``'s reduced gradient."""
        ...

    def shared_gradient(self, slot: str) -> list[Tensor]:
        """``slot``'s reduced gradient of the shared parameters (flat pieces)."""
        ...


@runtime_checkable
class TaskParallel(TaskAssignment, Protocol):
    """A :class:`TaskAssignment` strategy that the module asks to reduce gradients and sync buffers."""

    def reduce_task_gradients(self, module: TaskModules, task: str | None) -> None:
        """After a backward pass of ``task`` (``None``: of all this rank's tasks), make the gradients
        every rank holds the ones the update needs (averaged over the right ranks)."""
        ...

    def sync_buffers(self, module: TaskModules) -> None:
        """After a training step, make the buffers (BatchNorm statistics …) equal on every rank."""
        ...

    def task_scale(self, name: str) -> float:
        """``1 / (number of ranks that run task name)``: one rank's share of the task's mean."""
        ...

    def task_slots(self, module: TaskModules, slots: Sequence[str], own: Sequence[str]) -> GradientSlots:
        """Per-task gradient slots (``slots``) over the shared modules plus the own parameters of
        ``own``, reduced over all ranks (the concurrent step)."""
        ...

    def task_means(self, values: dict[str, Tensor], tasks: Sequence[str], width: int = 1) -> dict[str, Tensor]:
        """``{task: mean over its ranks of values[task]}`` (``(width,)`` tensors) for all ``tasks``, on every rank."""
        ...
