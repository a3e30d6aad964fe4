"""The package layout holds: imports point down the layers, and there is no cycle.

Every import in a module counts, wherever it is written (in a function, under
TYPE_CHECKING): a cycle hidden in a function is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lower numbers are lower layers; a module may import only from its own layer or below.
LAYERS: list[tuple[str, int]] = [
    ("reqpmd", 0),  # the package itself: __version__
    ("reqpmd.errors", 0),
    ("reqpmd.checks", 0),
    ("reqpmd.quoting", 0),
    ("reqpmd.backoff", 0),
    ("reqpmd.fsutil", 0),
    ("reqpmd.worker", 0),
    ("reqpmd.systemd", 0),
    ("reqpmd.control.protocol", 0),  # the wire format, shared with reqpmctl
    ("reqpmd.config", 1),
    ("reqpmd.slots", 2),
    ("reqpmd.builds", 3),
    ("reqpmd.repos", 3),  # repositories on disk: no store, no threads
    ("reqpmd.repos.publisher", 4),  # what to publish and when: reads the store
    ("reqpmd.projects", 3),  # git, exports, the projects table
    ("reqpmd.projects.syncer", 4),  # fetches and queues builds through the scheduler
    ("reqpmd.maintenance", 4),  # retention and orphaned roots: store, repositories, slots
    ("reqpmd.cluster", 4),
    ("reqpmd.status", 5),
    ("reqpmd.live", 5),  # reqpmctl top: one shared snapshot and its long poll
    ("reqpmd.control", 6),
    ("reqpmd.metrics", 6),  # Prometheus: reads status and the builds' ends
    ("reqpmd.daemon", 7),
    ("reqpmd.concurrency", 7),  # the seed's face of reqpmd.slots
    ("reqpmctl", 8),
]


def layer_of(module: str) -> int:
    best = ("", -1)
    for prefix, rank in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[0]):
            best = (prefix, rank)
    if best[1] < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Project modules imported anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # "from reqpmd.slots import keys" imports the module reqpmd.slots.keys
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in MODULES:
                    found.add(candidate)
    return {m for m in found if m.split(".")[0] in ("reqpmd", "reqpmctl")}


FILES = sorted([*ROOT.glob("reqpmd/**/*.py"), *ROOT.glob("reqpmctl/**/*.py")])
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imports_of(p) for p in FILES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    mine = layer_of(module)
    upward = sorted(m for m in GRAPH[module] if layer_of(m) > mine)
    assert not upward, f"{module} (layer {mine}) imports from a higher layer: {upward}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in done:
            return None
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        visiting.append(node)
        for dep in sorted(edges.get(node, ())):
            cycle = visit(dep)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for module in sorted(edges):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_no_import_cycles() -> None:
    # a package's __init__ is imported by its modules implicitly; only explicit edges count
    edges = {m: {d for d in deps if d in MODULES and d != m} for m, deps in GRAPH.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_click_only_in_reqpmctl() -> None:
    for path in ROOT.glob("reqpmd/**/*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "click" for n in names), path


def test_nothing_imports_the_daemon() -> None:
    importers = sorted(m for m, deps in GRAPH.items() if "reqpmd.daemon" in deps)
    assert importers == []


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The walk itself can fail: known-bad graphs are reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("reqpmd.builds.store") > layer_of("reqpmd.slots.keys")
    assert layer_of("reqpmd.control.protocol") < layer_of("reqpmd.control.server")
