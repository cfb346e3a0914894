"""The `mtssl` LightningCLI: real fits from YAML, --print_config on every config, clear errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtssl_lightning import load_trunk
from mtssl_lightning.cli import run
from toy_tasks import TOY_CONFIG as TOY

ROOT = Path(__file__).resolve().parents[1]
# configs/base/ and configs/tasks/ hold fragments the experiments are built from (`_base_:`), not
# configs to run on their own (tasks/harmonized.yaml alone names no task class); test_configs.py
# checks them through the experiments.
FRAGMENT_DIRS = ("base", "tasks")
CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if p.relative_to(ROOT / "configs").parts[0] not in FRAGMENT_DIRS
)
PAPER_CONFIGS = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs" / "pretrain").glob("*.yaml"))
OVERLAYS = sorted((ROOT / "configs" / "distributed").glob("*.yaml"))


@pytest.fixture()
def toy_config(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TOY)
    return path


def test_fit_from_yaml_writes_a_checkpoint(tmp_path, toy_config):
    cli = run(["fit", "--config", str(toy_config), f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    trunk = load_trunk(ckpts[0])
    with torch.no_grad():
        out = trunk(torch.rand(1, 3, 64, 64))
    assert out.features.shape[1] == cli.model.trunk.out_channels


def test_unknown_key_is_named(toy_config, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(toy_config), "--model.trunk.init_args.dpeth=v2_50"])
    assert "dpeth" in capsys.readouterr().err


def test_wrong_type_is_named(toy_config, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(toy_config), "--data.num_workers=two"])
    assert "num_workers" in capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed
    # pretraining configs configure tasks; evaluation configs name their evaluation module
    assert "tasks:" in printed or "class_path: mtssl_lightning.evaluation." in printed


def test_console_script_runs(tmp_path, toy_config):
    """The installed `mtssl` entry point itself (a subprocess, as a user would run it)."""
    exe = Path(sys.executable).with_name("mtssl")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    env.pop("WANDB_MODE", None)
    result = subprocess.run(
        [str(exe), "fit", "--config", str(toy_config), f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mtssl: training finished." in result.stdout


def _short(tmp_path, *configs):
    """Run `mtssl fit` on real configs for a few steps, with every output under tmp_path."""
    # a copy of the whole configs/ tree, so that the experiments' `_base_` paths still lead to their fragments
    copies = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", copies)
    for copy in copies.rglob("*.yaml"):  # checkpoints, W&B and config under tmp_path
        copy.write_text(re.sub(r"runs/[A-Za-z0-9_]+", str(tmp_path), copy.read_text()))
    args = ["fit"]
    for config in configs:
        args += ["--config", str(copies / config)]
    args += [
        "--trainer.max_epochs=1", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--data.steps_per_epoch=3", "--data.val_samples=8",
        "--data.num_workers=0",
    ]
    return run(args)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", PAPER_CONFIGS)
def test_paper_configs_run_on_the_cpu_with_the_tiny_overlay(tmp_path, experiment, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = _short(tmp_path, experiment, "tiny.yaml")
    assert cli.trainer.global_step == 3
    assert cli.model.trunk.depth == "tiny"
    for task in cli.model.tasks.values():  # pixel sizes shrunk 4x from the paper's
        assert task.image_size <= 112


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_other_subcommands_run_from_a_checkpoint(tmp_path, subcommand):
    # two tasks, so that prediction goes through one loader per task
    second = "    other:\n      class_path: toy_tasks.Brightness\n      init_args: {batch_size: 2, image_size: 48}\n"
    toy_config = tmp_path / "toy2.yaml"
    first = "      init_args: {batch_size: 2, image_size: 32}\n"
    toy_config.write_text(TOY.replace(first, first + second))
    run(["fit", "--config", str(toy_config), f"--trainer.default_root_dir={tmp_path}"])
    ckpt = sorted(tmp_path.rglob("*.ckpt"))[0]
    cli = run([subcommand, "--config", str(toy_config), f"--trainer.default_root_dir={tmp_path / subcommand}", f"--ckpt_path={ckpt}"])
    if subcommand == "predict":
        bright, other = cli.trainer.predict_loop.predictions  # one list per task loader
        assert bright[0]["bright"].shape == (2,) and other[0]["other"].shape == (2,)
    else:
        assert "val/bright/loss" in cli.trainer.callback_metrics


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_distributed_overlays_compose_with_a_paper_config(overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(ROOT / "configs/pretrain/all.yaml"), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "strategy:" in printed and "devices: 8" in printed


def test_wandb_anonymous_workaround_still_needed_and_effective(tmp_path):
    """Lightning 2.6's WandbLogger always passes ``anonymous`` to ``wandb.init`` (W&B then warns on every
    run); ``quiet_unset_wandb_anonymous`` removes it when unset. If Lightning stops storing its init
    arguments in ``_wandb_init`` or stops passing ``anonymous``, this fails: drop the workaround then."""
    from lightning.pytorch.loggers import WandbLogger

    from mtssl_lightning.cli import quiet_unset_wandb_anonymous

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert logger._wandb_init["anonymous"] is None  # what Lightning does today
    quiet_unset_wandb_anonymous(logger)
    assert "anonymous" not in logger._wandb_init
    chosen = WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True)
    quiet_unset_wandb_anonymous(chosen)
    assert chosen._wandb_init["anonymous"] == "allow"  # a user's own choice is kept
