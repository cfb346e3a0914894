"""One optimizer per task: how a training step applies the tasks' updates (``combine``).

The paper gave every task its own RMSProp over the shared trunk and that task's head, so tasks
need no loss weights. Two ways to run such optimizers in a synchronous step:

* ``alternate`` — for each task in turn: its forward and backward at the *current* parameters,
  then its optimizer's update. Task k's gradient is taken after task k−1's update (like a
  Gauss-Seidel sweep); on one device it needs one task's activations in memory at a time.
* ``concurrent`` — every task's forward and backward at the *same* parameters (the step's start),
  then the tasks' updates applied in turn, each with its own gradient (a Jacobi sweep). This is
  the synchronous equivalent of the paper's asynchronous workers: under a task-parallel strategy
  each rank computes its tasks' gradients at the same time as the others, one reduction brings
  every task's gradient to every rank, and every rank applies the same updates — and a one-device
  run trains exactly the same thing.

Every optimizer's LR scheduler steps once every training step, whether its task ran or not
(``task_ratios``): schedules follow training steps, as the paper's asynchronous workers shared one
global step. ``trainer.global_step`` counts batches, not task updates. Each update is a guarded
transaction (:mod:`mtssl_lightning.nonfinite`): a non-finite loss leaves no trace, without a host
sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["Combine", "TaskStepping", "check_combine_options", "runs_at"]

Combine = Literal["sum", "alternate", "concurrent"]


def check_combine_options(
    combine: str, task_ratios: dict[str, float] | None, gradient_clip_val: float | None, tasks: list[str]
) -> tuple[Combine, dict[str, float]]:
    """Validate ``combine``, ``task_ratios`` and ``gradient_clip_val``; returns ``(combine, task_ratios)``."""
    if combine not in ("sum", "alternate", "concurrent"):
        raise ValueError(f"`combine` must be 'sum', 'alternate' or 'concurrent', got {combine!r}")
    ratios = dict(task_ratios or {})
    unknown = sorted(set(ratios) - set(tasks))
    if unknown:
        raise ValueError(f"`task_ratios` names unknown task(s) {unknown}; the tasks are {sorted(tasks)}")
    if ratios and combine == "sum":
        raise ValueError("`task_ratios` needs one optimizer per task (`combine: alternate` or `concurrent`); in sum mode use each task's `loss_weight`")
    bad = {k: v for k, v in ratios.items() if not 0.0 < v <= 1.0}
    if bad:
        raise ValueError(f"`task_ratios` must be in (0, 1], got {bad}")
    if ratios and all(ratios.get(name, 1.0) < 1.0 for name in tasks):
        raise ValueError(
            "`task_ratios`: at least one task must run every step (ratio 1, or not listed), so that "
            "every training batch counts as one step"
        )
    if gradient_clip_val is not None and gradient_clip_val <= 0:
        raise ValueError(f"`gradient_clip_val` must be positive or null, got {gradient_clip_val}")
    return combine, ratios  # type: ignore[return-value]


def runs_at(ratio: float, step: int) -> bool:
    """Whether a task with ``task_ratios`` share ``ratio`` runs at training step ``step``."""
    return math.floor((step + 1) * ratio) > math.floor(step * ratio)


class TaskStepping:
    """Mixin of :class:`~mtssl_lightning.MultiTaskSSL`: the training step with one optimizer per task.

    It uses the module's ``tasks``, ``task_ratios``, ``combine``, ``gradient_clip_val``, ``guard``,
    ``task_loss``, ``penalty``, ``agreed``, ``grad_norm_due``, ``log_trunk_grad_norm``,
    ``log_untrained_metrics``, ``task_modules``, ``shared_modules``, ``sync_task_gradients`` and
    Lightning's manual-optimization API.
    """

    def runs_at(self, name: str, step: int) -> bool:
        """Whether task ``name`` runs at training step ``step`` (``task_ratios``)."""
        return runs_at(self.task_ratios.get(name, 1.0), step)  # type: ignore[attr-defined]

    def _optimizers_and_schedulers(self) -> tuple[list[Any], list[Any]]:
        optimizers = self.optimizers()  # type: ignore[attr-defined]
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()  # type: ignore[attr-defined]
        schedulers = [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]
        return optimizers, schedulers

    def _update_task(self, optimizer: Any, last: bool) -> None:
        """Clip and step one task's optimizer; only the step's last update advances ``global_step``."""
        if self.gradient_clip_val is not None:  # type: ignore[attr-defined]
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")  # type: ignore[attr-defined]
        if last:
            optimizer.step()  # the LightningOptimizer: counts one trainer.global_step per batch
        else:
            # the same precision-aware step without advancing global_step, so that max_steps,
            # checkpoint intervals and loggers count batches, not task updates
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)  # type: ignore[attr-defined]

    def per_task_step(self, batch: dict[str, Any], names: list[str]) -> None:
        """One training step with one optimizer per task (``alternate`` or ``concurrent``; see the module docstring)."""
        optimizers, schedulers = self._optimizers_and_schedulers()
        order = list(self.tasks)  # type: ignore[attr-defined]
        step = self._train_steps  # type: ignore[attr-defined]
        # under a task-parallel strategy every rank walks through every task (the gradient
        # reduction is collective); a rank that does not run a task contributes no gradient
        walk = order if self._task_parallel is not None else names  # type: ignore[attr-defined]
        running = [n for n in walk if self.runs_at(n, step)]
        by_task = {name: optimizers[order.index(name)] for name in running}
        if self.combine == "concurrent":  # type: ignore[attr-defined]
            self._concurrent_step(batch, names, running, by_task, step)
        else:
            self._alternate_step(batch, names, running, by_task, step)
        for scheduler in schedulers:  # schedules follow training steps, whether the task ran or not
            scheduler.step()
        self._train_steps += 1  # type: ignore[attr-defined]

    def _task_backward(self, name: str, batch: dict[str, Any], names: list[str]) -> Tensor:
        """Task ``name``'s loss and backward on this rank (nothing when the rank does not run it),
        then the strategy's reduction; returns whether its loss was finite on every rank (0-d
        bool on the device). Under a task-parallel strategy the loss logged is its mean over the
        task's ranks (the same number on every rank)."""
        parallel = self._task_parallel  # type: ignore[attr-defined]
        loss = None
        if name in names and batch.get(name) is not None:
            loss = self.task_loss(name, batch[name], "train", log_loss=parallel is None)  # type: ignore[attr-defined]
            self.manual_backward(self._with_penalty(name, loss))  # type: ignore[attr-defined]
        else:
            self.log_untrained_metrics(name)  # type: ignore[attr-defined]
        self.sync_task_gradients(name)  # type: ignore[attr-defined]
        if self.grad_norm_due():  # after the reduction: the task's mean gradient, the same on every rank
            self.log_trunk_grad_norm(name, [p.grad for p in self.trunk.parameters()])  # type: ignore[attr-defined]
        if parallel is None:
            return torch.isfinite(loss.detach()) if loss is not None else torch.ones((), dtype=torch.bool, device=self.device)  # type: ignore[attr-defined]
        return torch.isfinite(self.log_task_means({name: loss} if loss is not None else {}, [name])[name])

    def _with_penalty(self, name: str, loss: Tensor) -> Tensor:
        penalty = self.penalty([name])  # type: ignore[attr-defined]
        return loss if penalty is None else loss + penalty

    def log_task_means(self, losses: dict[str, Tensor], tasks: list[str], norms: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Under a task-parallel strategy: log ``train/<task>/loss`` (and ``grad_norm/<task>`` from
        ``norms``) for every one of ``tasks`` as the mean over the task's ranks — one small
        all-reduce; every rank logs the same numbers, so rank 0's logger shows every task.
        Returns ``{task: mean loss}`` (0-d; non-finite if it was on any rank)."""
        strategy = self._task_parallel  # type: ignore[attr-defined]
        width = 1 if norms is None else 2
        values = {n: torch.stack([loss.detach().float(), *([norms[n].float()] if norms is not None else [])]) for n, loss in losses.items()}
        means = strategy.task_means(values, tasks, width)
        for name in tasks:
            self.log(f"train/{name}/loss", means[name][0], batch_size=1, on_step=True, on_epoch=True)  # type: ignore[attr-defined]
            if norms is not None and self.grad_norm_due():  # type: ignore[attr-defined]
                self.log(f"grad_norm/{name}", means[name][1], on_step=True, on_epoch=False, batch_size=1)  # type: ignore[attr-defined]
        return {name: means[name][0] for name in tasks}

    def trunk_grad_norm(self, weighted: Tensor) -> Tensor:
        """‖∂ weighted / ∂ trunk‖ by an extra backward pass (sum mode; the graph is kept for the real one)."""
        trunk = list(self.trunk.parameters())  # type: ignore[attr-defined]
        grads = torch.autograd.grad(weighted, trunk, retain_graph=True, allow_unused=True)
        return torch.nn.utils.get_total_norm([g.detach() for g in grads if g is not None])

    def parallel_sum_loss(self, batch: dict[str, Any], names: list[str]) -> Tensor:
        """Sum mode under a task-parallel strategy: this rank's ``Σ_t (w_t loss_t + penalty_t) / |R_t|``
        over its tasks, so that one SUM all-reduce of the gradients gives the trunk
        ``Σ_t mean_{r ∈ R_t} ∇(w_t loss_t)`` — plain DDP's gradient on the same per-task batches —
        and each head its mean over its task's ranks. Logs every task's loss (and trunk gradient
        norm, when due) averaged over its ranks; sets ``_finite`` (every task finite everywhere)."""
        strategy = self._task_parallel  # type: ignore[attr-defined]
        total, losses, norms = None, {}, {}
        norm_due = self.grad_norm_due() and not self.compile_trunk  # type: ignore[attr-defined]
        for name, task in self.tasks.items():  # type: ignore[attr-defined]
            if name not in names or batch.get(name) is None:
                self.log_untrained_metrics(name)  # type: ignore[attr-defined]
                continue
            losses[name] = self.task_loss(name, batch[name], "train", log_loss=False)  # type: ignore[attr-defined]
            weighted = self._with_penalty(name, task.loss_weight * losses[name])
            norms[name] = self.trunk_grad_norm(weighted) if norm_due else torch.zeros((), device=weighted.device)
            scaled = weighted * strategy.task_scale(name)
            total = scaled if total is None else total + scaled
        assert total is not None, "a task-parallel rank with no task sub-batch"
        means = self.log_task_means(losses, list(self.tasks), norms if norm_due else None)  # type: ignore[attr-defined]
        summed = sum(task.loss_weight * means[name] for name, task in self.tasks.items())  # type: ignore[attr-defined]
        self.log("train/loss", summed, batch_size=1, on_step=True, on_epoch=True)  # type: ignore[attr-defined]
        self._finite = torch.isfinite(torch.stack(list(means.values()))).all()
        return total

    def _alternate_step(self, batch: dict[str, Any], names: list[str], running: list[str], by_task: dict[str, Any], step: int) -> None:
        guard = self.guard  # type: ignore[attr-defined]
        whole_step = guard.mode == "stop"  # a failing task k undoes tasks 1..k-1 of the step too
        modules = [*self.shared_modules(), *(m for n in running for m in self.task_modules(n))]  # type: ignore[attr-defined]
        snapshot = guard.begin([o.optimizer for o in by_task.values()], modules) if whole_step else None
        all_finite = None
        for name in running:
            optimizer = by_task[name]
            own = None if whole_step else guard.begin([optimizer.optimizer], [*self.shared_modules(), *self.task_modules(name)])  # type: ignore[attr-defined]
            optimizer.zero_grad(set_to_none=True)
            finite = self._task_backward(name, batch, names)
            self._update_task(optimizer, last=name == running[-1])
            if whole_step:
                all_finite = finite if all_finite is None else all_finite & finite
            else:
                guard.settle(own, finite, step)
        if whole_step and all_finite is not None:
            guard.settle(snapshot, all_finite, step)

    def _concurrent_step(self, batch: dict[str, Any], names: list[str], running: list[str], by_task: dict[str, Any], step: int) -> None:
        guard = self.guard  # type: ignore[attr-defined]
        modules = [*self.shared_modules(), *(m for n in running for m in self.task_modules(n))]  # type: ignore[attr-defined]
        whole_step = guard.mode == "stop"
        # the forward passes change BatchNorm statistics before any update: kept (or undone) as one
        snapshot = guard.begin([o.optimizer for o in by_task.values()] if whole_step else [], modules)
        for name in running:
            for p in self.task_parameters(name):  # type: ignore[attr-defined]
                p.grad = None
        if self._task_parallel is not None:  # type: ignore[attr-defined]
            assign, finites = self._parallel_gradients(batch, names, running)
        else:
            assign, finites = self._local_gradients(batch, names, running)
        all_finite = None
        for name in running:  # then the updates, in turn, each with its own gradient
            optimizer = by_task[name]
            assign(name)
            own = None if whole_step else guard.begin([optimizer.optimizer], [])
            self._update_task(optimizer, last=name == running[-1])
            if not whole_step:
                guard.settle(own, finites[name], step)
            all_finite = finites[name] if all_finite is None else all_finite & finites[name]
        if all_finite is not None:
            # stop mode: the whole step; skip mode: the statistics of a step with any failing task
            guard.settle(snapshot, all_finite, step, count=whole_step)

    def _local_gradients(self, batch: dict[str, Any], names: list[str], running: list[str]) -> tuple[Callable[[str], None], dict[str, Tensor]]:
        """One process: every running task's gradient at the step's parameters, kept aside;
        returns ``(put task t's gradient into .grad, {task: finite})``."""
        gradients: dict[str, list[Tensor | None]] = {}
        finites: dict[str, Tensor] = {}
        for name in running:
            params = self.task_parameters(name)  # type: ignore[attr-defined]
            finites[name] = self._task_backward(name, batch, names)
            gradients[name] = [p.grad for p in params]
            for p in params:
                p.grad = None

        def assign(name: str) -> None:
            for p, g in zip(self.task_parameters(name), gradients[name]):  # type: ignore[attr-defined]
                p.grad = g

        return assign, finites

    def _parallel_gradients(self, batch: dict[str, Any], names: list[str], running: list[str]) -> tuple[Callable[[str], None], dict[str, Tensor]]:
        """Task-parallel ranks: this rank's tasks' backward passes, with no collective in between
        (all ranks compute at once), their gradients (× 1/|R_t|) moved into per-task slots as
        backward produces them and the slots' bucketed all-reduce started meanwhile; then one small
        all-reduce of the losses. Returns ``(put task t's mean gradient into .grad, {task: finite})``."""
        strategy = self._task_parallel  # type: ignore[attr-defined]
        slots = strategy.task_slots(self, running, running)
        slots.begin()
        local = [n for n in running if n in names and batch.get(n) is not None]
        losses = {}
        for name in running:  # in task order: the metrics' end-of-epoch syncs follow the order they were logged in
            if name not in local:
                self.log_untrained_metrics(name)  # type: ignore[attr-defined]
                continue
            with slots.collect(name, [name], strategy.task_scale(name), launch=name == local[-1]):
                losses[name] = self.task_loss(name, batch[name], "train", log_loss=False)  # type: ignore[attr-defined]
                self.manual_backward(self._with_penalty(name, losses[name]))  # type: ignore[attr-defined]
        slots.finish()
        means = self.log_task_means(losses, running)
        if self.grad_norm_due():  # type: ignore[attr-defined]
            for name in running:  # the norm of the task's mean gradient, the one its optimizer applies
                self.log_trunk_grad_norm(name, slots.shared_gradient(name))  # type: ignore[attr-defined]
        return (lambda name: slots.assign(name, [name])), {name: torch.isfinite(means[name]) for name in running}
