"""Task-parallel ranks computing at the same time: ``combine: concurrent`` against ranks taking turns.

4 gloo processes on the CPU, 2 tasks (a: ranks 0–1, b: ranks 2–3), a tiny trunk; task a's forward
is made slow by ``--slow`` seconds of sleep, task b's by ``--fast`` — the sleep stands for device
time (a GPU busy with the task's kernels while its host process waits), so the measurement shows
the schedule, not how fast two shared CPU cores can compute four processes' work at once.

* ``concurrent`` (the new scheme): every rank runs its task's forward and backward at once, then
  one bucketed all-reduce; a step should take about the *slowest* task's time.
* ``alternate`` (the ranks-take-turns schedule that task-parallel training had for every mode
  before): each task's forward and backward, then its all-reduce, one task after the other; the
  ranks of the other task wait in the collective, so a step takes about the *sum* of the tasks' times.

Milliseconds per training step on rank 0 (``on_train_batch_start`` → ``on_train_batch_end``, which
includes the collectives and so waits for the slowest rank), median over the steps after warm-up.

    .venv/bin/python benchmarks/bench_task_parallel.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from _report import command_line, machine, publish

ROOT = Path(__file__).resolve().parents[1]
# this checkout's package (not whichever one the environment has installed), and the toy
# regression task the distributed tests use; spawned ranks inherit sys.path
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from toy_tasks import Brightness  # noqa: E402

from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL  # noqa: E402
from mtssl_lightning.distributed import TaskParallelStrategy  # noqa: E402
from mtssl_lightning.trunks import ResNetV2  # noqa: E402

SECTION = "bench_task_parallel"
TASK_RANKS = {"a": [0, 1], "b": [2, 3]}


class SlowBrightness(Brightness):
    """The toy task whose forward sleeps ``delay`` seconds in training (device time stand-in)."""

    def __init__(self, delay: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.delay = delay

    def forward(self, features, batch):
        if self.training:
            time.sleep(self.delay)
        return super().forward(features, batch)


class StepTimes(pl.Callback):
    """Rank 0's wall time of each training step, written to ``path`` as JSON at the end."""

    def __init__(self, path: str) -> None:
        self.path, self.times, self._start = path, [], 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(1000 * (time.perf_counter() - self._start))

    def on_fit_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.times))


def _sgd(params):
    return torch.optim.SGD(params, lr=1e-3)


def time_mode(combine: str, slow: float, fast: float, steps: int, out: Path) -> list[float]:
    """Milliseconds of each training step of one 4-process task-parallel fit."""
    torch.manual_seed(0)
    tasks = {"a": SlowBrightness(slow, batch_size=4, image_size=32), "b": SlowBrightness(fast, batch_size=4, image_size=32)}
    model = MultiTaskSSL(tasks=tasks, trunk=ResNetV2("tiny", width=0.125), combine=combine, optimizer=_sgd, grad_norm_every_n_steps=0)
    path = out / f"{combine}.json"
    trainer = pl.Trainer(
        accelerator="cpu", devices=4, strategy=TaskParallelStrategy(TASK_RANKS, start_method="spawn"), max_steps=steps,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[StepTimes(str(path))],
    )
    trainer.fit(model, MultiTaskDataModule(steps_per_epoch=4 * steps, val_samples=4, num_workers=0))
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow", type=float, default=0.6, help="seconds of task a's forward (sleep)")
    parser.add_argument("--fast", type=float, default=0.2, help="seconds of task b's forward (sleep)")
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first --warmup are not counted)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for combine in ("alternate", "concurrent"):
            times = time_mode(combine, args.slow, args.fast, args.steps, Path(tmp))[args.warmup:]
            medians[combine] = statistics.median(times)
            print(f"{combine}: {medians[combine]:.0f} ms/step over {len(times)} steps", flush=True)
    slow, total = 1000 * args.slow, 1000 * (args.slow + args.fast)
    ratio = medians["concurrent"] / medians["alternate"]
    body = "\n".join([
        "## Task-parallel ranks at the same time: `combine: concurrent` against ranks taking turns",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine()}.",
        "",
        "4 gloo processes (task a on ranks 0–1, b on 2–3), tiny ResNet-v2 × 0.125 trunk, 4 images per rank; each "
        f"task's training forward sleeps ({args.slow:.2f} s for a, {args.fast:.2f} s for b) to stand for device time, "
        "so the table shows the schedule rather than how two shared CPU cores split four processes' arithmetic. "
        "Rank 0's milliseconds per training step (collectives included), median over "
        f"{args.steps - args.warmup} steps after {args.warmup} warm-up steps.",
        "",
        "| schedule | ms/step | slowest task's sleep | sum of the tasks' sleeps |",
        "|---|---:|---:|---:|",
        f"| `alternate` (ranks take turns: the old task-parallel schedule) | {medians['alternate']:.0f} | {slow:.0f} | {total:.0f} |",
        f"| `concurrent` (every rank at once, one bucketed all-reduce) | {medians['concurrent']:.0f} | {slow:.0f} | {total:.0f} |",
        "",
        f"**concurrent / alternate = {ratio:.2f}** (ideal with these sleeps, compute and communication aside: "
        f"{slow / total:.2f}). The concurrent step tracks the slowest task; the alternating one the sum.",
    ])
    publish(body, SECTION, write=not args.no_write)


if __name__ == "__main__":
    main()
