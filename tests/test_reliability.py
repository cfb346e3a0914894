"""Reliability: bad configuration fails early and clearly, pre-emption saves and resumes,
checkpoint writes are atomic, runs are deterministic on the CPU.

(Bad images and videos: tests/data/test_sources.py and tests/data/test_video.py; non-finite
losses and exact resume: tests/test_multitask.py; safe trunk loading: tests/test_pretrain.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mtssl_lightning.cli import run
from toy_tasks import TOY_CONFIG

ROOT = Path(__file__).resolve().parents[1]

# the toy config plus checkpoints and outputs under the test's folder
OUTPUTS = """
trainer:
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true}}
"""


@pytest.fixture()
def toy(tmp_path):
    """``--config`` arguments: the toy config, then checkpoints and outputs under ``tmp_path``."""
    (tmp_path / "toy.yaml").write_text(TOY_CONFIG)
    (tmp_path / "outputs.yaml").write_text(OUTPUTS.format(root=tmp_path))
    return ["--config", str(tmp_path / "toy.yaml"), "--config", str(tmp_path / "outputs.yaml")]


def _image_folder(path: Path) -> Path:
    path.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 10)).save(path / f"{i}.png")
    return path


# ------------------------------------------------------------------------- bad configuration
# Each case: extra arguments, the exception type (SystemExit = jsonargparse's usage error on
# stderr), and words the message must contain: the setting at fault and the way out.
BAD_CONFIGS = {
    "unknown key": (["--model.trunk.init_args.dpeth=v2_50"], SystemExit, ["dpeth"]),
    "wrong type": (["--data.num_workers=two"], SystemExit, ["num_workers", "two"]),
    "bad choice": (["--data.image_check=sometimes"], SystemExit, ["image_check", "sometimes"]),
    "empty task list": (["--model.tasks={}"], ValueError, ["model.tasks", "is empty", "configure at least one task"]),
    "patch grid larger than the image": (
        ["--model.tasks={rp: {class_path: mtssl_lightning.tasks.RelativePosition, init_args: {image_size: 64, patch_size: 32, gap: 8}}}"],
        ValueError, ["image_size=64", "too small", "set image_size >="],
    ),
    "video task without a video source": (
        ["--model.tasks={ms: {class_path: mtssl_lightning.tasks.MotionSegmentation, init_args: {batch_size: 2, image_size: 32}}}",
         "--data.image_root={images}"],
        ValueError, ["need videos", "data.video_root"],
    ),
    "missing image folder": (["--data.image_root={root}/nope"], FileNotFoundError, ["nope", "does not exist", "data.image_root"]),
    "checkpoint that does not exist": (["--ckpt_path={root}/nope.ckpt"], FileNotFoundError, ["nope.ckpt", "does not exist", "--ckpt_path last"]),
    "checkpoint that is not a checkpoint": (["--ckpt_path={root}/toy.yaml"], ValueError, ["toy.yaml", "not a PyTorch checkpoint"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_fails_before_training_naming_the_problem_and_the_fix(case, toy, tmp_path, capsys):
    extra, error, words = BAD_CONFIGS[case]
    images = _image_folder(tmp_path / "images")
    args = [a.replace("{root}", str(tmp_path)).replace("{images}", str(images)) for a in extra]
    with pytest.raises(error) as info:
        run(["fit", *toy, *args])
    message = capsys.readouterr().err if error is SystemExit else str(info.value)
    for word in words:
        assert word in message, (word, message[-2000:])
    assert not (tmp_path / "checkpoints").exists()  # no training step ran


# ---------------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(toy, tmp_path):
    """As on SLURM: SIGTERM to the whole process group (main process and DataLoader workers)."""
    marker = tmp_path / "step.txt"
    args = [
        "fit", *toy, "--trainer.max_steps=100000", "--data.steps_per_epoch=50", "--data.num_workers=2",
        "--trainer.callbacks+=toy_tasks.StepMarker", f"--trainer.callbacks.path={marker}", "--trainer.callbacks.delay=0.05",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    process = subprocess.Popen(
        [sys.executable, "-m", "mtssl_lightning.cli", *args], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 240
    while not (marker.exists() and marker.read_text() and int(marker.read_text()) >= 5):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training did not reach step 5"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    saved = tmp_path / "checkpoints" / "last.ckpt"
    assert "SIGTERM received; checkpoint of step" in output, output[-3000:]
    checkpoint = torch.load(saved, map_location="cpu", weights_only=True)
    step = checkpoint["global_step"]
    assert 5 <= step < 100000
    assert f"checkpoint of step {step} saved to {saved}" in output

    cli = run(["fit", *toy, f"--trainer.max_steps={step + 3}", "--ckpt_path=last"])
    assert cli.trainer.global_step == step + 3  # continued from the pre-emption checkpoint, not from 0
    assert cli.model._train_steps == step + 3


# ------------------------------------------------------------------------ atomic checkpoints
CRASH_DURING_SAVE = """
import os, signal, sys, torch
import fsspec.implementations.local as local
from lightning.pytorch.plugins.io import TorchCheckpointIO

write = local.LocalFileOpener.write
def crash_halfway(self, data):
    write(self, data[: len(data) // 2])
    self.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies in the middle of writing the file
local.LocalFileOpener.write = crash_halfway
TorchCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(100_000)}, "global_step": 2}, sys.argv[1])
"""


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(toy, tmp_path):
    cli = run(["fit", *toy])
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    before = last.read_bytes()
    # the same writer Lightning's Trainer.save_checkpoint uses, killed by SIGKILL halfway through
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH_DURING_SAVE), str(last)], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert last.read_bytes() == before
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2


# ------------------------------------------------------------------------------ determinism
@pytest.mark.slow
def test_two_runs_with_one_seed_give_the_same_losses(tmp_path):
    """The quickstart's four real tasks (tiny overlay), two DataLoader workers, fixed seed."""
    from toy_tasks import LossRecorder

    runs = []
    for attempt in range(2):
        cli = run([
            "fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / "configs/tiny.yaml"),
            "--trainer.max_steps=4", "--trainer.logger=false", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / str(attempt)}", "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]", "--trainer.callbacks+=toy_tasks.LossRecorder", "--data.num_workers=2",
        ])
        assert cli.trainer.global_step == 4
        recorder = next(c for c in cli.trainer.callbacks if isinstance(c, LossRecorder))
        runs.append(recorder.losses)
    first, second = runs
    assert len(first) == 4 and {f"train/{t}/loss_step" for t in ("rp", "col", "ex", "ms")} <= set(first[0])
    assert first == second  # bit-identical losses, step by step, every task
