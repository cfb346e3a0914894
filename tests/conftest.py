"""Shared test set-up: never touch the network, close W&B runs between tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """Each in-process `mtssl fit` gets its own W&B run (wandb keeps one global run otherwise), and
    the W&B variables `mtssl` writes into os.environ (WANDB_MODE, WANDB_DIR) end with the test."""
    written = ("WANDB_MODE", "WANDB_DIR")  # only those: W&B keeps its own service's address in os.environ too
    saved = {key: os.environ.get(key) for key in written}
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
