"""The package's shape: no import cycles (``TYPE_CHECKING`` imports included), files a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtssl_lightning"
#: one task per file: a task's own file may hold more than the others (sampler, head, loss, metrics, pictures)
TASK_FILES = {"relative_position.py", "colorization.py", "exemplar.py", "motion_segmentation.py"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Names of the modules imported at import time: module level, and inside ``if``/``try`` blocks
    (``if TYPE_CHECKING:`` included); imports inside functions run later and do not count."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join([*here, base] if base else here)
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return names


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it needs at import time}``.

    Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` first, so an import of ``a.b.c``
    from outside ``a.b`` is an edge to ``a.b`` too; the importer's own parent packages are not
    (they are already being imported).
    """
    modules = _modules()

    def parents(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imported(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            if name in modules:
                targets |= ({name} | parents(name)) - parents(module) - {module}
        graph[module] = {t for t in targets if t in modules}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, …, a]``, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if not state.get(target) and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "mtssl_lightning.pretrain" in graph and "mtssl_lightning.interfaces" in graph["mtssl_lightning.pretrain"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the module, the DataModule and the strategy talk through mtssl_lightning.interfaces, not each other
    strategy, module, data = "mtssl_lightning.distributed.task_parallel", "mtssl_lightning.pretrain", "mtssl_lightning.data.datamodule"
    for a, b in [(module, strategy), (strategy, module), (data, module), (data, strategy), (module, data)]:
        assert b not in graph[a], f"{a} imports {b}"


def test_the_cycle_finder_finds_a_type_checking_cycle():
    """The checker itself, on a hand-made graph and on source with an ``if TYPE_CHECKING:`` import."""
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mtssl_lightning.b import B\n"
    assert "mtssl_lightning.b" in _imported(ast.parse(source), "mtssl_lightning.a", False)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_package_file_is_longer_than_a_reader_can_hold():
    """Every file ≤ 400 lines, except a task's own file (it holds that one task: sampler, head,
    loss, metrics, pictures)."""
    too_long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if path.name not in TASK_FILES and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, too_long
