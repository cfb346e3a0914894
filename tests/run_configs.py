"""Committed configs, rewritten so that a test's run writes everything under its own folder."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config_under(folder: Path, config: str) -> Path:
    """``configs/<config>`` copied into ``folder`` with its outputs (``runs/<name>``: checkpoints,
    W&B files) moved to ``folder``. For configs without ``_base_`` (their bases are found relative
    to the file, so an experiment config must stay in place)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(config).name
    path.write_text(re.sub(r"runs/[A-Za-z0-9_]+", str(folder), (ROOT / "configs" / config).read_text()))
    return path
