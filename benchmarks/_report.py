"""Shared by the benchmark scripts: the machine line and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch
import torchvision

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    """CPU count, platform, Python and torch versions, and the current load, for the tables."""
    return (
        f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} torch threads; "
        f"1-minute load average {os.getloadavg()[0]:.2f}"
    )


def command_line() -> str:
    """The command that ran this benchmark, with the interpreter path relative to the repo when possible."""
    python = os.path.relpath(sys.executable)
    return shlex.join([python if not python.startswith("..") else Path(sys.executable).name, *sys.argv])


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section ``<!-- name:start --> … <!-- name:end -->`` of ``path``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
