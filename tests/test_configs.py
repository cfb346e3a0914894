"""Composed configs (``_base_:``): every experiment resolves to what its flat form resolved to.

``tests/legacy_configs/pretrain/`` holds the 14 experiments as they were before they were built
from ``configs/base/`` and ``configs/tasks/`` (flat files, every task block written out). Both
forms go through the same parser (``mtssl fit --print_config``), so an option added to the code
later changes both alike, while a wrong composition shows up as a difference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import Path as ConfigPath

from mtssl_lightning.cli import run
from mtssl_lightning.config_bases import BASES_KEY, ConfigBaseError, load_with_bases

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
LEGACY = ROOT / "tests" / "legacy_configs" / "pretrain"
FRAGMENTS = sorted((ROOT / "configs" / "base").glob("*.yaml")) + sorted((ROOT / "configs" / "tasks").glob("*.yaml"))


def resolved(config: Path, capsys) -> dict:
    """What `mtssl fit --config <config> --print_config` prints, as a dict."""
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--print_config"])
    printed = capsys.readouterr()
    assert exit_info.value.code in (0, None), printed.err[-3000:]
    return yaml.safe_load(printed.out)


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_experiment_resolves_as_its_flat_form_did(experiment, capsys):
    legacy = LEGACY / experiment.name
    if not legacy.exists():
        pytest.skip(f"{experiment.name} is newer than the composed configs (no flat form to compare with)")
    assert resolved(experiment, capsys) == resolved(legacy, capsys)


def test_no_experiment_was_lost():
    """The flat forms name the paper's experiments (README's table): each still has its config."""
    assert {p.name for p in LEGACY.glob("*.yaml")} <= {p.name for p in EXPERIMENTS}


def _bases(config: Path) -> set[Path]:
    """The files ``config`` is built from, through every level of ``_base_``."""
    bases = yaml.safe_load(config.read_text()).get(BASES_KEY) or []
    found: set[Path] = set()
    for base in [bases] if isinstance(bases, str) else bases:
        path = (config.parent / base).resolve()
        found |= {path} | _bases(path)
    return found


def test_every_fragment_is_part_of_an_experiment():
    """An edit to a fragment nothing includes would change nothing."""
    used = set().union(*(_bases(p) for p in EXPERIMENTS))
    assert {p.resolve() for p in FRAGMENTS} <= used


def _load(path: Path):
    """``path`` read the way the CLI reads a config file (relative ``_base_`` paths from its folder)."""
    with ConfigPath(str(path), mode="fr").relative_path_context():
        return load_with_bases(path.read_text())


def test_bases_merge_mappings_and_replace_everything_else(tmp_path):
    (tmp_path / "parts").mkdir()
    base = "trainer: {devices: 1, callbacks: [x, y]}\nmodel: {mixing: naive, compile: 1}\n"
    (tmp_path / "parts" / "a.yaml").write_text(base)
    (tmp_path / "parts" / "b.yaml").write_text("_base_: a.yaml\nmodel: {mixing: lasso}\n")  # relative to parts/
    (tmp_path / "c.yaml").write_text("_base_: [parts/b.yaml]\ntrainer: {callbacks: [z]}\nmodel: {compile: null}\n")
    assert _load(tmp_path / "c.yaml") == {
        "trainer": {"devices": 1, "callbacks": ["z"]},
        "model": {"mixing": "lasso", "compile": None},
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("_base_: nowhere.yaml\n", "does not exist"),
        ("_base_: config.yaml\n", "loop"),  # itself
        ("_base_: {a: 1}\n", "list of paths"),
    ],
)
def test_a_bad_base_is_named(tmp_path, text, message):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigBaseError, match=message):
        _load(tmp_path / "config.yaml")


def test_the_cli_reports_a_missing_base(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("_base_: [../nowhere/pretrain.yaml]\n")
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(config), "--print_config"])
    assert "nowhere/pretrain.yaml" in capsys.readouterr().err
