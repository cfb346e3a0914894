"""Fixtures shared by the evaluation tests (the writers they use are in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.helpers import export_tiny_trunk, write_voc


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """A VOC2007 folder (``helpers.IMAGES``, ``helpers.SPLITS``) written once per test module."""
    return write_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def trunk_export(tmp_path_factory) -> Path:
    """A random tiny trunk (seed 0) exported once per test module."""
    return export_tiny_trunk(tmp_path_factory.mktemp("trunk") / "trunk.pt")
