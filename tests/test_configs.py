"""Config files built from other config files (``_base_:``, :mod:`mtssl_lightning.config_bases`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonargparse import Path as ConfigPath

from mtssl_lightning.cli import run
from mtssl_lightning.config_bases import ConfigBaseError, load_with_bases


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
