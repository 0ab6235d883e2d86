"""The package's shape: one folder per concern, no import cycle, and no layer importing a layer above it."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "utopia_agent"
# The package's folders and top-level modules, bottom-up: each may import itself and what is below
# it, never what is above. The HTTP layer (api/) sits above the services it calls, which sit above
# the rest; only the factory and the CLI, which put it all together, are above the routes.
LAYERS = (
    "errors",         # the domain errors (and the package's __init__: its version)
    "claims",         # what a claim's container is: records, labels, holders, shares, volumes
    "config",         # the UTOPIA_AGENT_* variables
    "schemas",        # the contract's shapes
    "observability",  # logs, the request log, Prometheus
    "events",         # the node's changes, numbered, in the state dir (the history and its streams)
    "engine",         # the Docker engine
    "node",           # node-wide state: state dir and files, drain, roles, system metrics, claim usage
    "disks",          # claims' container disks: the allocatable disk, the quota mode, the measurements
    "network",        # tenant networks: the claims' network and the firewall rules that isolate it
    "volumes",        # claim volumes: sized node-local volumes on disk (loop-mounted files, btrfs subvolumes)
    "images",         # pulls
    "gpus",           # NVML, health, selection
    "allocation",     # decisions under the node's lock
    "exec",           # commands run in claims' containers: once, or as sessions over Kubernetes' channel protocol
    "client",         # the typed client (needs only claims and schemas)
    "services",       # what the routes call
    "server",         # the gunicorn worker
    "api",            # HTTP
    "app",            # the factory
    "cli",            # the command
)
# At most about 8 modules directly in the package; none over about 700 lines.
MAX_TOP_LEVEL_MODULES = 8
MAX_MODULE_LINES = 700


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every module of the package that `path` imports: at module level, inside a function, or for
    type checkers only (`if TYPE_CHECKING:`): a type-only import still ties the two modules, and
    a circle of them is a circle of the design, whatever the interpreter does."""
    name = module_name(path, package)
    parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == package.name)
        elif isinstance(node, ast.ImportFrom):
            base = parent.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(part for part in (base, node.module or "") if part)
            if target.split(".")[0] != package.name:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if _is_module(submodule, package) else target)
    return found - {name}


def _is_module(name: str, package: Path = PACKAGE) -> bool:
    path = package.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def layer_of(module: str) -> str:
    """The folder (or top-level module) a module belongs to; the package itself counts as errors'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


def _runtime_nodes(tree: ast.AST):
    """Every node that runs: what sits under `if TYPE_CHECKING:` is for type checkers only."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


@functools.cache
def _graph_of(package: Path) -> dict[str, frozenset[str]]:
    return {module_name(path, package): frozenset(imports_of(path, package)) for path in package.rglob("*.py")}


def import_graph(package: Path = PACKAGE) -> dict[str, frozenset[str]]:
    """Module -> the package's modules it imports, type-only imports included (read once per run)."""
    return _graph_of(package)


def import_cycles(graph: dict[str, frozenset[str]] | dict[str, set[str]]) -> list[list[str]]:
    """One circle through each module that is on one (depth first, each circle as its trail)."""
    cycles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_package_has_no_import_cycle():
    assert [" -> ".join(cycle) for cycle in import_cycles(import_graph())] == []


def test_a_circle_closed_by_a_type_only_import_is_found(tmp_path):
    """The check itself, on a package made here: records imports the view's record for type checkers
    only, the view imports changes, changes imports records; the circle this package once had."""
    package = tmp_path / "house"
    for folder in ("claims", "engine", "events"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "claims" / "records.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..engine.node_view import ContainerState\n")
    (package / "engine" / "node_view.py").write_text("from ..events.changes import container_changes\n")
    (package / "events" / "changes.py").write_text("from house.claims import records\n")
    assert import_cycles(import_graph(package)) == [
        ["house.claims.records", "house.engine.node_view", "house.events.changes", "house.claims.records"],
    ]
    assert layer_violations(import_graph(package), layers=("claims", "events", "engine")) == [
        "house.claims.records (claims) imports house.engine.node_view (engine), a layer above it",
    ]


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(module for module in import_graph() if layer_of(module) not in LAYERS)
    assert not unplaced, f"add these to LAYERS (bottom-up) or move them into a folder: {unplaced}"


def layer_violations(graph: dict[str, frozenset[str]] | dict[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[str]:
    rank = {layer: index for index, layer in enumerate(layers)}
    return sorted(
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)}), a layer above it"
        for module, targets in graph.items()
        for target in targets
        if rank[layer_of(target)] > rank[layer_of(module)]
    )


def test_no_layer_imports_a_layer_above_it():
    assert layer_violations(import_graph()) == []


def test_the_layer_rule_catches_an_upward_import():
    """The check itself: the engine importing the allocator, or the API the factory, is caught."""
    graph = {"utopia_agent.engine.manager": {"utopia_agent.allocation.allocator", "utopia_agent.config"},
             "utopia_agent.api.containers": {"utopia_agent.app"}}
    assert layer_violations(graph) == [
        "utopia_agent.api.containers (api) imports utopia_agent.app (app), a layer above it",
        "utopia_agent.engine.manager (engine) imports utopia_agent.allocation.allocator (allocation), a layer above it",
    ]


def test_only_the_engine_layer_imports_docker():
    importers = {module for module in import_graph() if "docker" in _top_level_imports(module)}
    assert importers and {layer_of(module) for module in importers} == {"engine"}


def test_only_the_gpu_layer_imports_pynvml():
    importers = {module for module in import_graph() if "pynvml" in _top_level_imports(module)}
    assert importers and {layer_of(module) for module in importers} == {"gpus"}


def test_the_package_root_stays_small_and_no_module_is_long():
    top_level = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES + 1, f"{top_level}: put new modules in the folder of their concern"
    long = sorted(f"{path.relative_to(PACKAGE)}: {lines}" for path in PACKAGE.rglob("*.py")
                  if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES)
    assert not long, f"split these by what they hold: {long}"


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
