"""The users' GPU code path, proven on the CPU: bf16 autocast, channels-last, ``torch.compile``, no
host syncs in a training step, per-rank task randomness, pinned batches, deterministic kernels,
one worker budget per rank.

What needs a GPU to see (kernel speed, NCCL, real pinned memory) is left to ``make gpu-check``.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from host_syncs import HostSyncCounter
from lightning.pytorch.strategies import DDPStrategy
from toy_tasks import LossRecorder
from torch.utils._python_dispatch import TorchDispatchMode

from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL
from mtssl_lightning.data.batch import ClipBatch, ImageBatch, pin_batch
from mtssl_lightning.tasks import Colorization, Exemplar, MotionSegmentation, RelativePosition
from mtssl_lightning.trunks import ResNetV2

aten = torch.ops.aten


def four_tasks(rp_dropout: float = 0.5) -> dict:
    """The four tasks at small sizes: RP 4 images → 36 patches of 16², Col 4 × 48², Ex 2 × 3 views of 32², MS 2 clips of 48²."""
    return {
        "rp": RelativePosition(batch_size=4, patch_size=16, gap=4, jitter=2, pairs="all", colour="drop", hidden=32, dropout=rp_dropout),
        "col": Colorization(batch_size=4, image_size=48, head_channels=16, prior_warmup_pixels=100),
        "ex": Exemplar(batch_size=2, image_size=48, views=3, view_size=32, hidden=32, embedding_dim=16),
        "ms": MotionSegmentation(batch_size=2, image_size=48, head_channels=16),
    }


def rmsprop(params) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=1e-3)  # module level: spawned processes unpickle it


def four_task_model(rp_dropout: float = 0.5, **kwargs) -> MultiTaskSSL:
    torch.manual_seed(0)
    kwargs.setdefault("grad_norm_every_n_steps", 0)
    return MultiTaskSSL(four_tasks(rp_dropout), trunk=ResNetV2("tiny", width=0.125), optimizer=rmsprop, **kwargs)


def _trainer(**kwargs) -> pl.Trainer:
    args = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    args.update(kwargs)
    return pl.Trainer(**args)


# ----------------------------------------------------------------- bf16 + channels-last + compile
#: how far a step's task loss under bf16-mixed + channels-last + compile may be from the float32
#: eager loss of the same weights on the same batch: |Δ| ≤ atol + rtol·|loss|. Measured over the 4
#: steps × 4 configurations: RP, Col, MS ≤ 0.002; exemplar ≤ 0.042 (its triplet hinge: bf16 noise
#: in 6 embeddings flips a semi-hard choice now and then; its loss is ~0.35)
LOSS_TOLERANCE = {"rp": (0.01, 0.01), "col": (0.01, 0.01), "ms": (0.01, 0.01), "ex": (0.1, 0.0)}
#: graphs Dynamo may compile for the trunk over the whole test: the tasks' input shapes in training
#: mode (automatic dynamic shapes after the first change) and in eval mode (validation)
MAX_GRAPHS = 6


class Float32Reference(pl.Callback):
    """Before each training step, the float32 eager losses of a copy of the model at the same weights
    on the same batch (the fast run's own losses are then recorded by a LossRecorder)."""

    def __init__(self, reference: MultiTaskSSL) -> None:
        # training mode (BatchNorm on batch statistics, as the step); reloaded every step, so the
        # statistics it updates do not matter; RP's dropout is off in this test
        self.reference = reference.train()
        self.losses: list[dict[str, float]] = []

    @torch.no_grad()
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.reference.load_state_dict(module.state_dict())
        losses = {}
        for name, sub in batch.items():  # the step counts the batch into colorization's prior first
            self.reference.tasks[name].observe(sub)
        for task in self.reference.tasks.values():
            task.synchronize(lambda counts: counts)  # one process: this rank's counts are all
        for name, sub in batch.items():
            losses[f"train/{name}/loss_step"] = float(self.reference.tasks[name].loss(self.reference.task_forward(name, sub).float(), sub))
        self.losses.append(losses)


@pytest.mark.slow
def test_four_tasks_train_under_bf16_channels_last_and_compile_like_float32() -> None:
    """Four steps of the four-task model in both combine modes and both mixing modes with
    ``precision: bf16-mixed``, ``channels_last`` and ``compile`` (Dynamo + AOTAutograd on the CPU:
    ``backend: aot_eager``, since Inductor's CPU code generation takes many minutes). Every step's
    task losses are finite and within the stated tolerance of the float32 eager losses of the same
    weights on the same batch (LOSS_TOLERANCE, with the measured gaps). The compiled trunk ends up
    with at most MAX_GRAPHS Dynamo graphs (measured: 4)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gaps = []
    for combine in ("sum", "concurrent"):
        for mixing in ("naive", "lasso"):
            pl.seed_everything(0)
            options = dict(channels_last=True, compile=True, compile_options={"backend": "aot_eager"})
            model = four_task_model(combine=combine, mixing=mixing, rp_dropout=0.0, **options)
            reference = Float32Reference(four_task_model(combine=combine, mixing=mixing, rp_dropout=0.0))
            recorder = LossRecorder()
            trainer = _trainer(max_steps=4, precision="bf16-mixed", callbacks=[reference, recorder], limit_val_batches=1)
            trainer.fit(model, MultiTaskDataModule(steps_per_epoch=4, val_samples=4, num_workers=0))
            assert model.trunk._compiled_call_impl is not None  # compiled, and channels-last
            assert model.trunk.root.weight.is_contiguous(memory_format=torch.channels_last)
            assert len(reference.losses) == len(recorder.losses) == 4
            for step, (exact, fast) in enumerate(zip(reference.losses, recorder.losses)):
                for key, value in exact.items():
                    assert torch.isfinite(torch.tensor(fast[key])), (combine, mixing, step, key)
                    gaps.append(abs(fast[key] - value))
                    atol, rtol = LOSS_TOLERANCE[key.split("/")[1]]
                    assert gaps[-1] <= atol + rtol * abs(value), (combine, mixing, step, key, value, fast[key])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"max |loss_bf16 - loss_fp32| = {max(gaps):.4f}; Dynamo graphs: {graphs}")
    assert 1 <= graphs <= MAX_GRAPHS, graphs


def test_speed_options_are_applied_before_the_optimizers_exist() -> None:
    """``configure_model`` runs before ``configure_optimizers`` (and before a strategy wraps the
    model): the optimizers see the channels-last parameters, and so would DDP's buckets."""
    model = four_task_model(channels_last=True)
    seen = {}

    class Look(pl.Callback):
        def on_fit_start(self, trainer, module):
            weight = module.trunk.root.weight
            seen["layout"] = weight.is_contiguous(memory_format=torch.channels_last)
            seen["in optimizer"] = any(p is weight for g in trainer.optimizers[0].param_groups for p in g["params"])

    _trainer(max_steps=1, callbacks=[Look()]).fit(model, MultiTaskDataModule(steps_per_epoch=1, num_workers=0))
    assert seen == {"layout": True, "in optimizer": True}


# ----------------------------------------------------------------------------- host syncs
class SyncsPerStep(pl.Callback):
    """A HostSyncCounter from the batch's transfer to the device to the end of its training step
    (the task inputs are built in between); the loaders' CPU work before that is not counted."""

    def __init__(self) -> None:
        self.counters: list[HostSyncCounter] = []
        self._live: HostSyncCounter | None = None

    def start(self) -> None:
        self._live = HostSyncCounter()
        self._live.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self.counters.append(self._live)
            self._live = None


@pytest.mark.parametrize("combine", ["sum", "alternate", "concurrent"])
def test_a_training_step_never_makes_the_host_wait(combine) -> None:
    """Zero ops that would synchronise the host with a GPU (value reads, data-dependent sizes,
    tensors from Python data) in the four tasks' input building, forward, losses, metrics,
    backward, updates and non-finite guard, on steps where no periodic check is due.

    The periodic checks, each of which reads values on the host: the non-finite count
    (``model.check_every_n_steps``, default 50), Lightning's flush of logged values to the loggers
    (``trainer.log_every_n_steps``), the dashboard's pictures (``media_every_n_steps``) and the
    epoch-end metric computation. Here they are set beyond the run, except the checks at step 0.
    """
    counter = SyncsPerStep()

    class Counted(MultiTaskDataModule):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            if self.trainer.training:
                counter.start()
            return batch

    model = four_task_model(combine=combine, check_every_n_steps=1000, mixing="lasso")
    trainer = _trainer(max_steps=4, log_every_n_steps=1000, callbacks=[counter])
    trainer.fit(model, Counted(steps_per_epoch=4, num_workers=0))
    assert len(counter.counters) == 4
    for step, found in enumerate(counter.counters[1:], start=1):  # step 0 initialises lazily
        assert found.ops > 500  # it saw the step (inputs, forward, backward, updates)
        assert found.total == 0, f"step {step}: {dict(found.counts)}\n" + "\n".join(found.where[:10])


# ------------------------------------------------------------------ losses in float32 under bf16
def test_losses_and_metrics_are_float32_under_bf16_autocast() -> None:
    """Each task's loss and metric update inside a bf16 autocast region equal their float32 values on
    the same predictions (the module computes them with autocast off; the pure functions do too)."""
    model = four_task_model().eval()
    dm = MultiTaskDataModule(val_samples=4, num_workers=0, samplers=model.task_samplers())
    dm.setup("validate")
    raw, *_ = next(iter(dm.val_dataloader()))
    batches = dm.build(raw, training=False)
    for name, batch in batches.items():
        task = model.tasks[name]
        with torch.no_grad():
            prediction = model.task_forward(name, batch).float()
        plain = task.loss(prediction, batch)
        reference = task.make_metrics()
        reference.update(*task.metric_inputs(prediction, batch))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = task.loss(prediction, batch)
            metrics = task.make_metrics()
            metrics.update(*task.metric_inputs(prediction, batch))
        assert under.dtype == torch.float32, name
        torch.testing.assert_close(under, plain, rtol=1e-6, atol=1e-6, msg=name)
        for key, value in reference.compute().items():
            torch.testing.assert_close(metrics.compute()[key], value, rtol=1e-6, atol=1e-6, msg=f"{name} {key}")


# ----------------------------------------------------------------- deterministic CUDA kernels
#: backward (or forward) ops for which CUDA has no deterministic kernel: with
#: ``torch.use_deterministic_algorithms(True)`` (``trainer.deterministic: true``) they raise there
CUDA_NONDETERMINISTIC = {
    aten._adaptive_avg_pool2d_backward.default, aten.adaptive_max_pool2d_backward.default,
    aten.upsample_bilinear2d_backward.default, aten.upsample_bicubic2d_backward.default,
    aten.grid_sampler_2d_backward.default, aten.nll_loss_forward.default, aten.nll_loss2d_forward.default,
    aten.reflection_pad2d_backward.default, aten.histc.default, aten.median.dim, aten.put_.default,
    aten.max_unpool2d.default,
}


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mixing", ["naive", "lasso"])
def test_a_training_step_uses_no_op_without_a_deterministic_cuda_kernel(mixing) -> None:
    """``trainer.deterministic: true`` must work on CUDA: the step's forward and backward call none of
    the ops that then raise there (the CPU runs the same ops, so the dispatcher shows them here)."""
    model = four_task_model(mixing=mixing)
    recorder = OpRecorder()

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            recorder.__enter__()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            recorder.__exit__(None, None, None)

    _trainer(max_steps=2, callbacks=[Record()], deterministic=True).fit(model, MultiTaskDataModule(steps_per_epoch=2, num_workers=0))
    assert aten.convolution_backward.default in recorder.ops  # it saw the backward pass
    assert not recorder.ops & CUDA_NONDETERMINISTIC, sorted(map(str, recorder.ops & CUDA_NONDETERMINISTIC))


# --------------------------------------------------------------------------- pinned batches
def test_every_batch_type_pins_all_its_tensors(monkeypatch) -> None:
    """No CUDA here, so ``Tensor.pin_memory`` is replaced by a recorder: each batch's ``pin_memory()``
    returns a batch whose every tensor went through it, and the DataLoader's pinning routine calls it."""
    from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin  # what DataLoader(pin_memory=True) runs

    from mtssl_lightning.evaluation.classification.data import LabelledBatch
    from mtssl_lightning.evaluation.depth.data import DepthBatch
    from mtssl_lightning.evaluation.detection.data import VOCBatch

    pinned: list[int] = []

    def fake_pin(self, *args, **kwargs):
        copy = self.clone()
        pinned.append(id(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    z = torch.zeros
    batches = [
        ImageBatch(z(2, 3, 4, 4, dtype=torch.uint8), z(2, dtype=torch.int64)),
        ClipBatch(z(2, 3, 3, 4, 4, dtype=torch.uint8), z(2, dtype=torch.int64), z(2, dtype=torch.int64), z(2, 1, 4, 4, dtype=torch.uint8)),
        LabelledBatch(z(2, 3, 4, 4), z(2, dtype=torch.int64)),
        DepthBatch(z(2, 3, 4, 4), z(2, 1, 4, 4), z(2, 1, 4, 4, dtype=torch.bool), z(2, dtype=torch.int64)),
        VOCBatch([z(3, 4, 4)], [z(1, 4)], [z(1, dtype=torch.int64)], [z(1, dtype=torch.bool)], z(1, dtype=torch.int64)),
    ]
    for batch in batches:
        pinned.clear()
        out = dataloader_pin(batch)
        assert type(out) is type(batch)
        tensors = [v for v in vars(out).values() if isinstance(v, torch.Tensor)]
        tensors += [t for v in vars(out).values() if isinstance(v, list) for t in v]
        assert tensors and all(id(t) in pinned for t in tensors), type(batch).__name__
    assert pin_batch(batches[0]).skipped == batches[0].skipped  # plain fields are kept


# ---------------------------------------------------------------------------- worker budget
def test_one_worker_budget_per_rank_shared_by_the_tasks() -> None:
    """``num_workers: N`` means N training workers in all, shared in proportion to the work (video
    clips count their frames), kept between epochs; validation gets the same shares but only while
    it runs (no idle persistent validation workers during training)."""
    dm = MultiTaskDataModule(steps_per_epoch=2, val_samples=4, num_workers=6, samplers=four_task_model().task_samplers())
    dm.setup("fit")
    train = dm.train_dataloader().iterables
    val = dm.val_dataloader().iterables
    assert sum(loader.num_workers for loader in train.values()) == 6
    # work per batch: rp 4 images, col 4, ex 2, ms 2 clips × 5 frames = 10 -> one each, then 2 more for ms
    assert {name: loader.num_workers for name, loader in train.items()} == {"rp": 1, "col": 1, "ex": 1, "ms": 3}
    assert all(loader.persistent_workers for loader in train.values())
    assert {name: loader.num_workers for name, loader in val.items()} == {name: loader.num_workers for name, loader in train.items()}
    assert not any(loader.persistent_workers for loader in val.values())
    few = MultiTaskDataModule(num_workers=2, samplers=four_task_model().task_samplers())
    few.setup("fit")
    shares = few.worker_shares(list(few.requests))
    assert sum(shares.values()) == 2 and shares["ms"] == 1  # the busiest loaders get the few workers


@pytest.mark.slow
def test_training_runs_at_most_num_workers_worker_processes() -> None:
    """Counted at every step: the worker processes (children of this process) are at most
    ``num_workers`` while training — also after a validation, whose own workers end with it (its
    loader releases them after its last batch) — and at most twice that during validation."""
    import psutil

    counts = {"train": 0, "val": 0}
    # processes that earlier tests left running in this pytest process (W&B's service, compile
    # worker pools) are not this run's workers
    earlier = {child.pid for child in psutil.Process().children(recursive=True)}

    def workers() -> int:
        return sum(child.pid not in earlier for child in psutil.Process().children(recursive=True))

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            counts["train"] = max(counts["train"], workers())

        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
            counts["val"] = max(counts["val"], workers())

    model = four_task_model()
    _trainer(max_epochs=3, limit_val_batches=None, callbacks=[Count()]).fit(model, MultiTaskDataModule(steps_per_epoch=3, val_samples=4, num_workers=4))
    assert counts["train"] == 4  # epochs 2 and 3 come after a validation
    assert 4 < counts["val"] <= 8  # the training workers (persistent) plus validation's own, only while validating


# ------------------------------------------------------------------- per-rank task randomness
class SaveBatches(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        torch.save(batch, Path(self.out) / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")


def _fit_two_ranks(out: Path) -> None:
    pl.seed_everything(7)
    model = four_task_model()
    trainer = _trainer(devices=2, strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True), max_steps=2, callbacks=[SaveBatches(str(out))])
    trainer.fit(model, MultiTaskDataModule(steps_per_epoch=2, num_workers=0))


@pytest.mark.slow
def test_each_rank_draws_its_own_task_inputs_reproducibly(tmp_path) -> None:
    """gloo, 2 processes, seed_everything(7) on both: the ranks' patch offsets and exemplar views
    differ (each rank's generator is seeded from the run seed *and* its rank); a second run with
    the same seed gives each rank the very same inputs again."""
    runs = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        out.mkdir()
        _fit_two_ranks(out)
        runs.append({(r, s): torch.load(out / f"rank{r}_step{s}.pt", weights_only=False) for r in (0, 1) for s in (0, 1)})
    first, second = runs
    for key in first:
        for task in ("rp", "col", "ex", "ms"):
            assert torch.equal(first[key][task].inputs, second[key][task].inputs), (key, task)
    for step in (0, 1):
        zero, one = first[(0, step)], first[(1, step)]
        assert not torch.equal(zero["rp"].boxes - zero["rp"].boxes[:, :1], one["rp"].boxes - one["rp"].boxes[:, :1])  # jitter
        # the same crops of the same images would still get other views: compare the augmentation itself
        assert not torch.equal(zero["ex"].inputs, one["ex"].inputs)
