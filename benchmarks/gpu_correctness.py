"""The GPU check's correctness runs on CUDA: one-process NCCL DDP and task-parallel fits, determinism
(two ``trainer.deterministic`` runs, the same losses), and the evaluation modules (linear probe,
detection, depth: a few steps each on synthetic data)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from gpu_harness import TASKS, Budget, Settings, TimedDataModule, make_model, raw_batches, trainer
from gpu_parts import Record


class Losses(pl.Callback):
    """Every training step's logged losses, kept on the device and read once at the end."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append({k: v.detach().clone() for k, v in trainer.callback_metrics.items() if k.endswith("loss_step") or k == "train/loss"})

    def values(self) -> list[dict[str, float]]:
        return [{k: float(v) for k, v in step.items()} for step in self.steps]


def _small(s: Settings) -> Settings:
    """The paper trunk with smaller task batches (8 on a GPU): correctness, not speed."""
    from dataclasses import replace

    return replace(s, task_batch=s.task_batch or 8)


def _fit_four_tasks(s: Settings, steps: int = 3, combine: str = "alternate", **trainer_kwargs: Any) -> list[dict[str, float]]:
    pl.seed_everything(0, workers=True)
    model = make_model(s, TASKS, combine, channels_last=True)
    raw = raw_batches(s, model)
    losses = Losses()
    dm = TimedDataModule(fixed=raw, steps=steps, samplers=model.task_samplers(), num_workers=0)
    trainer(s, max_steps=steps, callbacks=[losses], use_distributed_sampler=False, **trainer_kwargs).fit(model, dm)
    values = losses.values()
    bad = [(i, k) for i, step in enumerate(values) for k, v in step.items() if v != v or abs(v) == float("inf")]
    if len(values) != steps or bad:
        raise RuntimeError(f"expected {steps} steps with finite losses, got {len(values)}; non-finite: {bad}")
    return values


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def part_distributed(s: Settings, budget: Budget, rec: Record) -> None:
    """One-process DDP and task-parallel fits over NCCL (gloo on the CPU): the strategies' CUDA paths."""
    from lightning.pytorch.strategies import DDPStrategy

    from mtssl_lightning.distributed import TaskParallelStrategy

    small = _small(s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    rec.values["backend"] = backend

    def ddp() -> dict[str, Any]:
        try:
            losses = _fit_four_tasks(small, strategy=DDPStrategy(process_group_backend=backend, find_unused_parameters=True))
        finally:
            _destroy()
        return {"steps": len(losses), "losses": {k: round(v, 4) for k, v in losses[-1].items()}}

    def task_parallel() -> dict[str, Any]:
        strategy = TaskParallelStrategy(task_ranks={name: [0] for name in TASKS}, process_group_backend=backend)
        try:
            losses = _fit_four_tasks(small, combine="concurrent", strategy=strategy)
        finally:
            _destroy()
        return {"steps": len(losses), "losses": {k: round(v, 4) for k, v in losses[-1].items()}}

    rec.run("ddp", ddp, need=20)
    rec.run("task_parallel", task_parallel, need=20)


def part_eval(s: Settings, budget: Budget, rec: Record) -> None:
    """``trainer.deterministic: true`` twice (same losses), then the evaluation modules a few steps each."""
    small = _small(s)

    def deterministic() -> dict[str, Any]:
        first = _fit_four_tasks(small, deterministic=True)
        second = _fit_four_tasks(small, deterministic=True)
        if first != second:
            raise AssertionError(f"two deterministic runs differ: {first} vs {second}")
        return {"steps": len(first), "identical": True}

    rec.run("deterministic_four_tasks", deterministic, need=10)
    modules = (("linear_probe", _linear_probe), ("detection", _detection), ("depth", _depth))
    for name, make in modules:
        rec.run(name, lambda make=make: make(s, deterministic=False), need=5)
    # informative (reported, not failing the check): which evaluation modules also run with
    # trainer.deterministic (torchvision's roi_align has no deterministic CUDA backward, so fine-tuned detection cannot)
    for name, make in modules:
        rec.run(f"{name}_deterministic", lambda make=make: make(s, deterministic=True), need=5, required=False)


def _fit_eval(s: Settings, model: pl.LightningModule, train: DataLoader, val: DataLoader, deterministic: bool, steps: int = 3) -> dict[str, Any]:
    pl.seed_everything(0)
    t = trainer(s, max_steps=steps, limit_val_batches=1, val_check_interval=steps, deterministic=deterministic, check_val_every_n_epoch=None)
    t.fit(model, train, val)
    metrics = {k: round(float(v), 4) for k, v in t.callback_metrics.items()}
    if not metrics:
        raise RuntimeError("nothing was logged")
    return {"steps": t.global_step, "metrics": dict(list(metrics.items())[:8])}


def _linear_probe(s: Settings, deterministic: bool) -> dict[str, Any]:
    from mtssl_lightning.evaluation.classification import ImageClassifier, LabelledBatch
    from mtssl_lightning.trunks import ResNetV2

    size, batch = (64, 4) if s.dry else (224, 32)
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g), i % 10) for i in range(batch * 4)]
    loader = DataLoader(samples, batch_size=batch, collate_fn=LabelledBatch.collate)
    model = ImageClassifier(num_classes=10, trunk=ResNetV2(**s.trunk), frozen=True)
    return _fit_eval(s, model, loader, loader, deterministic)


def _detection(s: Settings, deterministic: bool) -> dict[str, Any]:
    from mtssl_lightning.evaluation.detection import FasterRCNNDetector
    from mtssl_lightning.evaluation.detection.data import VOCBatch, VOCSample
    from mtssl_lightning.trunks import ResNetV2

    (h, w), small = ((64, 80), True) if s.dry else ((375, 500), False)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):
        x0, y0 = int(torch.randint(0, w // 2, (), generator=g)), int(torch.randint(0, h // 2, (), generator=g))
        boxes = torch.tensor([[x0, y0, x0 + w // 3, y0 + h // 3]], dtype=torch.float32)
        image = torch.randint(0, 60, (3, h, w), dtype=torch.uint8, generator=g)
        image[:, y0 : y0 + h // 3, x0 : x0 + w // 3] = 220
        samples.append(VOCSample(image, boxes, torch.tensor([1 + i % 20]), torch.tensor([False]), i))
    loader = DataLoader(samples, batch_size=2, collate_fn=VOCBatch.collate)
    sizes = dict(min_size=64, max_size=96, anchor_sizes=[16, 32, 64]) if small else dict(min_size=600, max_size=1000)
    model = FasterRCNNDetector(trunk=ResNetV2(**s.trunk), box_score_thresh=0.0, **sizes)
    return _fit_eval(s, model, loader, loader, deterministic)


def _depth(s: Settings, deterministic: bool) -> dict[str, Any]:
    from mtssl_lightning.evaluation.depth import DepthEstimator
    from mtssl_lightning.evaluation.depth.data import DepthBatch, DepthSample
    from mtssl_lightning.trunks import ResNetV2

    (h, w), batch = ((32, 32), 4) if s.dry else ((228, 304), 8)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(batch * 3):
        depth = torch.rand(1, h, w, generator=g) * 9 + 0.5
        samples.append(DepthSample(torch.rand(3, h, w, generator=g), depth, depth > 0, i))
    loader = DataLoader(samples, batch_size=batch, collate_fn=DepthBatch.collate)
    model = DepthEstimator(trunk=ResNetV2(**s.trunk), output_stride=4 if not s.dry else 2)
    return _fit_eval(s, model, loader, loader, deterministic)
