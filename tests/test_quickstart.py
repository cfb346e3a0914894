"""`make quickstart` shows every task learning, on its own offline W&B run read back.

The quickstart is a researcher's first look at the project, and its dashboard is what they see.
This test runs ``configs/quickstart.yaml`` as committed (full length; only its outputs moved under
``tmp_path`` and the progress bar off), reads the validation rows back from the run's offline W&B
file, and checks every task's last validation against its first and against a no-learning
reference. The first row is the untrained trunk's, at step 0 (``ValidateBeforeTraining``, which
every ``mtssl fit`` has); the next one is after the first epoch. It also checks what a new user
relies on after the run: W&B offline without any W&B set-up, and a checkpoint that loads as a trunk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from run_configs import config_under, ended_runs
from seeds import learning_seed

from mtssl_lightning import load_trunk
from mtssl_lightning.cli import run
from mtssl_lightning.wandb_offline import read_history

CHANCE_RP = 1 / 8  # eight relative positions


def validation_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's validation rows (``val/...`` keys), in step order: step 0 (untrained), then one per epoch."""
    return sorted((row for row in read_history(run_dir) if "val/rp/accuracy" in row), key=lambda row: row["trainer/global_step"])


@pytest.mark.slow
def test_quickstart_dashboard_shows_every_task_learning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every task's last validation figure beats its first (the untrained trunk's) and its no-learning reference.

    Measured over seeds 0–4 (``MTSSL_LEARNING_SEED`` → ``--seed_everything``, 2 CPU cores),
    untrained / after epoch 1 / after epoch 5 (README, "What `make quickstart` does"):

    * relative position accuracy (chance 0.125): untrained 0.123–0.137, epoch 1 0.133–0.190,
      last 0.180–0.213; last − epoch 1 +0.023 to +0.058;
    * colorization: the unweighted ``ce`` goes 8.6–17.4 → 3.73–3.95 → 3.33–3.44 (last − epoch 1
      −0.28 to −0.50; the prior guess scores 3.33 on these photos, see README); the rebalanced
      ``loss`` ends 0.82–1.06 below the prior guess's ``loss_prior`` (same weights, same moment);
    * exemplar view retrieval: untrained 0.430–0.523, last 0.504–0.590; last − untrained +0.023
      to +0.121, last − epoch 1 +0.078 to +0.190;
    * motion segmentation IoU: untrained 0.006–0.029, last 0.054–0.062 = 1.86–2.13× the best
      constant's (0.029); last − untrained +0.025 to +0.055 (last − epoch 1 −0.003 to +0.035: not
      asserted).

    The bounds below lie outside those spreads. The run is the one ``make quickstart`` does, so the
    test also checks what a new user relies on afterwards: W&B offline without any W&B set-up, and
    a last checkpoint that loads as a trunk.
    """
    monkeypatch.delenv("WANDB_MODE", raising=False)  # no W&B set-up at all: the run must go offline by itself
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run(["fit", "--config", str(config_under(tmp_path, "quickstart.yaml")), "--trainer.enable_progress_bar=false", f"--seed_everything={learning_seed()}"])
    assert os.environ["WANDB_MODE"] == "offline"
    [run_dir] = ended_runs(tmp_path)
    rows = validation_rows(run_dir)
    assert len(rows) == 6 and rows[0]["trainer/global_step"] == 0, [row["trainer/global_step"] for row in rows]
    untrained, epoch1, last = rows[0], rows[1], rows[-1]
    seen = {key: (untrained[key], epoch1[key], last[key]) for key in untrained if key.startswith("val/")}
    print("\nquickstart validation (untrained, epoch 1, last epoch):", seen)

    # relative position: well above chance, above the untrained trunk and above epoch 1
    assert last["val/rp/accuracy"] > max(CHANCE_RP + 0.03, untrained["val/rp/accuracy"], epoch1["val/rp/accuracy"]), seen
    # colorization: the unweighted cross-entropy (a lower-is-better curve) falls, also after epoch 1;
    # the task's own rebalanced loss lies below always guessing the training prior (same weights)
    assert last["val/col/ce"] < min(untrained["val/col/ce"], epoch1["val/col/ce"] - 0.15), seen
    assert last["val/col/loss"] < last["val/col/loss_prior"] - 0.4, seen
    # exemplar: nearest-view retrieval above the same trunk untrained, and above epoch 1
    assert last["val/ex/retrieval_acc"] > max(untrained["val/ex/retrieval_acc"], epoch1["val/ex/retrieval_acc"] + 0.03), seen
    # motion segmentation: IoU of the moving class above the best constant prediction's and the untrained trunk's
    assert last["val/ms/iou"] > max(1.4 * last["val/ms/iou_constant"], untrained["val/ms/iou"] + 0.01), seen

    # the checkpoint a user goes on with: v2_26 at width 0.25, block 3 = 2 units of 256 channels, stride 16
    trunk = load_trunk(tmp_path / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        out = trunk(torch.rand(2, 3, 224, 224))
    assert out.features.shape == (2, 256, 14, 14)
    assert len(out.units) == 2 and all(u.shape == (2, 256, 14, 14) for u in out.units)
