"""``MultiTaskSSL``: the shared trunk plus a dictionary of self-supervised tasks.

One training step: every task receives its own ready batch (inputs and targets, built on the
device by the task's sampler in the DataModule's ``on_after_batch_transfer``), the shared trunk
embeds it, the task reads the block-3 output ("naive") or its own lasso mix of block 3's units,
its head and loss run, and per-task losses and metrics are logged under ``{stage}/{task}/…``.
Two ways to combine tasks:

* ``combine: sum`` — the step's loss is ``Σ_t loss_weight_t · loss_t`` (+ the lasso penalty),
  one optimizer;
* ``combine: alternate`` — the paper's scheme: one optimizer per task over the trunk, that
  task's head and lasso weights, stepped in turn within every training step (manual
  optimization), each with its own LR schedule and gradient clipping; tasks need no loss
  weights. ``task_ratios`` runs a task on only a share of the steps.

Under a task-parallel strategy (:class:`~mtssl_lightning.interfaces.TaskParallel`, e.g.
:class:`~mtssl_lightning.distributed.TaskParallelStrategy`) each rank trains only its tasks
(``active_tasks``) and the strategy averages gradients (trunk over all ranks, a head over its
task's ranks) after every backward pass; the module offers it its shared and per-task modules
(:class:`~mtssl_lightning.interfaces.TaskModules`). Single-task training is the same module with
one task.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from mtssl_lightning.data.batch import TaskBatch
from mtssl_lightning.interfaces import TaskParallel, tasks_of_rank
from mtssl_lightning.tasks.base import Task, TaskSampler
from mtssl_lightning.trunks import ResNetV2, Trunk
from mtssl_lightning.trunks.base import apply_speed_options
from mtssl_lightning.trunks.lasso import LassoInit, UnitMixer

log = logging.getLogger(__name__)

STAGES = ("train", "val")
Mixing = Literal["naive", "lasso"]
Combine = Literal["sum", "alternate"]
NonFinite = Literal["skip", "stop"]


class MultiTaskSSL(pl.LightningModule):
    """Multi-task self-supervised pretraining of one shared trunk.

    Args:
        tasks: ``{name: task}``; names become log prefixes (``train/<name>/loss``) and must be
            Python identifiers. Each task's head is created here for the trunk's output.
        trunk: the shared trunk (default: ResNet-v2-101 cut after block 3, as in the paper).
        optimizer: builds an optimizer from parameters (default: RMSProp, lr 1e-3, the paper's
            optimizer family; the paper's exact settings are not published). With
            ``combine: alternate`` it is called once per task.
        lr_scheduler: optional; stepped every training step (per optimizer).
        pixel_scale: multiplies every task's pixel sizes (crop size, patch size, gap, …) before
            the heads are built; ``configs/tiny.yaml`` uses 0.25 to shrink any experiment.
        mixing: ``"naive"`` (every head reads the block-3 output) or ``"lasso"`` (each task
            reads ``BN+ReLU(Σ_u α[task, u] · unit_u)`` over block 3's units, see
            :mod:`mtssl_lightning.trunks.lasso`).
        lasso_penalty: λ of the L1 penalty ``λ Σ_u |α[task, u]|`` added to each task's loss.
        lasso_init: ``"last"`` (α one-hot on the last unit) or ``"uniform"``.
        combine: ``"sum"`` (weighted sum of task losses, one optimizer) or ``"alternate"``
            (one optimizer per task, stepped in turn; the paper's scheme).
        task_ratios: ``{task: r}`` with r in (0, 1]: in alternate mode a task runs on a share r
            of the steps (deterministically: at step s when ``⌊(s+1)·r⌋ > ⌊s·r⌋``); others every step.
        gradient_clip_val: alternate mode: clip each task's gradient norm to this before its
            optimizer steps (in sum mode use the Trainer's ``gradient_clip_val``).
        channels_last: on CUDA, run the trunk in channels-last memory format (ignored on CPU).
        compile: on CUDA, ``torch.compile`` the trunk in place (``nn.Module.compile``, keeps
            the checkpoint keys; ignored on CPU, where compilation costs more than it saves).
        nonfinite: what to do when a training loss is NaN or infinite (checked every step, across
            all ranks): ``"skip"`` the update with a warning (counted in ``train/nonfinite_skipped``;
            in alternate mode only that task's update) or ``"stop"``: save the weights from before
            the step to ``<default_root_dir>/nonfinite-last-good.ckpt`` and raise ``FloatingPointError``.
        grad_norm_every_n_steps: every that many training steps, log ``grad_norm/<task>``: the
            norm of each task's (weighted) loss gradient on the shared trunk, this rank's. In
            alternate mode it is read after the task's backward (free); in sum mode it costs one
            extra backward pass per task on those steps. 0 = never.
    """

    def __init__(
        self,
        tasks: dict[str, Task],
        trunk: Trunk | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        pixel_scale: float = 1.0,
        mixing: Mixing = "naive",
        lasso_penalty: float = 1e-3,
        lasso_init: LassoInit = "last",
        combine: Combine = "sum",
        task_ratios: dict[str, float] | None = None,
        gradient_clip_val: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
        nonfinite: NonFinite = "skip",
        grad_norm_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError(
                "`model.tasks` is empty: configure at least one task, e.g. "
                "`rp: {class_path: mtssl_lightning.tasks.RelativePosition}`"
            )
        for name in tasks:
            if not name.isidentifier():
                raise ValueError(f"task name {name!r} must be a Python identifier (letters, digits, _)")
        if mixing not in ("naive", "lasso"):
            raise ValueError(f"`mixing` must be 'naive' or 'lasso', got {mixing!r}")
        if combine not in ("sum", "alternate"):
            raise ValueError(f"`combine` must be 'sum' or 'alternate', got {combine!r}")
        if lasso_penalty < 0:
            raise ValueError(f"`lasso_penalty` must be >= 0, got {lasso_penalty}")
        task_ratios = dict(task_ratios or {})
        unknown = sorted(set(task_ratios) - set(tasks))
        if unknown:
            raise ValueError(f"`task_ratios` names unknown task(s) {unknown}; the tasks are {sorted(tasks)}")
        if task_ratios and combine != "alternate":
            raise ValueError("`task_ratios` needs `combine: alternate` (in sum mode use each task's `loss_weight`)")
        bad = {k: v for k, v in task_ratios.items() if not 0.0 < v <= 1.0}
        if bad:
            raise ValueError(f"`task_ratios` must be in (0, 1], got {bad}")
        if task_ratios and all(task_ratios.get(name, 1.0) < 1.0 for name in tasks):
            raise ValueError(
                "`task_ratios`: at least one task must run every step (ratio 1, or not listed), so that "
                "every training batch counts as one step"
            )
        if nonfinite not in ("skip", "stop"):
            raise ValueError(f"`nonfinite` must be 'skip' or 'stop', got {nonfinite!r}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"`gradient_clip_val` must be positive or null, got {gradient_clip_val}")
        self.trunk = trunk if trunk is not None else ResNetV2()
        if pixel_scale <= 0:
            raise ValueError(f"`pixel_scale` must be positive, got {pixel_scale}")
        self.tasks = nn.ModuleDict(tasks)
        for task in self.tasks.values():
            if pixel_scale != 1.0:
                task.rescale(pixel_scale)
            task.attach(self.trunk.out_channels, self.trunk.out_stride)
        self.mixing, self.lasso_penalty = mixing, lasso_penalty
        self.mixers = nn.ModuleDict(
            {name: UnitMixer(self.trunk.num_units, self.trunk.out_channels, lasso_init) for name in tasks}
            if mixing == "lasso"
            else {}
        )
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": task.make_metrics().clone(prefix=f"{stage}/{name}/")
                for stage in STAGES
                for name, task in self.tasks.items()
            }
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.combine, self.task_ratios, self.gradient_clip_val = combine, task_ratios, gradient_clip_val
        self.channels_last, self.compile_trunk = channels_last, compile
        self.nonfinite = nonfinite
        self._nonfinite_skipped = 0
        self._skipped_files = 0  # images/videos the workers found undecodable (this rank, whole run)
        if grad_norm_every_n_steps < 0:
            raise ValueError(f"`grad_norm_every_n_steps` must be >= 0, got {grad_norm_every_n_steps}")
        self.grad_norm_every_n_steps = grad_norm_every_n_steps
        #: images (or clips) the last training batch was built from, over all tasks (read by TrainingDashboard)
        self.last_batch_samples = 0
        self.automatic_optimization = combine == "sum"
        self._train_steps = 0  # training batches done (saved in checkpoints; drives task_ratios)

    # ---------------------------------------------- what the DataModule and strategy ask
    def task_samplers(self) -> dict[str, TaskSampler]:
        """``{task: sampler}`` in task order, for the DataModule (:class:`~mtssl_lightning.data.sampler.TaskSamplerProvider`)."""
        return {name: task.sampler for name, task in self.tasks.items()}

    def task_names(self) -> list[str]:
        """The tasks, in the order they are stepped and logged (:class:`~mtssl_lightning.interfaces.TaskModules`)."""
        return list(self.tasks)

    def shared_modules(self) -> list[nn.Module]:
        """What every task trains: the trunk (:class:`~mtssl_lightning.interfaces.TaskModules`)."""
        return [self.trunk]

    def task_modules(self, name: str) -> list[nn.Module]:
        """What belongs to task ``name`` alone: the task (its head) and, in lasso mode, its mixer."""
        return [self.tasks[name], self.mixers[name]] if self.mixing == "lasso" else [self.tasks[name]]

    @property
    def _task_parallel(self) -> TaskParallel | None:
        """The trainer's strategy when it is task-parallel, else ``None``."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy if isinstance(strategy, TaskParallel) else None

    def active_tasks(self) -> list[str]:
        """The tasks this process trains: all, or under a task-parallel strategy this rank's."""
        if self._trainer is None:
            return list(self.tasks)
        return tasks_of_rank(self._trainer.strategy, self.global_rank, list(self.tasks))

    # ------------------------------------------------------------------- speed
    def on_fit_start(self) -> None:
        apply_speed_options(self.trunk, self.device, self.channels_last, self.compile_trunk)

    # ------------------------------------------------------------------- steps
    def task_forward(self, name: str, batch: TaskBatch) -> Tensor:
        """Trunk + (lasso mix) + head of task ``name`` on its batch; returns the task's predictions."""
        inputs = batch.inputs
        if self.channels_last and inputs.is_cuda:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        output = self.trunk(inputs)
        features = self.mixers[name](output.units) if self.mixing == "lasso" else output.features
        return self.tasks[name](features, batch)

    def _task_loss(self, name: str, sub: TaskBatch, stage: str) -> Tensor:
        """Forward, loss, logs and metric update of one task; returns its (unweighted) loss."""
        task = self.tasks[name]
        prediction = self.task_forward(name, sub)
        loss = task.loss(prediction, sub)
        size = sub.inputs.shape[0]
        self.log(f"{stage}/{name}/loss", loss, batch_size=size, prog_bar=True, on_step=stage == "train", on_epoch=True)
        metrics = self.metrics[f"{stage}_{name}"]
        metrics.update(*task.metric_inputs(prediction.detach(), sub))
        self.log_dict(metrics, batch_size=size, on_step=False, on_epoch=True)
        return loss

    def _penalty(self, names: list[str]) -> Tensor | None:
        """``λ Σ_t Σ_u |α[t, u]|`` over the tasks ``names`` (lasso mode), else ``None``."""
        if self.mixing != "lasso" or self.lasso_penalty == 0:
            return None
        return self.lasso_penalty * sum(self.mixers[name].penalty() for name in names)

    def _grad_norm_due(self) -> bool:
        return self.grad_norm_every_n_steps > 0 and self._train_steps % self.grad_norm_every_n_steps == 0

    def _log_trunk_grad_norm(self, name: str, grads: Iterable[Tensor | None]) -> None:
        """Log ``grad_norm/<name>``: the L2 norm over all trunk parameters of one task's gradient."""
        present = [g.detach() for g in grads if g is not None]
        if present:
            self.log(f"grad_norm/{name}", torch.nn.utils.get_total_norm(present), on_step=True, on_epoch=False, batch_size=1)

    def _log_alpha(self) -> None:
        for name, mixer in self.mixers.items():
            self.log_dict({f"lasso/{name}/alpha_{u:02d}": a for u, a in enumerate(mixer.alpha.detach())}, on_step=True, on_epoch=False)

    def _shared_step(self, batch: dict[str, TaskBatch | None], stage: str, names: list[str] | None = None) -> Tensor:
        total: Tensor | None = None
        for name in self.tasks:
            if names is not None and name not in names:
                self._log_untrained_metrics(name)
                continue
            sub = batch.get(name)
            if sub is None:  # this task's validation loader is exhausted
                continue
            weighted = self.tasks[name].loss_weight * self._task_loss(name, sub, stage)
            if stage == "train" and self._grad_norm_due() and weighted.requires_grad:
                trunk = list(self.trunk.parameters())
                self._log_trunk_grad_norm(name, torch.autograd.grad(weighted, trunk, retain_graph=True, allow_unused=True))
            total = weighted if total is None else total + weighted
        assert total is not None, "a batch with no task sub-batch"
        self.log(f"{stage}/loss", total, batch_size=1, on_step=stage == "train", on_epoch=True)
        return total

    def _check_finite(self, loss: Tensor | None, what: str) -> bool:
        """Whether ``loss`` is finite on every rank (one host sync and, distributed, one collective);
        otherwise handle it per ``nonfinite``. ``None`` (a task this rank does not run) counts as finite."""
        finite = loss is None or bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None:
            finite = bool(self._trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            return True
        if self.nonfinite == "stop":
            path = Path(self.trainer.default_root_dir) / "nonfinite-last-good.ckpt"
            self.trainer.save_checkpoint(path)
            raise FloatingPointError(
                f"non-finite {what} loss at training step {self._train_steps}; the weights from before this step "
                f"are saved in {path}. Lower the learning rate, set `model.gradient_clip_val` (alternate mode) or "
                "`trainer.gradient_clip_val` (sum mode), or set `model.nonfinite: skip`."
            )
        self._nonfinite_skipped += 1
        warnings.warn(
            f"non-finite {what} loss at training step {self._train_steps}: update skipped "
            f"({self._nonfinite_skipped} so far)",
            stacklevel=2,
        )
        self.log("train/nonfinite_skipped", float(self._nonfinite_skipped), on_step=True, on_epoch=False, batch_size=1)
        return False

    def _log_untrained_metrics(self, name: str) -> None:
        """Log task ``name``'s training metrics without updating them (a rank that does not train it).

        Metrics are synchronised across ranks when they are computed at the end of an epoch, in
        the order they were first logged: every rank must log every task's metrics, in task order.
        """
        self.log_dict(self.metrics[f"train_{name}"], on_step=False, on_epoch=True, batch_size=1)

    def runs_at(self, name: str, step: int) -> bool:
        """Whether task ``name`` runs at training step ``step`` (``task_ratios``, alternate mode)."""
        ratio = self.task_ratios.get(name, 1.0)
        return math.floor((step + 1) * ratio) > math.floor(step * ratio)

    def training_step(self, batch: dict[str, TaskBatch | None], batch_idx: int) -> Tensor | None:
        names = self.active_tasks()
        present = {name: sub for name, sub in batch.items() if sub is not None}
        self._skipped_files += sum(sub.skipped for sub in present.values())
        self.last_batch_samples = sum(sub.samples for sub in present.values())
        for name, sub in present.items():  # state that belongs to the loss (colorization's bin prior)
            self.tasks[name].observe(sub)
        # a plain number, no collective: files skipped by this rank's workers so far (warned about each)
        self.log("train/skipped_files", float(self._skipped_files), on_step=True, on_epoch=False, batch_size=1)
        if self.mixing == "lasso":
            self._log_alpha()
        if self.combine == "sum":
            loss = self._shared_step(batch, "train", names)
            penalty = self._penalty(names)
            loss = loss if penalty is None else loss + penalty
            finite = self._check_finite(loss, "training")
            self._train_steps += 1
            return loss if finite else None  # None: Lightning skips backward and the step
        return self._alternate_step(batch, names)

    def _alternate_step(self, batch: dict[str, TaskBatch | None], names: list[str]) -> None:
        """One optimizer step per task, in turn: zero grad, the task's loss (+ its lasso
        penalty), backward, gradient sync (task-parallel), clipping, step, its scheduler."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()
        schedulers = [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]
        order = list(self.tasks)
        # under a task-parallel strategy every rank walks through every task (the gradient
        # reduction is collective); a rank that does not run a task contributes no gradient
        walk = order if self._task_parallel is not None else names
        running = [n for n in walk if self.runs_at(n, self._train_steps)]
        for name in running:
            index = order.index(name)
            optimizer = optimizers[index]
            optimizer.zero_grad(set_to_none=True)
            loss = None
            if name in names and batch.get(name) is not None:
                loss = self._task_loss(name, batch[name], "train")
                penalty = self._penalty([name])
                loss = loss if penalty is None else loss + penalty
            else:
                self._log_untrained_metrics(name)
            # collective decision (every rank walks the same tasks); a skipped task leaves all
            # gradients None, so its optimizer step below changes nothing
            if self._check_finite(loss, f"{name!r}"):
                if loss is not None:
                    self.manual_backward(loss)
                    if self._grad_norm_due():
                        self._log_trunk_grad_norm(name, [p.grad for p in self.trunk.parameters()])
                self.sync_task_gradients(name)
            if self.gradient_clip_val is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            if name == running[-1]:
                optimizer.step()  # the LightningOptimizer: counts one trainer.global_step per batch
            else:
                # the same precision-aware step without advancing global_step, so that max_steps,
                # checkpoint intervals and loggers count batches, not task updates
                self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)
            if schedulers:
                schedulers[index].step()
        self._train_steps += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._task_parallel is not None:
            self._task_parallel.sync_buffers(self)

    def on_after_backward(self) -> None:
        if self.automatic_optimization:
            self.sync_task_gradients(None)

    def sync_task_gradients(self, task: str | None) -> None:
        """Let a task-parallel strategy average the gradients of the last backward pass
        (``task`` = the task of that pass in alternate mode, ``None`` = all of this rank's tasks)."""
        if self._task_parallel is not None:
            self._task_parallel.reduce_task_gradients(self, task)

    def validation_step(self, batch: dict[str, TaskBatch | None], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, TaskBatch | None], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def predict_step(self, batch: dict[str, TaskBatch | None], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Each task's predictions on its validation-style inputs, ``{task: prediction}``."""
        return {name: self.task_forward(name, sub) for name, sub in batch.items() if sub is not None}

    # -------------------------------------------------------------- optimizers
    def task_parameters(self, name: str) -> list[nn.Parameter]:
        """Parameters one task's optimizer updates in alternate mode: trunk, its head, its lasso weights."""
        return [*self.trunk.parameters(), *(p for m in self.task_modules(name) for p in m.parameters())]

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            return torch.optim.RMSprop(params, lr=1e-3)
        return self.optimizer_factory(params)

    def configure_optimizers(self) -> Any:
        if self.combine == "sum":
            groups = [list(self.parameters())]
        else:
            groups = [self.task_parameters(name) for name in self.tasks]
        configs = []
        for params in groups:
            optimizer = self._make_optimizer(params)
            config: dict[str, Any] = {"optimizer": optimizer}
            if self.scheduler_factory is not None:
                config["lr_scheduler"] = {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}
            configs.append(config)
        if len(configs) == 1:
            return configs[0] if "lr_scheduler" in configs[0] else configs[0]["optimizer"]
        return configs

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain strings/numbers/tensors only, so checkpoints load with weights_only=True
        checkpoint["trunk_spec"] = self.trunk.spec()
        checkpoint["mtssl_train_steps"] = self._train_steps
        checkpoint["mtssl_skipped_files"] = self._skipped_files
        # RNG states, so that a resumed run draws the same crops and task samples as an
        # uninterrupted one (data order and task randomness come from torch's global RNG)
        checkpoint["mtssl_rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["mtssl_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._train_steps = int(checkpoint.get("mtssl_train_steps", 0))
        self._skipped_files = int(checkpoint.get("mtssl_skipped_files", 0))
        rng = checkpoint.get("mtssl_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
