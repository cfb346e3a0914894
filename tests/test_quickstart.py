"""``make quickstart`` learns: its own offline W&B run, read back, shows every task beating its first
validation and its no-learning reference (no mock, the quickstart's own config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb

from mtssl_lightning.cli import run
from mtssl_lightning.wandb_offline import read_history

ROOT = Path(__file__).resolve().parents[1]
#: per task: the validation figure, whether higher is better
FIGURES = {"rp": ("accuracy", True), "col": ("ce", False), "ex": ("retrieval_acc", True), "ms": ("iou", True)}


def _config(tmp_path: Path) -> Path:
    """The quickstart config with its outputs (runs/quickstart) moved into ``tmp_path``."""
    text = (ROOT / "configs/quickstart.yaml").read_text().replace("runs/quickstart", str(tmp_path))
    path = tmp_path / "quickstart.yaml"
    path.write_text(text)
    return path


def _epochs(run_dir: Path) -> list[dict[str, float]]:
    """The validation rows of the run, in order (one per epoch)."""
    return [row for row in read_history(run_dir) if "val/rp/accuracy" in row]


@pytest.mark.slow
def test_the_quickstart_run_shows_every_task_learning(tmp_path):
    """The whole quickstart (5 epochs of 75 steps, ~3 min on 2 cores). No-learning references:
    relative position's chance (1/8); colorization's ``ce_prior`` (always guessing the training
    colour prior, logged beside ``ce``); exemplar's retrieval with the untrained trunk (a
    ``validate`` run of the same config and seed before any training); motion segmentation's
    ``iou_constant`` (the best constant prediction). Margins and measured figures: see the
    README table "What make quickstart does"."""
    config = _config(tmp_path)
    untrained = run(["validate", "--config", str(config), "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    before = {k: float(v) for k, v in untrained.trainer.callback_metrics.items()}
    cli = run(["fit", "--config", str(config), "--trainer.enable_progress_bar=false"])
    wandb.finish()
    assert cli.trainer.current_epoch == 5
    [run_dir] = sorted((tmp_path / "wandb").glob("offline-run-*"))
    epochs = _epochs(run_dir)
    assert len(epochs) == 5, [sorted(e) for e in epochs]
    first, last = epochs[0], epochs[-1]
    for task, (name, higher) in FIGURES.items():
        key = f"val/{task}/{name}"
        sign = 1 if higher else -1
        assert sign * (last[key] - first[key]) > 0, (key, [e[key] for e in epochs])
    assert last["val/rp/accuracy"] > 0.125 + 0.06, [e["val/rp/accuracy"] for e in epochs]
    assert last["val/col/ce"] < last["val/col/ce_prior"] - 0.05, (last["val/col/ce"], last["val/col/ce_prior"])
    assert last["val/ex/retrieval_acc"] > before["val/ex/retrieval_acc"] + 0.05, (last["val/ex/retrieval_acc"], before)
    assert last["val/ms/iou"] > last["val/ms/iou_constant"] + 0.05, (last["val/ms/iou"], last["val/ms/iou_constant"])
