"""Config files built from other config files: a top-level ``_base_:`` key.

``configs/pretrain/rp_col.yaml`` says ``_base_: [../base/pretrain.yaml, ../tasks/rp.yaml, …]``
and then only what is its own (run name, outputs). Loading it merges the bases in order, then
the file's own keys: mappings are merged key by key, anything else (a list, a string, a number,
``null``) replaces what came before. The result is the plain config a flat file would hold, so
``--print_config`` shows the same as before and later ``--config`` overlays (``configs/tiny.yaml``)
override it as usual. Paths in ``_base_`` are relative to the file that names them; a base may
have its own ``_base_``.

Why not jsonargparse's own means: a subclass value may be a path to a file
(``rp: ../tasks/rp.yaml``), but then nothing can be added to it in the same file (the
harmonized experiments add ``input_mode`` to every task); a ``config:`` key inside a config file
includes another, but values after it replace, not merge with, the included ``model:``/``data:``
(and the included file misses the CLI's default ``class_path``); OmegaConf interpolation would
need another dependency and does not cross files.

It is a jsonargparse parser mode: ``MTSSLCLI`` builds its parsers with ``parser_mode=PARSER_MODE``.
"""

from __future__ import annotations

from typing import Any

import yaml
from jsonargparse import Path, get_loader, set_loader

#: the top-level key naming a config's bases (a path or a list of paths)
BASES_KEY = "_base_"
#: jsonargparse parser mode: YAML plus ``_base_``
PARSER_MODE = "yaml_with_bases"


class ConfigBaseError(yaml.YAMLError):
    """A ``_base_`` that names no readable file, a loop of bases, or a malformed ``_base_``
    (a YAML error, so that jsonargparse reports it as a config it could not load)."""


def merge(base: Any, override: Any) -> Any:
    """``override`` on top of ``base``: mappings key by key (recursively), anything else replaced."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(base[key], value) if key in base else value
    return merged


def expand_bases(config: Any, chain: tuple[str, ...] = ()) -> Any:
    """``config`` with its ``_base_`` files (relative to jsonargparse's current config folder)
    merged in under it; ``chain``: the files being expanded, to catch a loop."""
    if not isinstance(config, dict) or BASES_KEY not in config:
        return config
    config = dict(config)
    bases = config.pop(BASES_KEY)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigBaseError(f"{BASES_KEY} must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        try:
            path = Path(base, mode="fr")
        except TypeError as error:
            raise ConfigBaseError(f"{BASES_KEY} {base!r}: {error}") from error
        if path.absolute in chain:
            raise ConfigBaseError(f"{BASES_KEY} loop: {' -> '.join((*chain, path.absolute))}")
        with path.relative_path_context():  # the base's own _base_ paths are relative to it
            loaded = expand_bases(get_loader("yaml")(path.read_text()), (*chain, path.absolute))
        if not isinstance(loaded, dict):
            raise ConfigBaseError(f"{BASES_KEY} {base!r}: not a mapping of config keys")
        merged = merge(merged, loaded)
    return merge(merged, config)


def load_with_bases(text: str) -> Any:
    """The jsonargparse loader of :data:`PARSER_MODE`: YAML, then its ``_base_`` files merged in."""
    return expand_bases(get_loader("yaml")(text))


set_loader(PARSER_MODE, load_with_bases, exceptions=(yaml.YAMLError,))
