"""The layering of docs/architecture.md, read off the source: every import of every module, none upward, no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "blocks", "backbones", "datamodules", "tasks", "visualization", "runs")
# NOTE: what each layer may import of the project (docs/architecture.md); train.py is the top
ALLOWED = {
    "core": set(),
    "blocks": {"core"},
    "backbones": {"core", "blocks"},
    "datamodules": {"core"},
    "visualization": {"core", "blocks"},
    "tasks": {"core", "blocks", "backbones", "datamodules", "visualization"},
    "runs": {"core", "blocks", "backbones", "datamodules", "visualization", "tasks"},
    "train": {"runs"},
}
TASKS_MAY_USE_OF_DATAMODULES = {"datamodules.decode"}  # batch types only, never a datamodule class


def _modules() -> dict[str, Path]:
    modules = {"train": REPO / "train.py"}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) - {name} for name, path in modules.items()}


def test_no_layer_imports_upward(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, imported in graph.items():
        layer = module.split(".")[0]
        for target in imported:
            other = target.split(".")[0]
            if other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{module} -> {target}")
            if layer == "tasks" and other == "datamodules" and target not in TASKS_MAY_USE_OF_DATAMODULES:
                wrong.append(f"{module} -> {target} (tasks use datamodules' batch types only)")
    assert not wrong, wrong


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if target not in graph:
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [module, target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # NOTE: a package's __init__ re-exporting its own modules is not a cycle between layers; none of them do that
    assert not cycles, cycles


def test_the_architecture_page_names_every_package() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    assert all(f"`{package}`" in text or f"{package}/" in text for package in PACKAGES)
