"""The notebooks in ``notebooks/``: committed without outputs, and each runs top to bottom.

Execution uses nbclient with a kernel spec written into a temporary ``JUPYTER_PATH`` whose
command is *this* interpreter (``sys.executable -m ipykernel_launcher``): the notebooks run
with the test's virtual environment whatever kernels the user has registered (a user's own
``python3`` kernel could point at another Python). The kernel inherits the environment, with
``WANDB_MODE=offline`` (the notebooks also turn the logger off), and starts in ``notebooks/``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "mtssl-test-python"


def test_the_notebooks_exist() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_task_tour.ipynb", "02_run_analysis.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebooks_have_no_outputs(path: Path) -> None:
    """Outputs are stripped before committing (no images, no stale numbers in the diffs)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
        assert "attachments" not in cell or not cell.attachments, f"{path.name} cell {index} has attachments"


@pytest.fixture()
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec named :data:`KERNEL` that runs this interpreter, found first via ``JUPYTER_PATH``."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "mtssl tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return KERNEL


def _execute(nb, kernel: str) -> None:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()


def _outputs(nb, output_type: str) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == output_type]


def _text(nb) -> str:
    return "".join(out.get("text", "") for out in _outputs(nb, "stream"))


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for out in _outputs(nb, "display_data"))


@pytest.mark.slow
def test_task_tour_runs(kernel: str) -> None:
    nb = nbformat.read(ROOT / "notebooks" / "01_task_tour.ipynb", as_version=4)
    _execute(nb, kernel)
    # one picture per task without predictions, one per task with the untrained model's
    assert _images(nb) == 8
    text = _text(nb)
    for name in ("rp", "col", "ex", "ms"):
        assert f"{name}: " in text


@pytest.mark.slow
def test_run_analysis_runs_its_own_short_pretraining(kernel: str, tmp_path: Path) -> None:
    """With no checkpoint at ``CHECKPOINT`` the notebook pretrains briefly (lasso mixing) and analyses that."""
    nb = nbformat.read(ROOT / "notebooks" / "02_run_analysis.ipynb", as_version=4)
    settings = nb.cells[1]
    lines = settings.source.splitlines()
    # a path that surely does not exist (the default would pick up a local `make quickstart` run)
    hits = [i for i, line in enumerate(lines) if line.startswith("CHECKPOINT = ")]
    assert len(hits) == 1, "the first code cell must set CHECKPOINT"
    lines[hits[0]] = f"CHECKPOINT = {str(tmp_path / 'missing' / 'last.ckpt')!r}"
    short_run = [i for i, line in enumerate(lines) if line.startswith("SHORT_RUN_DIR = ")]
    assert len(short_run) == 1
    lines[short_run[0]] = f"SHORT_RUN_DIR = {str(tmp_path / 'short')!r}"
    settings.source = "\n".join(lines)
    _execute(nb, kernel)
    assert (tmp_path / "short" / "checkpoints" / "last.ckpt").is_file()
    assert not list((ROOT / "notebooks").glob("runs")) and not list((ROOT / "notebooks").glob("lightning_logs"))
    text = _text(nb)
    assert "does not exist: a 20-step run" in text and "mixing 'lasso'" in text
    for name in ("rp", "col", "ex", "ms"):
        assert f"{name}: α = [" in text and f"{name}: loss " in text
    assert "of the top-3 neighbours are crops of the same photo" in text
    # α bars, four tasks' predictions, the retrieval figure
    assert _images(nb) == 6
    transfer = re.search(r"^#+\s*Transfer", (ROOT / "docs" / "benchmarks.md").read_text(), re.MULTILINE | re.IGNORECASE)
    assert transfer or "the transfer benchmark has not been run yet" in text
