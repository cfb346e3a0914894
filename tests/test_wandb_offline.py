"""Reading an offline W&B run file back (``mtssl_lightning.wandb_offline``), checked against what W&B itself was given."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from run_configs import ended_runs

from mtssl_lightning.wandb_offline import read_config, read_history, run_file, wait_until_finished

BLOCK = 32768  # the run file's block size: a record longer than what is left of a block is split across blocks
LOGGED = [
    {"loss": 1.5, "val/acc": 0.25},
    {"loss": 0.5, "trainer/global_step": 3, "note": "x" * 50_000},  # spans two blocks (FIRST, MIDDLE/LAST chunks)
    {"loss": 0.25, "note": "text"},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline through the environment, not only ``wandb.init(mode=…)``: W&B reads the environment
    once per process, when it is first set up, and a later test's ``WANDB_MODE=offline`` would not
    reach an online-set-up process (seen: the next `mtssl fit` asked for an API key)."""
    monkeypatch.setenv("WANDB_MODE", "offline")


def _offline_run(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A real offline W&B run that logged ``LOGGED``, and what ``read_history`` makes of it."""
    import wandb

    run = wandb.init(mode="offline", dir=tmp_path, project="mtssl-test", config={"depth": "tiny", "width": 0.25})
    for row in LOGGED:
        run.log(row)
    [run_dir] = ended_runs(tmp_path)
    return run_dir, read_history(run_dir)


def test_the_rows_and_config_read_back_are_what_wandb_was_given(tmp_path):
    run_dir, rows = _offline_run(tmp_path)
    assert run_file(run_dir).stat().st_size > 2 * BLOCK  # the long row crossed block ends
    assert [{key: row[key] for key in logged} for row, logged in zip(rows, LOGGED)] == LOGGED
    assert [row["_step"] for row in rows] == [0, 1, 2] and len(rows) == len(LOGGED)
    config = read_config(run_dir)
    assert config["depth"] == "tiny" and config["width"] == 0.25


def test_a_run_file_cut_anywhere_reads_as_its_complete_rows_and_is_waited_for(tmp_path):
    """W&B may still be writing the file when ``wandb.finish()`` returns (see ``wait_until_finished``):
    a cut file reads as a prefix of the rows, without an error, and the wait returns once the rest lands."""
    run_dir, rows = _offline_run(tmp_path)
    data = run_file(run_dir).read_bytes()
    cut_dir = tmp_path / "being-written"
    cut_dir.mkdir()
    cut_file = cut_dir / run_file(run_dir).name
    near_block_ends = {end + d for end in range(BLOCK, len(data), BLOCK) for d in range(-8, 9)}
    seen = set()
    for cut in sorted(set(range(7, len(data), 53)) | near_block_ends):  # 7: the header alone
        cut_file.write_bytes(data[:cut])
        prefix = read_history(cut_dir)
        assert prefix == rows[: len(prefix)], cut
        seen.add(len(prefix))
    assert seen == set(range(len(rows) + 1))  # every prefix, from none to all, was met

    cut_file.write_bytes(data[:-1])  # all but the last byte of the exit record, the file's last
    assert read_history(cut_dir) == rows
    with pytest.raises(TimeoutError, match="no exit record"):
        wait_until_finished(cut_dir, timeout_s=0.3)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        wait_until_finished(tmp_path / "no-such-run")
    writer = threading.Timer(0.5, cut_file.write_bytes, args=(data,))
    writer.start()
    try:
        assert read_history(wait_until_finished(cut_dir, timeout_s=30)) == rows
    finally:
        writer.join()
