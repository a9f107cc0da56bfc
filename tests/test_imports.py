"""The import rules, read from the source with ``ast`` (a plug-in that reaches into the engine fails here):

* the engine (``harness/``) never imports ``methods`` or ``tasks`` (only the registry's lazy index names them, as
  strings);
* plug-ins (``methods/``, ``tasks/``) import from the engine only ``harness.api`` and ``harness.errors``;
* nothing outside ``harness/commands/`` imports a command module;
* the plug-in interface (``harness/api.py``) imports nothing of the engine but ``harness.registry`` and
  ``harness.errors`` (engine services are named as ``"module:attr"`` strings, imported on first use), so no import
  cycle runs through it.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_MAY_IMPORT = {"harness", "harness.api", "harness.errors"}
API_MAY_IMPORT = {"harness", "harness.registry", "harness.errors"}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) for every import in a file under ``root``, with relative imports resolved against its
    package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                      if base in ("harness", "harness.commands")]
    return found


def sources(folder: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / folder).rglob("*.py"))


def violations(folder: str, bad, root: Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root)}:{line}: imports {module}"
            for path in sources(folder, root) for line, module in imported_modules(path, root)
            if bad(path, module)]


def test_the_engine_never_imports_a_plug_in():
    def bad(path: Path, module: str) -> bool:
        return module.split(".")[0] in ("methods", "tasks")

    assert violations("harness", bad) == []


@pytest.mark.parametrize("folder", ["methods", "tasks"])
def test_plug_ins_import_only_the_api_and_errors_from_the_engine(folder):
    def bad(path: Path, module: str) -> bool:
        return module.split(".")[0] == "harness" and module not in PLUGIN_MAY_IMPORT

    assert violations(folder, bad) == []


@pytest.mark.parametrize("folder", ["harness", "methods", "tasks"])
def test_only_commands_import_command_modules(folder):
    def bad(path: Path, module: str) -> bool:
        inside = (ROOT / "harness" / "commands") in path.parents
        return module.startswith("harness.commands.") and not inside

    assert violations(folder, bad) == []



def test_the_interface_imports_nothing_of_the_engine_but_the_registry_and_errors():
    api = ROOT / "harness" / "api.py"
    found = [f"harness/api.py:{line}: imports {module}" for line, module in imported_modules(api)
             if module.split(".")[0] == "harness" and module not in API_MAY_IMPORT]
    assert found == []


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_import_graph() -> dict[str, set[str]]:
    """harness module -> the harness modules it imports anywhere in its source (function bodies included: they
    run too), with the packages a submodule import runs (``harness.executors`` for ``harness.executors.slurm``)."""
    modules = {module_name(path): path for path in sources("harness")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, module in imported_modules(path):
            parts = module.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & modules.keys()
        graph[name] = targets - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return seen


def test_no_import_cycle_runs_through_the_interface():
    graph = engine_import_graph()
    assert "harness.api" in graph["harness.train"]  # the graph sees the engine's imports of the interface
    assert "harness.api" not in reachable(graph, "harness.api"), sorted(reachable(graph, "harness.api"))


def test_the_cycle_check_sees_a_cycle():
    graph = {"harness.api": {"harness.train"}, "harness.train": {"harness.loop"}, "harness.loop": {"harness.api"}}
    assert "harness.api" in reachable(graph, "harness.api")

def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself works: in a copy of methods/ (the checkout is never written to), a plug-in importing the
    training loop's module is reported with its line, and nothing else is."""
    shutil.copytree(ROOT / "methods", tmp_path / "methods", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "methods" / "_import_rule_probe.py").write_text(
        "from harness.api import Method\n\nfrom harness.train import run_trial\n")
    found = violations("methods", lambda p, m: m.split(".")[0] == "harness" and m not in PLUGIN_MAY_IMPORT,
                       root=tmp_path)
    assert found == ["methods/_import_rule_probe.py:3: imports harness.train"]
