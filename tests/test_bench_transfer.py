"""The transfer benchmark's report, from hand-made raw figures (its measuring takes ~30 min; the
report once failed only after all of it, on a helper a refactor had dropped)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their sibling `_report`
    import bench_transfer

    yield bench_transfer
    sys.modules.pop("bench_transfer", None)


def _results() -> dict:
    """Three seeds; photo-probe means: random 0.32 (std 0.02), rp 0.33 (std 0.02), all 0.41 (std 0.01)."""
    flat = {c: [0.9, 0.9, 0.9] for c in ("random", "rp", "col", "ex", "ms", "all")}
    photos = {"random": [0.30, 0.32, 0.34], "rp": [0.31, 0.33, 0.35], "col": [0.30, 0.30, 0.30],
              "ex": [0.29, 0.31, 0.33], "ms": [0.30, 0.31, 0.32], "all": [0.40, 0.41, 0.42]}
    curve = [[15, 0.5], [30, 0.8]]
    return {
        "seeds": [0, 1, 2], "probes": flat, "knns": flat, "photos": photos,
        "pretrain_seconds": {c: [1.0, 1.0, 1.0] for c in flat}, "curves": {"random init": [curve] * 3, "four-task pretraining": [curve] * 3},
        "minutes": 1.0, "command": "bench", "lr": 0.001, "combine": "alternate",
        "pretrain_steps": 300, "probe_epochs": 3, "finetune_steps": 30, "finetune_every": 15,
    }


def test_report_states_the_verdicts_computed_by_hand(bench):
    text = bench.report(json.loads(json.dumps(_results())), "curves.png")  # survives the JSON round trip
    # all four vs random: +0.09, two standard errors of the difference = 2·sqrt((0.01² + 0.02²)/3) = 0.026
    assert "| all four tasks | 0.410 ± 0.010 | +0.090, above random init |" in text
    # best single task is relative position (0.33); all four beyond it, it not beyond random (2 SE = 0.033)
    assert "All four ≥ best single task (relative position): yes (+0.080, beyond the spread)" in text
    assert "best single > random: no (+0.010 ± 0.033)" in text
    assert "| colorization | 0.300 ± 0.000 | -0.020, within noise |" in text
    assert "![fine-tuning curves](img/curves.png)" in text


def test_report_only_reads_saved_results_and_writes_the_section(bench, tmp_path, monkeypatch):
    saved, output, plot = tmp_path / "results.json", tmp_path / "benchmarks.md", tmp_path / "img" / "curves.png"
    saved.write_text(json.dumps(_results()))
    monkeypatch.setattr(sys, "argv", ["bench_transfer.py", "--report-only", str(saved), "--output", str(output), "--plot", str(plot)])
    bench.main()
    assert "all four tasks" in output.read_text() and plot.stat().st_size > 0
