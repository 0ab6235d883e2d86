"""The package's shape: no import cycle, and the lower layers never import the upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "utopia_agent"
# Modules that serve HTTP (the factory, the routes, the services they share): nothing below may import them.
UPPER = ("utopia_agent.app", "utopia_agent.services", "utopia_agent.api")
# The engine layer under DockerManager: the only modules that import docker.
ENGINE = {
    "utopia_agent.engine.connection", "utopia_agent.engine.errors", "utopia_agent.engine.container_config",
    "utopia_agent.engine.logs", "utopia_agent.images.pulls",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module of the package that `path` imports, at module level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("utopia_agent"))
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(part for part in (base, node.module or "") if part)
            if not target.startswith("utopia_agent"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if (PACKAGE.parent / submodule.replace(".", "/")).with_suffix(".py").exists() else target)
    return found - {name}


def _runtime_nodes(tree: ast.AST):
    """Every node that runs: what sits under `if TYPE_CHECKING:` is for type checkers only."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_lower_layers_never_import_the_http_layer():
    for module, targets in import_graph().items():
        if module.startswith(UPPER) or module == "utopia_agent.cli":
            continue
        upward = sorted(t for t in targets if t.startswith(UPPER))
        assert not upward, f"{module} imports {upward}"


def test_only_the_engine_layer_imports_docker():
    assert {module for module in import_graph() if "docker" in _top_level_imports(module)} == ENGINE


def test_the_records_and_who_holds_what_need_no_docker():
    """The client and the policy read the records: neither they nor anything they import may import docker."""
    graph = import_graph()
    for start in ("utopia_agent.claims.records", "utopia_agent.claims.holders"):
        reached, pending = set(), [start]
        while pending:
            module = pending.pop()
            if module not in reached:
                reached.add(module)
                pending.extend(graph.get(module, ()))
        with_docker = sorted(m for m in reached if "docker" in _top_level_imports(m))
        assert not with_docker, f"{start} reaches docker through {with_docker}"


def _top_level_imports(module: str) -> set[str]:
    """The top-level names of the packages outside this one that `module` imports at run time."""
    relative = Path(*module.split("."))
    path = PACKAGE.parent / relative.with_suffix(".py")
    if not path.exists():
        path = PACKAGE.parent / relative / "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found
