"""``MultiTaskSSL``: the shared trunk plus a dictionary of self-supervised tasks.

One training step: every task receives its own ready batch (inputs and targets, built on the
device by the task's sampler in the DataModule's ``on_after_batch_transfer``), the shared trunk
embeds it, the task reads the block-3 output ("naive") or its own lasso mix of block 3's units,
its head and loss run (in float32 whatever the autocast state), and per-task losses and metrics
are logged under ``{stage}/{task}/…``. How tasks are combined (``combine``): ``sum`` — the step's
loss is ``Σ_t loss_weight_t · loss_t`` (+ the lasso penalty), one optimizer; ``alternate`` and
``concurrent`` — one optimizer per task (:mod:`mtssl_lightning.steps`).

A training step never makes the host wait for the device: non-finite losses are caught on the
device (:mod:`mtssl_lightning.nonfinite`), host numbers are logged from device scalars
(:mod:`mtssl_lightning.device_scalars`), and the values that must be read are read every
``check_every_n_steps`` steps only.

Under a task-parallel strategy (:class:`~mtssl_lightning.interfaces.TaskParallel`, e.g.
:class:`~mtssl_lightning.distributed.TaskParallelStrategy`) each rank trains only its tasks
(``active_tasks``); the module offers the strategy its shared and per-task modules
(:class:`~mtssl_lightning.interfaces.TaskModules`). Single-task training is the same module with
one task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from mtssl_lightning.checkpoint import load_run_state, save_run_state
from mtssl_lightning.data.batch import TaskBatch
from mtssl_lightning.device_scalars import DeviceScalars
from mtssl_lightning.interfaces import TaskParallel, tasks_of_rank
from mtssl_lightning.nonfinite import NonFinite, UpdateGuard
from mtssl_lightning.steps import Combine, TaskStepping, check_combine_options
from mtssl_lightning.tasks.base import Task, TaskSampler
from mtssl_lightning.trunks import ResNetV2, Trunk
from mtssl_lightning.trunks.base import apply_speed_options
from mtssl_lightning.trunks.lasso import LassoInit, UnitMixer

log = logging.getLogger(__name__)

STAGES = ("train", "val")
Mixing = Literal["naive", "lasso"]


class MultiTaskSSL(TaskStepping, pl.LightningModule):
    """Multi-task self-supervised pretraining of one shared trunk.

    Args:
        tasks: ``{name: task}``; names become log prefixes (``train/<name>/loss``) and must be
            Python identifiers. Each task's head is created here for the trunk's output.
        trunk: the shared trunk (default: ResNet-v2-101 cut after block 3, as in the paper).
        optimizer: builds an optimizer from parameters (default: RMSProp, lr 1e-3, the paper's
            optimizer family; the paper's exact settings are not published). With one optimizer
            per task it is called once per task.
        lr_scheduler: optional; one per optimizer, each stepped once every training step.
        pixel_scale: multiplies every task's pixel sizes (crop size, patch size, gap, …) before
            the heads are built; ``configs/tiny.yaml`` uses 0.25 to shrink any experiment.
        mixing: ``"naive"`` (every head reads the block-3 output) or ``"lasso"`` (each task
            reads its own mix of block 3's units, see :mod:`mtssl_lightning.trunks.lasso`).
        lasso_penalty: λ of the L1 penalty ``λ Σ_u |α[task, u]|`` added to each task's loss.
        lasso_init: ``"last"`` (α one-hot on the last unit) or ``"uniform"``.
        combine: ``"sum"`` (weighted sum of task losses, one optimizer), ``"alternate"`` (one
            optimizer per task, stepped in turn, each task's gradient taken after the previous
            task's update) or ``"concurrent"`` (one optimizer per task, every task's gradient at
            the same parameters, then the updates in turn: the synchronous form of the paper's
            asynchronous workers, the same on one device and on task-parallel ranks). See
            :mod:`mtssl_lightning.steps`.
        task_ratios: ``{task: r}`` with r in (0, 1]: with one optimizer per task, a task runs on a
            share r of the steps (deterministically: at step s when ``⌊(s+1)·r⌋ > ⌊s·r⌋``).
        gradient_clip_val: clip each optimizer's gradient norm to this before it steps (with one
            optimizer per task; in sum mode use the Trainer's ``gradient_clip_val``).
        channels_last: run the trunk in channels-last memory format (the inputs too).
        compile: ``torch.compile`` the trunk in place (``nn.Module.compile``, keeps the checkpoint
            keys). Both are applied in ``configure_model``, before a strategy wraps the model or the
            optimizers are made, on whatever device runs (the paper configs turn them on for GPUs;
            ``configs/tiny.yaml`` turns them off for the CPU).
        compile_options: keyword arguments of ``torch.compile`` (e.g. ``{mode: max-autotune}``, or
            ``{backend: aot_eager}``: Dynamo and AOTAutograd without Inductor's code generation,
            which takes many minutes on a CPU).
        nonfinite: a NaN or infinite training loss: ``"skip"`` its update (parameters, moment
            estimates and BatchNorm statistics stay as they were; with one optimizer per task only
            that task's update), ``"stop"`` (no update from the first one on; at the next check the
            weights from before it are saved to ``<default_root_dir>/nonfinite-last-good.ckpt`` and
            ``FloatingPointError`` is raised), or ``"ignore"``. Decided on the device, every step
            (:mod:`mtssl_lightning.nonfinite`); counted in ``train/nonfinite_skipped`` and warned
            about at the checks.
        check_every_n_steps: how often the host reads what the device counted (non-finite
            updates): one sync every that many training steps.
        grad_norm_every_n_steps: every that many training steps, log ``grad_norm/<task>``: the
            norm of each task's (weighted) loss gradient on the shared trunk (task-parallel: of its
            mean gradient with one optimizer per task, the mean of its ranks' norms in sum mode). With one
            optimizer per task it is read after the task's backward (free); in sum mode it costs
            one extra backward pass per task on those steps, and is not logged with ``compile``
            (a compiled backward frees its buffers, so the graph cannot be walked twice). 0 = never.
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
        compile_options: dict[str, Any] | None = None,
        nonfinite: NonFinite = "skip",
        check_every_n_steps: int = 50,
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
        if lasso_penalty < 0:
            raise ValueError(f"`lasso_penalty` must be >= 0, got {lasso_penalty}")
        if pixel_scale <= 0:
            raise ValueError(f"`pixel_scale` must be positive, got {pixel_scale}")
        if check_every_n_steps < 1 or grad_norm_every_n_steps < 0:
            raise ValueError(f"need `check_every_n_steps` >= 1 and `grad_norm_every_n_steps` >= 0, got {check_every_n_steps}, {grad_norm_every_n_steps}")
        self.combine, self.task_ratios = check_combine_options(combine, task_ratios, gradient_clip_val, list(tasks))
        self.gradient_clip_val = gradient_clip_val
        self.trunk = trunk if trunk is not None else ResNetV2()
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
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.channels_last, self.compile_trunk, self.compile_options = channels_last, compile, dict(compile_options or {})
        self._speed_options_applied = False
        self.guard = UpdateGuard(nonfinite)
        self.nonfinite: NonFinite = nonfinite
        self.check_every_n_steps, self.grad_norm_every_n_steps = check_every_n_steps, grad_norm_every_n_steps
        self._nonfinite_skipped = 0  # non-finite updates found so far (read at the checks)
        self._skipped_files = 0  # images/videos the workers found undecodable (this rank, whole run)
        self._host_scalars = DeviceScalars()
        #: images (or clips) the last training batch was built from, over all tasks (read by TrainingDashboard)
        self.last_batch_samples = 0
        self.automatic_optimization = self.combine == "sum"
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

    def task_parameters(self, name: str) -> list[nn.Parameter]:
        """Parameters one task's optimizer updates: trunk, its head, its lasso weights."""
        return [*self.trunk.parameters(), *(p for m in self.task_modules(name) for p in m.parameters())]

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
    def configure_model(self) -> None:
        """channels-last / ``torch.compile`` of the trunk, before a strategy wraps the model or the
        optimizers (and any resumed optimizer state) are made, so both see the final layout."""
        if not self._speed_options_applied:
            apply_speed_options(self.trunk, self.channels_last, self.compile_trunk, self.compile_options)
            self._speed_options_applied = True

    # ------------------------------------------------------------------- steps
    def task_forward(self, name: str, batch: TaskBatch) -> Tensor:
        """Trunk + (lasso mix) + head of task ``name`` on its batch; returns the task's predictions."""
        inputs = batch.inputs
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        output = self.trunk(inputs)
        features = self.mixers[name](output.units) if self.mixing == "lasso" else output.features
        return self.tasks[name](features, batch)

    def task_loss(self, name: str, sub: TaskBatch, stage: str, log_loss: bool = True) -> Tensor:
        """Forward (under the run's precision), then loss, logs (the loss itself unless not
        ``log_loss``: task-parallel ranks log its mean over the task's ranks) and metric update of
        one task in float32 with autocast off; returns its (unweighted) float32 loss."""
        task = self.tasks[name]
        prediction = self.task_forward(name, sub)
        with torch.autocast(device_type=prediction.device.type, enabled=False):
            prediction = prediction.float()
            loss = task.loss(prediction, sub)
            metrics = self.metrics[f"{stage}_{name}"]
            metrics.update(*task.metric_inputs(prediction.detach(), sub))
        size = sub.inputs.shape[0]
        # a progress-bar value is read on the host every step: only validation's epoch values go there
        if log_loss:
            self.log(f"{stage}/{name}/loss", loss, batch_size=size, prog_bar=stage == "val", on_step=stage == "train", on_epoch=True)
        self.log_dict(metrics, batch_size=size, on_step=False, on_epoch=True)
        return loss

    def penalty(self, names: list[str]) -> Tensor | None:
        """``λ Σ_t Σ_u |α[t, u]|`` over the tasks ``names`` (lasso mode), else ``None``."""
        if self.mixing != "lasso" or self.lasso_penalty == 0:
            return None
        return self.lasso_penalty * sum(self.mixers[name].penalty() for name in names)

    def grad_norm_due(self) -> bool:
        return self.grad_norm_every_n_steps > 0 and self._train_steps % self.grad_norm_every_n_steps == 0

    def log_trunk_grad_norm(self, name: str, grads: Iterable[Tensor | None]) -> None:
        """Log ``grad_norm/<name>``: the L2 norm over all trunk parameters of one task's gradient."""
        present = [g.detach() for g in grads if g is not None]
        if present:
            self.log(f"grad_norm/{name}", torch.nn.utils.get_total_norm(present), on_step=True, on_epoch=False, batch_size=1)

    def log_host_values(self, values: dict[str, float]) -> None:
        """Log numbers the host holds (counts) as step values, without a host-to-device copy."""
        self.log_dict(self._host_scalars(values, self.device), on_step=True, on_epoch=False, batch_size=1)

    def _log_alpha(self) -> None:
        for name, mixer in self.mixers.items():
            self.log_dict({f"lasso/{name}/alpha_{u:02d}": a for u, a in enumerate(mixer.alpha.detach())}, on_step=True, on_epoch=False)

    def _shared_step(self, batch: dict[str, TaskBatch | None], stage: str, names: list[str] | None = None) -> Tensor:
        total: Tensor | None = None
        for name in self.tasks:
            if names is not None and name not in names:
                self.log_untrained_metrics(name)
                continue
            sub = batch.get(name)
            if sub is None:  # this task's validation loader is exhausted
                continue
            weighted = self.tasks[name].loss_weight * self.task_loss(name, sub, stage)
            # (a compiled trunk's backward frees its buffers: no second backward through it, no per-task norm)
            if stage == "train" and self.grad_norm_due() and weighted.requires_grad and not self.compile_trunk:
                self.log(f"grad_norm/{name}", self.trunk_grad_norm(weighted), on_step=True, on_epoch=False, batch_size=1)
            total = weighted if total is None else total + weighted
        assert total is not None, "a batch with no task sub-batch"
        self.log(f"{stage}/loss", total, batch_size=1, on_step=stage == "train", on_epoch=True)
        return total

    def log_untrained_metrics(self, name: str) -> None:
        """Log task ``name``'s training metrics without updating them (a rank that does not train it).

        Metrics are synchronised across ranks when they are computed at the end of an epoch, in
        the order they were first logged: every rank must log every task's metrics, in task order.
        """
        self.log_dict(self.metrics[f"train_{name}"], on_step=False, on_epoch=True, batch_size=1)

    def all_ranks_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks, on the device (no host read); itself on one process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="sum")

    def agreed(self, finite: Tensor) -> Tensor:
        """``finite`` (0-d bool on the device) on every rank: a device-side all-reduce (MIN), no host read."""
        if self._trainer is None or self.trainer.world_size == 1:
            return finite
        return self.trainer.strategy.reduce(finite.to(torch.int32), reduce_op="min").bool()

    def training_step(self, batch: dict[str, TaskBatch | None], batch_idx: int) -> Tensor | None:
        names = self.active_tasks()
        present = {name: sub for name, sub in batch.items() if sub is not None}
        self._skipped_files += sum(sub.skipped for sub in present.values())
        self.last_batch_samples = sum(sub.samples for sub in present.values())
        for name, sub in present.items():  # state that belongs to the loss (colorization's bin prior)
            self.tasks[name].observe(sub)
        for task in self.tasks.values():  # every task on every rank: a task may all-reduce what it observed
            task.synchronize(self.all_ranks_sum)
        # files skipped by this rank's workers so far (warned about each), and non-finite updates found at the checks
        self.log_host_values({"train/skipped_files": self._skipped_files, "train/nonfinite_skipped": self._nonfinite_skipped})
        if self.mixing == "lasso":
            self._log_alpha()
        if self.combine == "sum" and self._task_parallel is not None:
            loss = self.parallel_sum_loss(batch, names)  # sets self._finite, settled in optimizer_step
        elif self.combine == "sum":
            loss = self._shared_step(batch, "train", names)
            penalty = self.penalty(names)
            loss = loss if penalty is None else loss + penalty
            self._finite = self.agreed(torch.isfinite(loss.detach()))  # settled in optimizer_step
        if self.combine == "sum":
            self._train_steps += 1
            return loss
        self.per_task_step(batch, names)
        return None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Sum mode: the update as a guarded transaction (:mod:`mtssl_lightning.nonfinite`), its snapshot
        taken before the closure runs the forward pass (BatchNorm statistics change there)."""
        snapshot = self.guard.begin([getattr(optimizer, "optimizer", optimizer)], [self])
        optimizer.step(closure=optimizer_closure)
        self.guard.settle(snapshot, self._finite, self._train_steps - 1)

    def on_after_backward(self) -> None:
        if self.automatic_optimization:
            self.sync_task_gradients(None)

    def sync_task_gradients(self, task: str | None) -> None:
        """Let a task-parallel strategy average the last backward pass's gradients (of ``task``; ``None``: all)."""
        if self._task_parallel is not None:
            self._task_parallel.reduce_task_gradients(self, task)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._task_parallel is not None:
            self._task_parallel.sync_buffers(self)
        if self._train_steps % self.check_every_n_steps == 0:
            self.check_nonfinite()

    def on_train_end(self) -> None:
        self.check_nonfinite()  # what the last steps found

    def check_nonfinite(self) -> None:
        """The periodic check (one host sync): warn about the non-finite updates found since the last
        check; in ``stop`` mode, save the weights from before the first one and raise."""
        path = Path(self.trainer.default_root_dir) / "nonfinite-last-good.ckpt"
        self._nonfinite_skipped += self.guard.check(self._train_steps, self._nonfinite_skipped, self.trainer.save_checkpoint, path)

    def validation_step(self, batch: dict[str, TaskBatch | None], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, TaskBatch | None], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def predict_step(self, batch: dict[str, TaskBatch | None], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Each task's predictions on its validation-style inputs, ``{task: prediction}``."""
        return {name: self.task_forward(name, sub) for name, sub in batch.items() if sub is not None}

    # -------------------------------------------------------------- optimizers
    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            return torch.optim.RMSprop(params, lr=1e-3)
        return self.optimizer_factory(params)

    def configure_optimizers(self) -> Any:
        groups = [list(self.parameters())] if self.combine == "sum" else [self.task_parameters(name) for name in self.tasks]
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
        save_run_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_run_state(self, checkpoint)
