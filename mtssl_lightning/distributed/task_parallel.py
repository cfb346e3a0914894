"""Task-parallel training, as in the paper: each rank (GPU) runs a configured subset of the tasks.

The paper trained each task on its own GPUs: the trunk is shared by all workers, a head only by
the workers of its task. :class:`TaskParallelStrategy` is Lightning's DDP strategy (process
groups, launchers, SLURM / torchrun environments, samplers) without the
``DistributedDataParallel`` wrapper — DDP assumes that every rank runs the same graph — and with
an explicit gradient reduction after each backward pass, called by
:class:`~mtssl_lightning.MultiTaskSSL`:

* ``combine: sum``: trunk gradients are averaged over **all** ranks (each rank's gradient is the
  sum over its own tasks); the gradients of task ``t``'s head (and lasso weights) are averaged
  over the ranks that run ``t``;
* ``combine: alternate``: every rank walks through every task of the step in the same order;
  for task ``t`` the gradients of its optimizer's parameters (trunk, head, lasso weights) are
  averaged over the ranks that run ``t`` (the others contribute nothing), and every rank then
  takes the same step with ``t``'s optimizer.

The reduction is one all-reduce over the world group per backward pass, on a flat buffer in
which ranks that do not run a task contribute zeros, scaled per parameter by 1 / (number of
ranks that contributed). Every rank therefore applies identical updates to *every* parameter
and keeps identical optimizer states — the trunk stays identical on all ranks, and rank 0's
checkpoint is complete even for heads it does not train. (Reducing each head over a process
group of its task's ranks would save bandwidth on heads but leave the other ranks' copies
stale.) After each training batch, floating-point buffers (BatchNorm running statistics) of
the trunk are averaged over all ranks (counters copied from rank 0) and each task's buffers are
copied from the first rank that runs it.

``trainer.strategy: ddp_find_unused_parameters_true`` gives plain DDP (all ranks, all tasks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from mtssl_lightning.interfaces import TaskModules

__all__ = ["TaskParallelStrategy", "broadcast_flat"]


def broadcast_flat(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Copy ``src``'s values of ``tensors`` to every rank, in place, with one broadcast per dtype
    (a flat buffer each) instead of one per tensor."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for t in group:
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


class TaskParallelStrategy(DDPStrategy):
    """DDP processes, each training only the tasks assigned to its rank.

    Args:
        task_ranks: ``{task: [global ranks that run it]}``; every task of the model needs at
            least one rank and every rank at least one task. Tasks not listed run on all ranks.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (e.g.
            ``start_method``, ``process_group_backend``, ``timeout``).
    """

    strategy_name = "task_parallel"

    def __init__(self, task_ranks: dict[str, list[int]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not task_ranks:
            raise ValueError("TaskParallelStrategy: `task_ranks` is empty; give {task: [ranks]}")
        self.task_ranks = {name: sorted(set(int(r) for r in ranks)) for name, ranks in task_ranks.items()}
        for name, ranks in self.task_ranks.items():
            if not ranks or ranks[0] < 0:
                raise ValueError(f"TaskParallelStrategy: task {name!r} needs a non-empty list of ranks >= 0, got {task_ranks[name]}")

    # ------------------------------------------------------------ assignment
    def ranks_of_task(self, name: str) -> list[int]:
        """Global ranks that train task ``name`` (all ranks when it is not listed)."""
        return self.task_ranks.get(name, list(range(self.world_size)))

    def tasks_of_rank(self, rank: int, tasks: Sequence[str]) -> list[str]:
        """Those of ``tasks`` that global rank ``rank`` trains (:class:`~mtssl_lightning.interfaces.TaskAssignment`)."""
        return [name for name in tasks if rank in self.ranks_of_task(name)]

    def _check_assignment(self, tasks: list[str]) -> None:
        unknown = sorted(set(self.task_ranks) - set(tasks))
        if unknown:
            raise ValueError(f"TaskParallelStrategy: `task_ranks` names unknown task(s) {unknown}; the tasks are {sorted(tasks)}")
        too_high = {t: r for t, r in self.task_ranks.items() if r[-1] >= self.world_size}
        if too_high:
            raise ValueError(f"TaskParallelStrategy: ranks {too_high} do not exist with {self.world_size} processes (ranks 0..{self.world_size - 1})")
        idle = [r for r in range(self.world_size) if not self.tasks_of_rank(r, tasks)]
        if idle:
            raise ValueError(f"TaskParallelStrategy: rank(s) {idle} run no task; assign every rank at least one task in `task_ranks`")

    # ------------------------------------------------------------ no DDP wrapper
    def configure_ddp(self) -> None:
        """Keep the LightningModule unwrapped; start every rank from rank 0's parameters and buffers."""
        module = self.model
        if not isinstance(module, TaskModules):
            raise TypeError(
                f"TaskParallelStrategy trains a multi-task model (shared and per-task modules, "
                f"mtssl_lightning.interfaces.TaskModules, e.g. MultiTaskSSL); got {type(module).__name__}"
            )
        self._check_assignment(module.task_names())
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            broadcast_flat([*module.parameters(), *module.buffers()], src=0)

    # ------------------------------------------------------------ reductions
    @staticmethod
    def _parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
        return [p for m in modules for p in m.parameters()]

    def _parameter_groups(self, module: TaskModules, task: str | None) -> list[tuple[list[nn.Parameter], int]]:
        """``[(parameters, contributing ranks)]`` reduced after a backward pass of ``task`` (or of all tasks)."""
        shared = self._parameters(module.shared_modules())
        if task is not None:
            return [(shared + self._parameters(module.task_modules(task)), len(self.ranks_of_task(task)))]
        groups = [(shared, self.world_size)]
        groups += [(self._parameters(module.task_modules(name)), len(self.ranks_of_task(name))) for name in module.task_names()]
        return groups

    def reduce_task_gradients(self, module: TaskModules, task: str | None) -> None:
        """Average the gradients of the last backward pass across ranks (see the module docstring).

        Parameters without a gradient on this rank contribute zeros; afterwards every rank holds
        the same averaged gradient for every parameter of the reduced groups.
        """
        if not dist.is_available() or not dist.is_initialized() or self.world_size == 1:
            return
        groups = self._parameter_groups(module, task)
        params = [p for ps, _ in groups for p in ps if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for ps, ranks in groups:
            for p in ps:
                if not p.requires_grad:
                    continue
                n = p.numel()
                p.grad = (flat[offset : offset + n] / ranks).view_as(p).to(p.dtype)
                offset += n

    def sync_buffers(self, module: TaskModules) -> None:
        """Average the trunk's floating buffers over all ranks (its counters: rank 0's); copy each
        task's buffers from the first rank that runs it."""
        if not dist.is_available() or not dist.is_initialized() or self.world_size == 1:
            return
        shared = [b for m in module.shared_modules() for b in m.buffers()]
        trunk = [b for b in shared if b.is_floating_point()]
        if trunk:
            flat = torch.cat([b.reshape(-1).to(torch.float64) for b in trunk])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for b in trunk:
                b.copy_(flat[offset : offset + b.numel()].view_as(b).to(b.dtype))
                offset += b.numel()
        broadcast_flat([b for b in shared if not b.is_floating_point()], src=0)  # counters (num_batches_tracked): rank 0's
        for name in module.task_names():
            broadcast_flat([b for m in module.task_modules(name) for b in m.buffers()], src=self.ranks_of_task(name)[0])
