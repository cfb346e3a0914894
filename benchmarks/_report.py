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


def publish(body: str, section: str, output: Path = DEFAULT_OUTPUT, write: bool = True) -> None:
    """Print a benchmark's Markdown section and (``write``) put it into ``output``."""
    print(body)
    if write:
        write_section(output, section, body)
        print(f"wrote {output}")


def bar_chart(
    name: str,
    labels: list[str],
    values: list[float],
    title: str,
    xlabel: str,
    low: list[float] | None = None,
    high: list[float] | None = None,
    reference: float | None = None,
    reference_label: str = "",
    log: bool = False,
    output: Path = DEFAULT_OUTPUT,
    write: bool = True,
) -> str:
    """Draw a horizontal bar chart to ``<output's folder>/img/<name>.png`` and return the Markdown
    that shows it (relative to ``output``). ``low``/``high``: the range drawn as error bars;
    ``reference``: a vertical line (e.g. 1.0 for ratios, or a target); ``write=False`` (a
    benchmark's ``--no-write``) draws nothing and only returns the Markdown."""
    path = output.parent / "img" / f"{name}.png"
    markdown = f"![{title}]({os.path.relpath(path, output.parent)})"
    if not write:
        return markdown
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.4), dpi=110)
    positions = list(range(len(labels)))[::-1]
    errors = None
    if low is not None and high is not None:
        errors = [[v - lo for v, lo in zip(values, low)], [hi - v for v, hi in zip(values, high)]]
    ax.barh(positions, values, xerr=errors, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(positions, labels, fontsize=8)
    if reference is not None:
        ax.axvline(reference, color="tab:red", linestyle="--", linewidth=1, label=reference_label or None)
        if reference_label:
            ax.legend(fontsize=8, loc="lower right")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return markdown
