"""Every fit's validation curves start at the untrained model (``ValidateBeforeTraining``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from run_configs import config_under, ended_runs

from mtssl_lightning.callbacks import ValidateBeforeTraining
from mtssl_lightning.cli import run
from mtssl_lightning.wandb_offline import read_history

ROOT = Path(__file__).resolve().parents[1]


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs/pretrain/rp_col.yaml"), "--config", str(config_under(tmp_path, "tiny.yaml")),
        "--trainer.enable_progress_bar=false", "--data.steps_per_epoch=3", "--data.val_samples=16",
        "--data.num_workers=0", "--trainer.max_epochs=1", "--seed_everything=3", *extra,
    ]


def test_a_fit_logs_the_untrained_validation_at_step_0_and_trains_the_same_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # the reference: `mtssl validate` on the same config and seed (same initial weights, same validation inputs)
    untrained = run(["validate", *_args(tmp_path, "--trainer.logger=false")]).trainer.callback_metrics
    fit = run(["fit", *_args(tmp_path)])
    [run_dir] = ended_runs(tmp_path)
    rows = [row for row in read_history(run_dir) if "val/rp/loss" in row]
    steps = [row["trainer/global_step"] for row in rows]
    assert len(steps) == 2 and steps[0] == 0 < steps[1], steps  # before training, after the epoch
    for key in ("val/rp/loss", "val/rp/accuracy", "val/col/ce", "val/col/loss"):
        assert rows[0][key] == pytest.approx(float(untrained[key]), rel=1e-5), key
    assert rows[1]["val/col/ce"] != pytest.approx(rows[0]["val/col/ce"], rel=1e-4)  # it trained in between

    # the pass leaves the run's random state alone: without it, the same weights after the same steps
    off = run(["fit", *_args(tmp_path / "off", "--trainer.logger=false"), "--trainer.callbacks+=mtssl_lightning.callbacks.ValidateBeforeTraining", "--trainer.callbacks.enabled=false"])
    [callback] = [c for c in off.trainer.callbacks if isinstance(c, ValidateBeforeTraining)]
    assert not callback.enabled  # the config's own, turned off: `mtssl` added no second one
    weights, reference = fit.model.state_dict(), off.model.state_dict()
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)


class SanityChecks(Callback):
    """Counts Lightning's sanity checks (a config adds it as ``test_validate_first.SanityChecks``)."""

    def __init__(self) -> None:
        self.count = 0

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.count += 1


def _sanity_checks(cli: LightningCLI) -> int:
    [counter] = [c for c in cli.trainer.callbacks if isinstance(c, SanityChecks)]
    return counter.count


def test_the_pass_replaces_the_sanity_check_unless_the_fit_resumes(tmp_path):
    # from scratch: the pass before the first step validates every batch, the 2-batch sanity check before it is skipped
    counted = ["--trainer.logger=false", "--trainer.callbacks+=test_validate_first.SanityChecks", "--trainer.num_sanity_val_steps=2"]
    fresh = run(["fit", *_args(tmp_path, *counted)])
    assert _sanity_checks(fresh) == 0
    [last] = tmp_path.rglob("last.ckpt")
    # without the pass, Lightning's own sanity check runs as usual
    off = ["--trainer.callbacks+=mtssl_lightning.callbacks.ValidateBeforeTraining", "--trainer.callbacks.enabled=false"]
    assert _sanity_checks(run(["fit", *_args(tmp_path / "off", *counted, *off)])) == 1
    # resuming: no pass (the curve has its start), so the sanity check stays
    resumed = run(["fit", *_args(tmp_path / "resumed", *counted, "--trainer.max_epochs=2", f"--ckpt_path={last}")])
    assert resumed.trainer.global_step == 6 and _sanity_checks(resumed) == 1
