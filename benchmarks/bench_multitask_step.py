"""Multi-task orchestration overhead: one multi-task step against the sum of single-task steps.

For the four tasks with quickstart-like settings (ResNet-v2-26 at width 0.25), fixed
pre-built task batches (the input builders are not timed; ``bench_input_pipeline.py`` covers
them), and one optimizer step each:

* **single** — for each task, a :class:`~mtssl_lightning.MultiTaskSSL` with only that task:
  ``training_step`` (trunk, head, loss), backward, optimizer step; the sum over the tasks;
* **sum** — the four-task module, ``combine: sum`` (one backward of the weighted sum, one step);
* **alternate** — the four-task module, ``combine: alternate`` (the paper's scheme: per task a
  backward and a step of its own optimizer), driven like Lightning's manual optimization;
* both with ``mixing: lasso`` as well (units mixed per task).

The ratio multi / Σ single is the orchestration overhead (target ≤ 1.05). Memory: the bytes of
the tensors autograd holds for backward at the peak of a step (distinct storages, counted with
``torch.autograd.graph.saved_tensors_hooks``; all tasks' graphs at once in sum mode, one task's
at a time in alternate mode), and on CUDA also ``torch.cuda.max_memory_allocated``. Medians
over repeats.
Run from the repository root::

    .venv/bin/python benchmarks/bench_multitask_step.py

It prints a table and writes it to its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from _report import bar_chart, command_line, machine, publish
from mtssl_lightning import MultiTaskSSL
from mtssl_lightning.data.batch import ClipBatch, ImageBatch
from mtssl_lightning.data.datasets import CropDataset
from mtssl_lightning.data.sources import SampleImages
from mtssl_lightning.data.clips import ClipDataset
from mtssl_lightning.data.video import SampleVideos
from mtssl_lightning.tasks import Colorization, Exemplar, MotionSegmentation, RelativePosition
from mtssl_lightning.trunks import ResNetV2

SECTION = "bench_multitask_step"
TASKS = ("rp", "col", "ex", "ms")


def make_tasks() -> dict:
    return {
        "rp": RelativePosition(batch_size=16, patch_size=32, gap=8, jitter=3, pairs="all", colour="drop", hidden=256),
        "col": Colorization(batch_size=16, image_size=96, head_channels=64),
        "ex": Exemplar(batch_size=8, image_size=96, views=4, view_size=64, hidden=256),
        "ms": MotionSegmentation(batch_size=8, image_size=96, head_channels=64),
    }


def make_model(names: tuple[str, ...], combine: str, mixing: str, device: torch.device) -> MultiTaskSSL:
    torch.manual_seed(0)
    tasks = {n: t for n, t in make_tasks().items() if n in names}
    model = MultiTaskSSL(tasks, trunk=ResNetV2("v2_26", width=0.25), combine=combine, mixing=mixing).to(device)
    model.log = model.log_dict = lambda *a, **k: None  # no Trainer: logging is not what is timed
    return model


def make_batches(device: torch.device) -> dict:
    """Fixed raw batches per task (sample photos / sample video), built once by each task."""
    tasks = make_tasks()
    raw = {}
    for name, task in tasks.items():
        request = task.data_request()
        if request.source == "videos":
            ds = ClipDataset(SampleVideos("train"), request.image_size, request.clip_length, request.frame_stride, length=request.batch_size, train=False)
            raw[name] = ClipBatch.collate([ds[i] for i in range(request.batch_size)])
        else:
            ds = CropDataset(SampleImages("train"), request.image_size, length=request.batch_size, train=False)
            raw[name] = ImageBatch.collate([ds[i] for i in range(request.batch_size)])
    torch.manual_seed(1)
    with torch.no_grad():
        built = {name: tasks[name].to(device).prepare(_to(raw[name], device)) for name in tasks}
    return built


def _to(batch, device):
    if isinstance(batch, ClipBatch):
        return ClipBatch(batch.clips.to(device), batch.index, batch.start, batch.masks)
    return ImageBatch(batch.images.to(device), batch.index)


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, while :meth:`track` is active."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        self.peak = 0

    @contextmanager
    def track(self):
        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def backward_point(self) -> None:
        """Called just before a backward pass: everything saved so far is alive now."""
        self.peak = max(self.peak, sum(self.storages.values()))
        self.storages.clear()


def one_step(model: MultiTaskSSL, optimizers: list[torch.optim.Optimizer], batch: dict, saved: SavedBytes | None = None) -> None:
    """A training step as Lightning runs it: automatic (sum) or the module's alternate loop."""
    saved = saved or SavedBytes()
    names = list(model.tasks)
    if model.combine == "sum":
        optimizers[0].zero_grad(set_to_none=True)
        with saved.track():
            loss = model.training_step({n: batch[n] for n in names}, 0)
        saved.backward_point()
        loss.backward()
        optimizers[0].step()
        return
    for i, name in enumerate(names):
        optimizers[i].zero_grad(set_to_none=True)
        with saved.track():
            loss = model.task_loss(name, batch[name], "train")
            penalty = model.penalty([name])
        saved.backward_point()
        (loss if penalty is None else loss + penalty).backward()
        optimizers[i].step()


def optimizers_of(model: MultiTaskSSL) -> list[torch.optim.Optimizer]:
    configured = model.configure_optimizers()
    configured = configured if isinstance(configured, list) else [configured]
    return [c["optimizer"] if isinstance(c, dict) else c for c in configured]


class Runner:
    """One configuration, ready to step: the model, its optimizers, the peak of saved bytes."""

    def __init__(self, names: tuple[str, ...], combine: str, mixing: str, batch: dict, device: torch.device) -> None:
        self.model = make_model(names, combine, mixing, device).train()
        self.optimizers = optimizers_of(self.model)
        self.batch, self.device = batch, device
        self.saved = SavedBytes()
        self.cuda_peak: int | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        one_step(self.model, self.optimizers, batch, self.saved)
        if device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated(device)

    def seconds(self) -> float:
        """Wall time of one step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        one_step(self.model, self.optimizers, self.batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = make_batches(device)
    mib = lambda b: "–" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    rows = []
    for mixing in ("naive", "lasso"):
        singles = [Runner((n,), "sum", mixing, batch, device) for n in TASKS]
        multis = {c: Runner(TASKS, c, mixing, batch, device) for c in ("sum", "alternate")}
        for _ in range(args.warmup):
            for runner in [*singles, *multis.values()]:
                runner.seconds()
        # interleaved rounds: each round times every single-task step and each multi-task step
        # back to back, so load changes on a shared machine hit both sides of a ratio alike
        rounds = [
            ({c: m.seconds() for c, m in multis.items()}, sum(r.seconds() for r in singles)) for _ in range(args.repeats)
        ]
        for combine, multi in multis.items():
            ratios = [m[combine] / single for m, single in rounds]
            rows.append((
                mixing, combine, 1e3 * statistics.median(m[combine] for m, _ in rounds),
                1e3 * statistics.median(single for _, single in rounds), statistics.median(ratios),
                min(ratios), max(ratios), mib(multi.saved.peak), mib(sum(r.saved.peak for r in singles)),
                mib(max(r.saved.peak for r in singles)), mib(multi.cuda_peak),
                mib(None if device.type != "cuda" else max(r.cuda_peak for r in singles)),
            ))
            print(rows[-1], flush=True)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name() if cuda else "the CPU (no CUDA device)"
    lines = [
        "## Multi-task step: orchestration overhead and peak memory",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine()}. On {where}.",
        "",
        "Four tasks (RP 16 images of 118² → 288 patches of 32², Col 16 × 96², Ex 8 images × 4 views of "
        "64², MS 8 clips × 96²), ResNet-v2-26 at width 0.25, fixed pre-built batches, RMSprop; median of "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up (ratio: median and range of the "
        "per-round ratios). *Σ single* = sum of the four one-task modules' steps on the same batches. *Saved for backward*: MiB of distinct storages autograd holds at the "
        "peak of a step (multi-task; the sum and the largest of the single-task steps); CUDA peak: "
        "`torch.cuda.max_memory_allocated` (– on the CPU).",
        "",
        "| mixing | combine | multi-task step ms | Σ single steps ms | **ratio** (target ≤ 1.05) | saved MiB multi | saved MiB Σ single | saved MiB largest single | CUDA peak MiB multi | CUDA peak MiB largest single |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {m} | {c} | {a:.0f} | {b:.0f} | **{r:.3f}** ({lo:.2f}–{hi:.2f}) | {s1} | {s2} | {s3} | {c1} | {c2} |"
        for m, c, a, b, r, lo, hi, s1, s2, s3, c1, c2 in rows
    ]
    lines += ["", bar_chart(
        "multitask_step",
        [f"{row[0]} mixing, {row[1]}" for row in rows],
        [row[4] for row in rows],
        "Four-task step time / Σ single-task step times",
        "ratio (median; bars: range over rounds)",
        low=[row[5] for row in rows], high=[row[6] for row in rows], reference=1.05, reference_label="target ≤ 1.05", write=not args.no_write,
    )]
    body = "\n".join(lines) + "\n"
    publish(body, SECTION, write=not args.no_write)


if __name__ == "__main__":
    main()
