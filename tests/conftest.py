"""Shared test set-up: never touch the network, close W&B runs between tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """Each in-process `mtssl fit` gets its own W&B run (wandb keeps one global run otherwise)."""
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
