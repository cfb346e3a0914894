"""Runs of committed configs in a test's own folder: the config rewritten to write there, and the
offline W&B run folders read back once W&B has written them."""

from __future__ import annotations

import re
from pathlib import Path

from mtssl_lightning.wandb_offline import wait_until_finished

ROOT = Path(__file__).resolve().parents[1]


def config_under(folder: Path, config: str) -> Path:
    """``configs/<config>`` copied into ``folder`` with its outputs (``runs/<name>``: checkpoints,
    W&B files) moved to ``folder``. For configs without ``_base_`` (their bases are found relative
    to the file, so an experiment config must stay in place)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(config).name
    path.write_text(re.sub(r"runs/[A-Za-z0-9_]+", str(folder), (ROOT / "configs" / config).read_text()))
    return path


def ended_runs(folder: Path) -> list[Path]:
    """Finish this process's W&B run, then the offline run folders under ``folder/wandb`` (oldest
    first), each once W&B has written its run file to the end (:func:`wait_until_finished`)."""
    import wandb

    wandb.finish()
    return [wait_until_finished(run_dir) for run_dir in sorted((folder / "wandb").glob("offline-run-*"))]
