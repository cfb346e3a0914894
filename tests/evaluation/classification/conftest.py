"""Warnings the classification tests provoke on purpose."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen trunk, on purpose
    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")
