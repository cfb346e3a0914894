"""The GPU check's shared pieces: settings (paper scale on a GPU, tiny on the CPU), per-part time
budgets, the four tasks with the paper's settings, fixed in-memory batches, and :class:`StepClock`,
the callback that times training steps without making the host wait inside the timed window.

How a step is timed: host timestamps at the start and end of every training step (as
``TrainingDashboard`` does: the gap between steps is data wait), one ``synchronize`` at each end of
the timed window (images/s over the window), CUDA events around the DataModule's input building and
at each step's end (the build's share of the device time, read after the window), and optionally
``torch.cuda.set_sync_debug_mode("warn")`` from the end of one step to the end of the next (host-device
synchronisations per step) and a thread that samples the GPU's utilisation (``gpu_utilisation.py``).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.utilities import CombinedLoader

from gpu_utilisation import UtilisationSampler
from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL
from mtssl_lightning.data.batch import ClipBatch, ImageBatch
from mtssl_lightning.data.clips import ClipDataset
from mtssl_lightning.data.datasets import CropDataset
from mtssl_lightning.data.device_decode import EncodedCropDataset
from mtssl_lightning.data.frames import FrameFolder
from mtssl_lightning.data.sources import ImageFolder
from mtssl_lightning.tasks.base import Task
from mtssl_lightning.trunks import ResNetV2

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("rp", "col", "ex", "ms")


@dataclass
class Settings:
    """Sizes of one run of the check: ``paper`` on a GPU, ``dry`` (tiny, few steps) on the CPU."""

    dry: bool
    data: Path  # where the part "data" writes the images and frame folders
    trunk: dict[str, Any] = field(default_factory=lambda: {"depth": "v2_101", "last_block": 3})
    trunk_batch: int = 128
    trunk_size: int = 224
    pixel_scale: float = 1.0  # the tasks' pixel sizes (configs/tasks/*.yaml) times this
    task_batch: int | None = None  # None: the paper configs' batch sizes (32 each)
    compile_options: dict[str, Any] = field(default_factory=dict)
    warmup: int = 5
    steps: int = 20
    fit_steps: int = 50
    images: int = 3000
    image_sides: tuple[int, int] = (300, 500)  # short side, ImageNet-like
    videos: int = 32
    frames: int = 16
    frame_size: tuple[int, int] = (320, 240)
    workers: int = max(1, min(14, (os.cpu_count() or 2) - 2))

    @staticmethod
    def make(dry: bool, data: Path) -> Settings:
        if not dry:
            return Settings(dry=False, data=data)
        return Settings(
            dry=True, data=data, trunk={"depth": "tiny", "width": 0.125}, trunk_batch=4, trunk_size=64, pixel_scale=0.25,
            task_batch=2, compile_options={"backend": "aot_eager"}, warmup=1, steps=2, fit_steps=4, images=24,
            image_sides=(96, 160), videos=3, frames=12, frame_size=(96, 72), workers=2,
        )

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() and not self.dry else "cpu")

    @property
    def accelerator(self) -> str:
        return "gpu" if self.device.type == "cuda" else "cpu"


class Budget:
    """A part's time budget: how much is left, and whether a next step of ``need`` seconds fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.spent()

    def allows(self, need: float) -> bool:
        return self.left() > need


# ------------------------------------------------------------------------------------ models
def paper_tasks(settings: Settings, names: tuple[str, ...] = TASKS) -> dict[str, Task]:
    """The tasks of ``configs/tasks/<name>.yaml`` (the paper settings), shrunk in a dry run."""
    import importlib

    tasks = {}
    for name in names:
        node = yaml.safe_load((ROOT / "configs" / "tasks" / f"{name}.yaml").read_text())["model"]["tasks"][name]
        module, _, cls = node["class_path"].rpartition(".")
        args = dict(node.get("init_args") or {})
        if settings.task_batch is not None:
            args["batch_size"] = settings.task_batch
        if settings.dry:  # small heads too
            args.update({k: 32 for k in ("hidden",) if k in args})
        tasks[name] = getattr(importlib.import_module(module), cls)(**args)
    return tasks


def make_model(settings: Settings, names: tuple[str, ...] = TASKS, combine: str = "alternate", **kwargs: Any) -> MultiTaskSSL:
    """A pretraining module with the paper's trunk and task settings (``configs/base/pretrain.yaml``'s RMSProp)."""
    torch.manual_seed(0)
    kwargs.setdefault("grad_norm_every_n_steps", 0)
    return MultiTaskSSL(
        paper_tasks(settings, names), trunk=ResNetV2(**settings.trunk), pixel_scale=settings.pixel_scale, combine=combine,
        optimizer=rmsprop, **kwargs,
    )


def rmsprop(params: Any) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=1e-3, alpha=0.9, eps=1e-3)  # configs/base/pretrain.yaml


def trainer(settings: Settings, **kwargs: Any) -> pl.Trainer:
    args = dict(
        accelerator=settings.accelerator, devices=1, precision="bf16-mixed", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        log_every_n_steps=1000,
    )
    args.update(kwargs)
    return pl.Trainer(**args)


# ------------------------------------------------------------------------------------ batches
def raw_batches(settings: Settings, model: MultiTaskSSL, encoded: bool = False, scale: int = 1) -> dict[str, Any]:
    """One training batch per task of ``model`` as the workers deliver it (pinned when CUDA is there),
    from the check's own images and frame folders; ``encoded``: as with ``decode: device``;
    ``scale``: each batch repeated that many times (the memory search)."""
    out = {}
    for name, sampler in model.task_samplers().items():
        r = sampler.data_request()
        if r.source == "videos":
            dataset = ClipDataset(FrameFolder(settings.data / "frames"), r.image_size, r.clip_length, r.frame_stride, r.batch_size, train=True)
        else:
            kind = EncodedCropDataset if encoded else CropDataset
            dataset = kind(ImageFolder(settings.data / "images"), r.image_size, r.batch_size, train=True)
        batch = dataset.collate([dataset[i] for i in range(r.batch_size)])
        if scale > 1:
            batch = _repeat(batch, scale)
        out[name] = batch.pin_memory() if torch.cuda.is_available() else batch
    return out


def _repeat(batch: Any, k: int) -> Any:
    if isinstance(batch, ClipBatch):
        return ClipBatch(batch.clips.repeat(k, 1, 1, 1, 1), batch.index.repeat(k), batch.start.repeat(k), None if batch.masks is None else batch.masks.repeat(k, 1, 1, 1))
    assert isinstance(batch, ImageBatch)
    return ImageBatch(batch.images.repeat(k, 1, 1, 1), batch.index.repeat(k))


class Repeat:
    """A loader that yields the same batch ``length`` times."""

    def __init__(self, batch: Any, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Any:
        return iter([self.batch] * self.length)


class TimedDataModule(MultiTaskDataModule):
    """The DataModule with marks around its input building, read by a :class:`StepClock` of the trainer
    (``fixed``: serve the same raw batches every step instead of reading files)."""

    def __init__(self, *args: Any, fixed: dict[str, Any] | None = None, steps: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixed, self.fixed_steps = fixed, steps

    def setup(self, stage: str | None = None) -> None:
        if self.fixed is None:
            super().setup(stage)

    def train_dataloader(self) -> Any:
        if self.fixed is None:
            return super().train_dataloader()
        return CombinedLoader({name: Repeat(raw, self.fixed_steps) for name, raw in self.fixed.items()}, mode="max_size_cycle")

    def val_dataloader(self) -> Any:
        return [] if self.fixed is not None else super().val_dataloader()

    def _clock(self) -> StepClock | None:
        trainer = self.trainer
        found = [c for c in trainer.callbacks if isinstance(c, StepClock)] if trainer is not None else []
        return found[0] if found else None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        clock = self._clock()
        if clock is not None:
            clock.mark("build_start")
        out = super().on_after_batch_transfer(batch, dataloader_idx)
        if clock is not None:
            clock.mark("build_end")
        return out

    def decode_on_device(self, batch: Any) -> Any:  # type: ignore[override]
        out = MultiTaskDataModule.decode_on_device(batch)
        clock = self._clock()
        if clock is not None:
            clock.mark("decoded")
        return out


# ------------------------------------------------------------------------------------ timing
class StepClock(pl.Callback):
    """Times training steps ``warmup …`` (see the module docstring); :meth:`results` after the fit.

    Args:
        warmup: steps before the timed window (compilation, cuDNN choices, allocator warm-up).
        count_syncs: count CUDA synchronisations per timed step (``set_sync_debug_mode``).
        sample_utilisation: sample the GPU's utilisation during the window.
    """

    def __init__(self, warmup: int = 2, count_syncs: bool = False, sample_utilisation: bool = False) -> None:
        self.warmup, self.count_syncs, self.sample_utilisation = warmup, count_syncs, sample_utilisation
        self.cuda = torch.cuda.is_available()
        self.steps = 0
        self.samples = 0
        self.host: list[tuple[float, float]] = []  # (start, end) of each timed step
        self.marks: list[dict[str, Any]] = []  # per timed step: build_start, decoded, build_end, step_end
        self._current: dict[str, Any] = {}
        self.window: tuple[float, float] | None = None
        self.syncs: list[int] = []
        self.sync_sources: dict[str, int] = {}
        self._recording: Any = None
        self.utilisation = UtilisationSampler()

    def mark(self, name: str) -> None:
        if self.steps < self.warmup:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._current[name] = event
        else:
            self._current[name] = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.steps == self.warmup:
            if self.cuda:
                torch.cuda.synchronize()
            self.window = (time.perf_counter(), 0.0)
            if self.sample_utilisation:
                self.utilisation.start()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        timed = self.steps >= self.warmup
        if timed:
            self.mark("step_end")
            self.marks.append(self._current)
            self._current = {}
            self.host.append((self._start, time.perf_counter()))
            self.samples += getattr(pl_module, "last_batch_samples", 0)
        self._stop_recording_syncs()
        self.steps += 1
        if self.steps >= self.warmup and self.count_syncs and self.cuda:
            self._start_recording_syncs()  # the next step: its fetch, transfer, input building and the step itself

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_recording_syncs(keep=False)
        if self.cuda:
            torch.cuda.synchronize()  # the window ends when the device has done the last step's work
        if self.window is not None:
            self.window = (self.window[0], time.perf_counter())
        self.utilisation.stop()

    # ---- synchronisations
    def _start_recording_syncs(self) -> None:
        self._recording = warnings.catch_warnings(record=True)
        self._caught = self._recording.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def _stop_recording_syncs(self, keep: bool = True) -> None:
        if self._recording is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._recording.__exit__(None, None, None)
        found = [w for w in self._caught if "synchroniz" in str(w.message)]
        if keep:
            self.syncs.append(len(found))
            for w in found:
                where = f"{os.path.relpath(w.filename, ROOT) if w.filename.startswith(str(ROOT)) else w.filename}:{w.lineno}"
                self.sync_sources[where] = self.sync_sources.get(where, 0) + 1
        self._recording = None

    # ---- results
    def results(self) -> dict[str, Any]:
        """images/s over the window, data-wait share, input-building share, syncs per step, utilisation."""
        out: dict[str, Any] = {"timed_steps": len(self.host)}
        if not self.host or self.window is None:
            return out
        seconds = self.window[1] - self.window[0]
        out["images_per_s"] = self.samples / seconds if seconds > 0 else None
        out["step_ms"] = 1e3 * seconds / len(self.host)
        waits = [s - e for (s, _), (_, e) in zip(self.host[1:], self.host[:-1])]
        computes = [e - s for s, e in self.host[1:]]
        if waits:
            out["data_wait_share"] = sum(waits) / max(sum(waits) + sum(computes), 1e-9)
        spans = [self._elapsed(m, "build_start", "build_end") for m in self.marks]
        totals = [self._elapsed(m, "build_start", "step_end") for m in self.marks]
        if all(v is not None for v in spans + totals) and spans:
            out["build_share"] = sum(spans) / max(sum(totals), 1e-9)  # type: ignore[arg-type]
            decode = [self._elapsed(m, "build_start", "decoded") for m in self.marks]
            if all(v is not None for v in decode):
                out["decode_share"] = sum(decode) / max(sum(totals), 1e-9)  # type: ignore[arg-type]
        if self.syncs:
            out["syncs_per_step"] = {"median": statistics.median(self.syncs), "max": max(self.syncs), "steps": len(self.syncs)}
            out["sync_sources"] = dict(sorted(self.sync_sources.items(), key=lambda kv: -kv[1])[:8])
        if self.sample_utilisation:
            out["gpu_utilisation"] = self.utilisation.summary() or {"problem": self.utilisation.problem or "no samples"}
        return out

    def _elapsed(self, marks: dict[str, Any], a: str, b: str) -> float | None:
        if a not in marks or b not in marks:
            return None
        if self.cuda:
            return marks[a].elapsed_time(marks[b]) / 1e3
        return marks[b] - marks[a]


def fit_fixed(
    settings: Settings, model: MultiTaskSSL, raw: dict[str, Any], steps: int, warmup: int, count_syncs: bool = False,
    extra_callbacks: list[pl.Callback] | None = None, **trainer_kwargs: Any,
) -> dict[str, Any]:
    """``steps`` training steps of ``model`` on the same ``raw`` batches; the clock's results plus the
    peak device memory (GiB; CUDA only)."""
    clock = StepClock(warmup=warmup, count_syncs=count_syncs)
    dm = TimedDataModule(fixed=raw, steps=steps, samplers=model.task_samplers(), num_workers=0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer(settings, max_steps=steps, callbacks=[clock, *(extra_callbacks or [])], **trainer_kwargs).fit(model, dm)
    out = clock.results()
    if torch.cuda.is_available():
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
