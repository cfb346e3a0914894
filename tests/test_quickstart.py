"""`make quickstart` shows every task learning, on its own offline W&B run read back.

The quickstart is a researcher's first look at the project, and its dashboard is what they see.
This test runs ``configs/quickstart.yaml`` as committed (full length; only its outputs moved under
``tmp_path`` and the progress bar off), reads the validation rows back from the run's offline W&B
file, and checks every task's last epoch against its first epoch and against a no-learning
reference. The untrained trunk's figures come from ``mtssl validate`` on the same config: the same
seed, so the same initial weights and the same validation crops.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from seeds import learning_seed

from mtssl_lightning.cli import run
from mtssl_lightning.wandb_offline import read_history

ROOT = Path(__file__).resolve().parents[1]
CHANCE_RP = 1 / 8  # eight relative positions


def quickstart_config(tmp_path: Path) -> Path:
    """``configs/quickstart.yaml`` with every output (checkpoints, W&B run) under ``tmp_path``."""
    path = tmp_path / "quickstart.yaml"
    path.write_text(re.sub(r"runs/quickstart", str(tmp_path), (ROOT / "configs" / "quickstart.yaml").read_text()))
    return path


def validation_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's validation rows (one per epoch, ``val/...`` keys), in epoch order."""
    return sorted((row for row in read_history(run_dir) if "val/rp/accuracy" in row), key=lambda row: row["epoch"])


@pytest.mark.slow
def test_quickstart_dashboard_shows_every_task_learning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every task's last validation figure beats its first and its no-learning reference.

    Measured over seeds 0–4 (``MTSSL_LEARNING_SEED`` → ``--seed_everything``, 2 CPU cores), first →
    last epoch (README, "What `make quickstart` does"):

    * relative position accuracy (chance 0.125): first 0.133–0.190, last 0.180–0.213, last − first
      +0.023 to +0.058;
    * colorization: the unweighted ``ce`` falls by 0.28–0.50 (to 3.33–3.44; the prior guess scores
      3.33 on these photos, see README); the rebalanced ``loss`` ends 0.82–1.06 below the prior
      guess's ``loss_prior`` (same weights, same moment);
    * exemplar view retrieval: last − untrained +0.023 to +0.121, last − first +0.078 to +0.190;
    * motion segmentation IoU: last 1.86–2.13× the best constant's (0.029), last − untrained +0.025
      to +0.055 (last − first −0.003 to +0.035: not asserted).

    The bounds below lie outside those spreads.
    """
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    common = ["--config", str(quickstart_config(tmp_path)), "--trainer.enable_progress_bar=false", f"--seed_everything={learning_seed()}"]
    untrained = {k: float(v) for k, v in run(["validate", *common, "--trainer.logger=false"]).trainer.callback_metrics.items()}
    run(["fit", *common])
    wandb.finish()  # flush the run file
    [run_dir] = sorted((tmp_path / "wandb").glob("offline-run-*"))
    rows = validation_rows(run_dir)
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3, 4]
    first, last = rows[0], rows[-1]
    seen = {key: (untrained.get(key), first[key], last[key]) for key in first if key.startswith("val/")}
    print("\nquickstart validation (untrained, first epoch, last epoch):", seen)

    # relative position: well above chance, and above the first epoch
    assert last["val/rp/accuracy"] > max(CHANCE_RP + 0.03, first["val/rp/accuracy"]), seen
    # colorization: the unweighted cross-entropy (a lower-is-better curve) falls; the task's own
    # rebalanced loss lies below always guessing the training prior (scored with the same weights)
    assert last["val/col/ce"] < first["val/col/ce"] - 0.15, seen
    assert last["val/col/loss"] < last["val/col/loss_prior"] - 0.4, seen
    # exemplar: nearest-view retrieval above the same trunk untrained, and above the first epoch
    assert last["val/ex/retrieval_acc"] > max(untrained["val/ex/retrieval_acc"], first["val/ex/retrieval_acc"] + 0.03), seen
    # motion segmentation: IoU of the moving class above the best constant prediction's and the untrained trunk's
    assert last["val/ms/iou"] > max(1.4 * last["val/ms/iou_constant"], untrained["val/ms/iou"] + 0.01), seen
