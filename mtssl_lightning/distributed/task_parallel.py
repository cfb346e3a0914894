"""Task-parallel training, as in the paper: each rank (GPU) runs a configured subset of the tasks.

The paper trained each task on its own GPUs: the trunk is shared by all workers, a head only by
the workers of its task, each task with its own RMSProp. :class:`TaskParallelStrategy` is
Lightning's DDP strategy (process groups, launchers, SLURM / torchrun environments, samplers)
without the ``DistributedDataParallel`` wrapper — DDP assumes that every rank runs the same graph
— and with explicit gradient reductions that :class:`~mtssl_lightning.MultiTaskSSL` drives
(``R_t`` = the ranks of task ``t``):

* ``combine: concurrent`` (the paper's configs): every rank computes its tasks' forward and
  backward at the same parameters, at the same time; the gradients go into per-task slots
  (trunk + the task's head / lasso weights, × 1/|R_t|, zeros for tasks the rank does not run)
  and one bucketed SUM all-reduce, overlapped with backward, gives every rank every task's mean
  gradient (:mod:`mtssl_lightning.distributed.gradient_slots`). Every rank then steps the task
  optimizers in turn, each with its own gradient: the synchronous equivalent of the paper's
  asynchronous workers, and exactly what ``concurrent`` computes on one device.
* ``combine: sum``: each rank's loss is ``Σ_t w_t · loss_t / |R_t|`` over its tasks; one SUM
  all-reduce of all gradients makes the trunk's ``Σ_t mean_{r ∈ R_t} ∇ w_t loss_t`` and each
  head's the mean over its task's ranks — plain DDP's update on the same per-task batches.
* ``combine: alternate``: every rank walks through every task of the step in the same order; for
  task ``t`` its optimizer's gradient is averaged over ``R_t`` (the others contribute zeros) and
  every rank takes the same step. Task t's gradient is taken after task t−1's update, so the
  ranks take turns: the ranks of other tasks wait. Use ``concurrent`` for speed.

Communication per step (elements; × the gradients' dtype size): ``concurrent`` and ``alternate``
``T · P_trunk + Σ_t P_head(t)``, ``sum`` ``P_trunk + Σ_t P_head(t)`` (as DDP); plus one float64
all-reduce of all buffers and a ``T``-float all-reduce of the task losses.

Every rank applies identical updates to *every* parameter and keeps identical optimizer states
— the trunk stays identical on all ranks, and rank 0's checkpoint is complete even for heads it
does not train. (Reducing each head over a process group of its task's ranks would save
bandwidth on heads but leave the other ranks' copies stale.) After each training batch, one
float64 all-reduce averages the trunk's floating buffers (BatchNorm running statistics) over all
ranks, copies its counters from rank 0 and each task's buffers from the first rank that runs it.

``trainer.strategy: ddp_find_unused_parameters_true`` gives plain DDP (all ranks, all tasks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor

from mtssl_lightning.distributed.gradient_slots import DEFAULT_BUCKET_BYTES, GradientSlots
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
        bucket_bytes: the largest gradient bucket of one all-reduce (DDP's default, 25 MiB).
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (e.g.
            ``start_method``, ``process_group_backend``, ``timeout``).
    """

    strategy_name = "task_parallel"

    def __init__(self, task_ranks: dict[str, list[int]], bucket_bytes: int = DEFAULT_BUCKET_BYTES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bucket_bytes = bucket_bytes
        self._slots: dict[tuple[tuple[str, ...], tuple[str, ...]], GradientSlots] = {}
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
        if self._distributed():
            broadcast_flat([*module.parameters(), *module.buffers()], src=0)

    # ------------------------------------------------------------ reductions
    def task_scale(self, name: str) -> float:
        """``1 / |ranks of task name|``: a rank's share of the task's mean gradient."""
        return 1.0 / len(self.ranks_of_task(name))

    def task_slots(self, module: TaskModules, slots: Sequence[str], own: Sequence[str]) -> GradientSlots:
        """The (cached) :class:`~mtssl_lightning.distributed.gradient_slots.GradientSlots` with one
        slot per name in ``slots`` over the shared modules, and the own parameters of ``own``."""
        key = (tuple(slots), tuple(own))
        if key not in self._slots:
            shared = [p for m in module.shared_modules() for p in m.parameters()]
            owned = {name: [p for m in module.task_modules(name) for p in m.parameters()] for name in own}
            self._slots[key] = GradientSlots(shared, owned, slots, self.bucket_bytes)
        return self._slots[key]

    def reduce_task_gradients(self, module: TaskModules, task: str | None) -> None:
        """After a backward pass, make every rank hold the gradients the update needs.

        ``task`` given (``alternate``): the gradient of task's optimizer (trunk, head, lasso
        weights) averaged over the task's ranks; ``None`` (``sum``, whose loss the module scaled
        by :meth:`task_scale` per task): every gradient summed over all ranks. Either way one
        bucketed SUM all-reduce, in which ranks without a gradient contribute zeros.
        """
        if not self._distributed():
            return
        names = module.task_names() if task is None else [task]
        slots = self.task_slots(module, ["all" if task is None else task], names)
        slots.begin()
        local = [n for n in names if self.global_rank in self.ranks_of_task(n)]
        if local:
            slots.add(slots.slots[0], local, 1.0 if task is None else self.task_scale(task))
        slots.finish()
        slots.assign(slots.slots[0], names)

    def task_means(self, values: dict[str, Tensor], tasks: Sequence[str], width: int = 1) -> dict[str, Tensor]:
        """``{task: mean over its ranks of values[task]}`` for every task in ``tasks``, on every rank.

        ``values`` holds this rank's ``(width,)`` float tensors for its tasks (a rank may hold none);
        one all-reduce of a ``(len(tasks), width)`` float32 tensor. A NaN or inf on any rank stays
        in the mean, so the mean of a loss also says whether it was finite on every rank.
        """
        table = torch.zeros(len(tasks), width, dtype=torch.float32, device=self.root_device)
        for i, name in enumerate(tasks):
            if name in values:
                table[i] = values[name].float() * self.task_scale(name)
        if self._distributed():
            dist.all_reduce(table, op=dist.ReduceOp.SUM)
        return {name: table[i] for i, name in enumerate(tasks)}

    def sync_buffers(self, module: TaskModules) -> None:
        """One float64 all-reduce: the trunk's floating buffers averaged over all ranks, its
        counters (``num_batches_tracked``) rank 0's, each task's buffers those of its first rank."""
        if not self._distributed():
            return
        rank, contributions = self.global_rank, []
        for b in (b for m in module.shared_modules() for b in m.buffers()):
            share = 1.0 / self.world_size if b.is_floating_point() else float(rank == 0)
            contributions.append((b, share))
        for name in module.task_names():
            first = float(rank == self.ranks_of_task(name)[0])
            contributions += [(b, first) for m in module.task_modules(name) for b in m.buffers()]
        if not contributions:
            return
        # float64 holds int64 counters exactly up to 2**53 and float32 statistics exactly
        # (a rank that does not contribute sends zeros, not 0 × value: a NaN there must not leak in)
        flat = torch.cat([
            b.detach().reshape(-1).to(torch.float64) * share if share else torch.zeros(b.numel(), dtype=torch.float64, device=b.device)
            for b, share in contributions
        ])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for b, _ in contributions:
            b.copy_(flat[offset : offset + b.numel()].view_as(b).to(b.dtype))
            offset += b.numel()

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1
