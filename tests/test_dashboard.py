"""The W&B dashboard of a run, read back from the offline run folder (no mock, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from run_configs import config_under, ended_runs

from mtssl_lightning.callbacks.dashboard import alpha_heatmap
from mtssl_lightning.cli import git_revision, run
from mtssl_lightning.wandb_offline import image_path, read_config, read_history, render_dashboard

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("rp", "col", "ex", "ms")
#: the picture each task logs (see each task's `pictures`)
PICTURES = {"rp": "pairs", "col": "colorization", "ex": "views", "ms": "masks"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests read the offline run folder back, whatever W&B set-up the machine has."""
    monkeypatch.setenv("WANDB_MODE", "offline")


def _fit(tmp_path: Path, *extra: str):
    # the experiment config stays in place: its `_base_` files are found relative to it
    return run([
        "fit", "--config", str(ROOT / "configs/pretrain/all_lasso.yaml"), "--config", str(config_under(tmp_path, "tiny.yaml")),
        "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--data.steps_per_epoch=2", "--data.val_samples=8", "--data.num_workers=0",
        "--model.init_args.grad_norm_every_n_steps=2",
        "--trainer.callbacks+=mtssl_lightning.callbacks.TrainingDashboard", "--trainer.callbacks.media_every_n_steps=2",
        *extra,
    ])


@pytest.mark.slow
def test_an_offline_run_holds_every_dashboard_metric_and_picture_and_a_resume_continues_it(tmp_path):
    cli = _fit(tmp_path, "--trainer.max_epochs=2")
    assert cli.trainer.global_step == 4
    [run_dir] = ended_runs(tmp_path)  # finished, as when the resumed run is a new process
    rows = read_history(run_dir)
    keys = set().union(*rows)
    expected = {"perf/samples_per_s", "perf/data_wait_share", "lasso/alpha_heatmap", "train/skipped_files"}
    for task in TASKS:
        expected |= {
            f"train/{task}/loss_step", f"val/{task}/loss", f"lr/{task}", f"grad_norm/{task}",
            f"lasso/{task}/alpha_00", f"media/{task}/{PICTURES[task]}",
        }
    expected |= {"val/rp/accuracy", "val/col/top_bin_acc", "val/ex/retrieval_acc", "val/ms/iou"}
    assert expected <= keys, sorted(expected - keys)
    for key in [k for k in keys if k.startswith("media/")] + ["lasso/alpha_heatmap"]:
        value = next(row[key] for row in rows if key in row)
        assert value["width"] > 16 and value["height"] > 16, (key, value)
        picture = run_dir / "files" / image_path(value)  # the PNG itself is in the run folder
        assert picture.is_file() and picture.stat().st_size > 100
    for row in rows:
        if "perf/data_wait_share" in row:
            assert 0.0 <= row["perf/data_wait_share"] <= 1.0 and row["perf/samples_per_s"] > 0
    # the lasso: every task starts from the same α (lasso_init: last) and reads its own mix after training
    last = {task: {} for task in TASKS}
    for row in rows:
        for key, value in row.items():
            if key.startswith("lasso/") and key.split("/")[1] in last and "/alpha_" in key:
                last[key.split("/")[1]][key] = value
    alphas = {task: np.array([v for _, v in sorted(last[task].items())]) for task in TASKS}
    assert all(len(a) > 1 for a in alphas.values()), alphas
    assert min(np.abs(alphas[a] - alphas[b]).max() for a in TASKS for b in TASKS if a < b) > 1e-4, alphas
    dashboard = render_dashboard(run_dir, tmp_path / "dashboard.png")
    assert dashboard.stat().st_size > 10_000
    config = read_config(run_dir)
    assert config["git_revision"] == git_revision()
    assert config["mtssl_config"]["model"]["init_args"]["mixing"] == "lasso"

    # resuming continues the same W&B run (same id), from the step it stopped at
    resumed = _fit(tmp_path, "--trainer.max_epochs=3", "--ckpt_path=last")
    assert resumed.trainer.global_step == 6
    first, second = ended_runs(tmp_path)
    assert first.name.rsplit("-", 1)[1] == second.name.rsplit("-", 1)[1] == resumed.trainer.logger.version
    steps = [row["trainer/global_step"] for row in read_history(second) if "trainer/global_step" in row]
    assert min(steps) >= 4


def test_alpha_heatmap_is_an_rgb_image_with_one_row_per_task():
    alpha = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, -1.0]])
    image = alpha_heatmap(alpha, ["rp", "col"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 50 and image.shape[1] > 50 and image.std() > 10  # not blank


#: each task's training metric (see each task's `make_metrics`)
METRICS = {"rp": "accuracy", "col": "top_bin_acc", "ex": "retrieval_acc", "ms": "iou"}


@pytest.mark.slow
def test_a_task_parallel_run_shows_every_task_on_the_dashboard(tmp_path):
    """2 gloo processes, rank 0 training RP and Col, rank 1 Ex and MS (combine: concurrent): rank 0's
    W&B run still holds every task's loss, training metric, trunk gradient norm and picture."""
    ranks = "{rp: [0], col: [0], ex: [1], ms: [1]}"
    _fit(
        tmp_path, "--trainer.max_epochs=1", "--trainer.devices=2", "--trainer.limit_val_batches=0",
        "--trainer.strategy=mtssl_lightning.distributed.TaskParallelStrategy",
        f"--trainer.strategy.task_ranks={ranks}", "--trainer.strategy.start_method=spawn",
        "--model.init_args.combine=concurrent", "--model.init_args.grad_norm_every_n_steps=1",
        "--trainer.callbacks.media_every_n_steps=1",
    )
    # the main process made the run (Lightning pickles the logger; each spawned rank attaches to it)
    [run_dir] = ended_runs(tmp_path)
    rows = read_history(run_dir)
    keys = set().union(*rows)
    expected = set()
    for task in TASKS:
        expected |= {f"train/{task}/loss_step", f"train/{task}/loss_epoch", f"train/{task}/{METRICS[task]}",
                     f"grad_norm/{task}", f"media/{task}/{PICTURES[task]}"}
    assert expected <= keys, sorted(expected - keys)
    for task in TASKS:  # a loss and a norm, not a placeholder: finite and positive
        losses = [row[f"train/{task}/loss_step"] for row in rows if f"train/{task}/loss_step" in row]
        norms = [row[f"grad_norm/{task}"] for row in rows if f"grad_norm/{task}" in row]
        assert losses and norms and all(0 < v < float("inf") for v in losses + norms), (task, losses, norms)
        value = next(row[f"media/{task}/{PICTURES[task]}"] for row in rows if f"media/{task}/{PICTURES[task]}" in row)
        assert value["width"] > 16 and value["height"] > 16, (task, value)
        picture = run_dir / "files" / image_path(value)  # written by a spawned rank, into the run's own folder
        assert picture.is_file() and picture.stat().st_size > 100, picture
